"""Client library of maddpg-citylearn: call the served MADDPG policy from a simulator, and validate it in CityLearn.

Needs only numpy and tritonclient; onnxruntime for :class:`LocalPolicy`, citylearn for the env helpers (both imported
when used).
"""

from .errors import (
    BadInputError,
    LayoutMismatchError,
    MaddpgCitylearnError,
    ModelNotFoundError,
    PolicyError,
    PolicyTimeoutError,
    PolicyUnavailableError,
)
from .layout import DEFAULT_MODEL_NAME, INPUT_NAME, OUTPUT_NAME, AgentLayout, PolicyLayout
from .local_policy import LocalPolicy
from .metrics import ModelMetrics, scrape
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
    "PolicyTimeoutError",
    "PolicyUnavailableError",
    "RetryPolicy",
    "TritonPolicy",
    "scrape",
]
