"""One flat error hierarchy for the whole project.

Every error a user can act on derives from :class:`MaddpgCitylearnError`; the CLI prints its message as one line and
exits non-zero. Callers of the client catch the subclass they can do something about (retry on
:class:`PolicyUnavailableError`, slow down on :class:`PolicyOverloadedError`, fix the input on
:class:`BadInputError`, ...).
"""

from __future__ import annotations


class MaddpgCitylearnError(Exception):
    """Base of every error this project raises on purpose. The message says what is wrong and what to do."""


# --- client / serving ---------------------------------------------------------------------------------------------
class PolicyError(MaddpgCitylearnError):
    """A policy (served or local) could not produce actions."""


class PolicyUnavailableError(PolicyError):
    """The server cannot be reached or is not ready (connection refused, UNAVAILABLE, model not loaded)."""


class PolicyOverloadedError(PolicyError):
    """The server is up but turned the request away: its queue was full (``max_queue_size``) or the request waited
    longer than the queue timeout. The request never ran; it is safe to send again later, more slowly."""


class PolicyTimeoutError(PolicyError):
    """The server did not answer within the client's timeout."""


class ProtocolMismatchError(PolicyError):
    """Something answers at the address, but not in the protocol asked for (HTTP sent to Triton's gRPC port, gRPC to
    its HTTP port, either to its metrics port). Retrying cannot help: change the port or the protocol."""


class ModelNotFoundError(PolicyError):
    """The server is up but does not serve the requested model (or version)."""


class BadInputError(PolicyError, ValueError):
    """The observations do not fit the model: wrong shape, dtype, or non-finite where that matters."""


class LayoutMismatchError(MaddpgCitylearnError):
    """The env (or a checkpoint) does not have the buildings, observations or actions the model was trained on."""


# --- checkpoints / export -----------------------------------------------------------------------------------------
class CheckpointError(MaddpgCitylearnError):
    """A checkpoint file is missing, truncated, foreign or unsafe to load."""


class ExportError(MaddpgCitylearnError):
    """The export could not produce a valid model version; nothing was written."""


class ExportValidationError(ExportError):
    """The exported graph failed validation. ``failures`` lists every failed check, not just the first."""

    def __init__(self, failures: list[str]):
        self.failures = list(failures)
        lines = "\n  - ".join(self.failures)
        super().__init__(f"export validation failed ({len(self.failures)} check(s)); nothing was written:\n  - {lines}")


class RepositoryError(MaddpgCitylearnError):
    """The model repository cannot be written as asked (unwritable, version exists, not a repository)."""


# --- env / serving operations ---------------------------------------------------------------------------------------
class EnvironmentSetupError(MaddpgCitylearnError):
    """The CityLearn env cannot be built as asked (missing schema, dataset unavailable offline, bad window)."""


class PlannerError(MaddpgCitylearnError):
    """The perfect-foresight planner cannot plan as asked (unknown objective, bad horizon, LP not solved)."""


class ServerStartError(MaddpgCitylearnError):
    """The local tritonserver did not become ready (busy port, broken repository, python stub failed)."""


class DeployError(MaddpgCitylearnError):
    """A Kubernetes operation failed (kubectl missing, no cluster, rollout failed)."""
