"""Client library of maddpg-citylearn: call the served MADDPG policy from a simulator.

The tensor contract (:class:`PolicyLayout`, from ``maddpg_core``) and the transport (Triton HTTP/gRPC, sync and
asyncio, the in-process onnxruntime policy, Triton's metrics). Needs only the base install (numpy, tritonclient, click,
tqdm); onnxruntime for :class:`LocalPolicy`, imported when used. Running a policy in CityLearn is the evaluation
harness's job (``maddpg_evaluation``, the ``env`` extra).
"""

from maddpg_core.errors import (
    BadInputError,
    LayoutMismatchError,
    MaddpgCitylearnError,
    ModelNotFoundError,
    PolicyError,
    PolicyOverloadedError,
    PolicyTimeoutError,
    PolicyUnavailableError,
    ProtocolMismatchError,
)
from maddpg_core.layout import DEFAULT_MODEL_NAME, INPUT_NAME, OUTPUT_NAME, AgentLayout, PolicyLayout

from .local_policy import LocalPolicy
from .metrics import ModelMetrics, scrape, scrape_settled
from .triton_policy import AsyncTritonPolicy, RetryPolicy, TritonPolicy

__all__ = [
    "AgentLayout",
    "AsyncTritonPolicy",
    "BadInputError",
    "DEFAULT_MODEL_NAME",
    "INPUT_NAME",
    "LayoutMismatchError",
    "LocalPolicy",
    "MaddpgCitylearnError",
    "ModelMetrics",
    "ModelNotFoundError",
    "OUTPUT_NAME",
    "PolicyError",
    "PolicyLayout",
    "PolicyOverloadedError",
    "PolicyTimeoutError",
    "PolicyUnavailableError",
    "ProtocolMismatchError",
    "RetryPolicy",
    "TritonPolicy",
    "scrape",
    "scrape_settled",
]
