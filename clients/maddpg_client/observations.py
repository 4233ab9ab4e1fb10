"""Check observations before they leave the process: a wrong shape or dtype is a bug in the caller, best named here."""

from __future__ import annotations

import numpy as np

from maddpg_core.errors import BadInputError
from maddpg_core.layout import PolicyLayout


def as_batch(observations, layout: PolicyLayout, *, allow_non_finite: bool = False) -> tuple[np.ndarray, bool]:
    """``[agents, obs_width]`` or ``[batch, agents, obs_width]`` -> (float32 C-contiguous batch, was it one district).

    float64 input is converted (CityLearn hands out Python floats); other dtypes are refused. Non-finite values are
    refused unless ``allow_non_finite``: the graph would sanitise them, but a NaN from a simulator is usually a bug
    that should surface, not be quietly replaced.
    """
    array = np.asarray(observations)
    if array.dtype not in (np.float32, np.float64):
        raise BadInputError(
            f"observations have dtype {array.dtype}; the model takes float32 (float64 is converted): pass "
            f"np.asarray(obs, dtype=np.float32)"
        )
    expected = layout.observation_shape
    if array.ndim == 2 and array.shape == expected:
        single = True
        array = array[None]
    elif array.ndim == 3 and array.shape[1:] == expected:
        single = False
    else:
        raise BadInputError(
            f"observations have shape {tuple(array.shape)}; expected [{expected[0]}, {expected[1]}] for one district "
            f"or [batch, {expected[0]}, {expected[1]}] (agents x padded observation width)"
        )
    if array.shape[0] == 0:
        raise BadInputError("observations hold an empty batch")
    if not allow_non_finite:
        bad = ~np.isfinite(array)
        if bad.any():
            b, agent, slot = (int(i) for i in np.argwhere(bad)[0])
            name = _slot_name(layout, agent, slot)
            raise BadInputError(
                f"{int(bad.sum())} non-finite observation value(s), first at batch {b}, agent {agent}, slot {slot}"
                f"{f' ({name})' if name else ''}: fix the simulator, or pass allow_non_finite=True (to act() or to the "
                f"policy's constructor) to let the model sanitise them"
            )
    return np.ascontiguousarray(array, dtype=np.float32), single


def _slot_name(layout: PolicyLayout, agent: int, slot: int) -> str | None:
    names = layout.agents[agent].observation_names
    return names[slot] if names is not None and slot < len(names) else None
