"""Triton model configs as data, written through ``model_config_pb2`` (never by pasting strings).

One model directory carries three variants of the same model (same name, tensors, dims and layout):

``config.pbtxt``        production on GPU nodes: onnxruntime backend, a KIND_GPU and a KIND_CPU instance group.
``configs/cpu.pbtxt``   CPU-only nodes (``--model-config-name=cpu``): onnxruntime backend, KIND_CPU only.
``configs/local.pbtxt`` the tritonserver bundled in nvidia-pytriton (``--model-config-name=local``), which has no
                        onnxruntime backend: the python backend runs the same ``model.onnx`` with onnxruntime.

A variant that lists KIND_GPU fails to load on a host without a GPU; the CPU variants never list it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from maddpg_core.files import atomic_write
from maddpg_core.layout import INPUT_NAME, LAYOUT_PARAMETER, OUTPUT_NAME, PolicyLayout

DEFAULT_CONFIG = "config.pbtxt"
CONFIG_VARIANTS = ("default", "cpu", "local")


@dataclass(frozen=True)
class ServingSettings:
    """Knobs of the served model. Defaults were chosen from the benchmarks in ``docs/benchmarks.md``."""

    max_batch_size: int = 4096
    # Dynamic batching: how long the first request of a batch may wait for company. Without a queue policy (below)
    # the batcher hands each batch to an instance's queue at once (prefetching), so with no delay requests that
    # arrive under load are seldom merged; 100 us merges them again for about that much extra latency at
    # concurrency 1 (0, 100, 200 and 500 us are measured against each other in docs/benchmarks.md, Tuning).
    max_queue_delay_us: int = 100
    # A queue policy (reject after a timeout, bound the queue) is off by default, on purpose: in Triton 2.51 any
    # non-default queue policy turns off the batcher's payload prefetching, and then a request now and then waits
    # ~500 ms for a wake-up that never comes (measured with both backends, at concurrency 1 to 64, 1 or 2 instances;
    # none without the policy: docs/benchmarks.md, "The 500 ms stall", and benchmarks/dynamic_batching_stall.py).
    # Production bounds the load in front of Triton instead (the pods' admission proxy, docs/kubernetes.md,
    # "Overload"; measured in docs/overload.md), and Kubernetes scales out on queue time.
    queue_timeout_us: int = 0               # > 0: a request waiting longer than this is rejected, not served late
    max_queue_size: int = 0                 # > 0: beyond this the server answers UNAVAILABLE at once
    gpu_instances: int = 1
    cpu_instances: int = 2
    local_instances: int = 2
    onnx_intra_op_threads: int = 1          # per instance; instances x threads should not exceed the cores
    versions_served: int = 1                # newest N versions are loaded; older ones stay on disk for rollback


def build_config(layout: PolicyLayout, model_name: str, variant: str, settings: ServingSettings = ServingSettings()) -> pb.ModelConfig:
    """The ModelConfig of one variant (``default``, ``cpu`` or ``local``)."""
    if variant not in CONFIG_VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; choose one of {', '.join(CONFIG_VARIANTS)}")
    config = pb.ModelConfig(name=model_name, max_batch_size=settings.max_batch_size)
    config.version_policy.latest.num_versions = settings.versions_served
    # With max_batch_size > 0 Triton adds the batch dimension itself: dims leave it out.
    config.input.add(name=INPUT_NAME, data_type=pb.TYPE_FP32, dims=list(layout.observation_shape))
    config.output.add(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=list(layout.action_shape))

    batching = config.dynamic_batching
    batching.SetInParent()  # dynamic_batching { } even when every field below keeps its default
    batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    if settings.queue_timeout_us or settings.max_queue_size:  # see ServingSettings: the policy costs 500 ms stalls
        batching.default_queue_policy.timeout_action = pb.ModelQueuePolicy.REJECT
        batching.default_queue_policy.default_timeout_microseconds = settings.queue_timeout_us
        batching.default_queue_policy.allow_timeout_override = True
        batching.default_queue_policy.max_queue_size = settings.max_queue_size

    if variant == "local":
        config.backend = "python"
        config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=settings.local_instances)
        config.parameters["onnx_intra_op_threads"].string_value = str(settings.onnx_intra_op_threads)
    else:
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = "model.onnx"
        if variant == "default":
            config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_GPU, count=settings.gpu_instances)
        config.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=settings.cpu_instances)
        # Parameters of Triton's onnxruntime backend.
        config.parameters["intra_op_thread_count"].string_value = str(settings.onnx_intra_op_threads)
        config.parameters["inter_op_thread_count"].string_value = "1"

    warmup = config.model_warmup.add(name="zeros_batch_1", batch_size=1)
    warmup.inputs[INPUT_NAME].data_type = pb.TYPE_FP32
    warmup.inputs[INPUT_NAME].dims.extend(layout.observation_shape)
    warmup.inputs[INPUT_NAME].zero_data = True

    config.parameters[LAYOUT_PARAMETER].string_value = layout.to_json()
    return config


def config_path(variant: str) -> str:
    """Where a variant lives inside the model directory."""
    return DEFAULT_CONFIG if variant == "default" else f"configs/{variant}.pbtxt"


def to_text(config: pb.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str) -> pb.ModelConfig:
    """Parse a config.pbtxt; raises ``text_format.ParseError`` on anything Triton would not accept as a ModelConfig."""
    return text_format.Parse(text, pb.ModelConfig())


def render_configs(layout: PolicyLayout, model_name: str, settings: ServingSettings = ServingSettings()) -> dict[str, str]:
    """``{relative path: pbtxt text}`` for all variants, each parsed back to prove it round-trips."""
    rendered = {}
    for variant in CONFIG_VARIANTS:
        config = build_config(layout, model_name, variant, settings)
        text = to_text(config)
        if parse_config(text) != config:
            raise AssertionError(f"{variant} config does not round-trip through text_format")
        rendered[config_path(variant)] = text
    return rendered


def layout_from_model_config(config: pb.ModelConfig) -> PolicyLayout:
    return PolicyLayout.from_json(config.parameters[LAYOUT_PARAMETER].string_value)


def with_instance_count(text: str, count: int) -> str:
    """The same config with every instance group resized to ``count`` (used by ``serve --instances``)."""
    config = parse_config(text)
    for group in config.instance_group:
        group.count = count
    return to_text(config)


def rerender_model_directory(model_dir: str | Path, settings: ServingSettings = ServingSettings()) -> list[Path]:
    """Rewrite every config variant of an exported model with ``settings``, keeping the model's name and layout.

    The layout is read from the directory's ``config.pbtxt`` and must come back from the writer character for
    character (it is the contract clients check); otherwise nothing is written.
    """
    model_dir = Path(model_dir)
    current = parse_config((model_dir / DEFAULT_CONFIG).read_text())
    layout_text = current.parameters[LAYOUT_PARAMETER].string_value
    rendered = render_configs(PolicyLayout.from_json(layout_text), current.name, settings)
    for relative, text in rendered.items():
        if parse_config(text).parameters[LAYOUT_PARAMETER].string_value != layout_text:
            raise ValueError(f"re-rendering {model_dir / relative} would change its layout parameter; nothing written")
    return [atomic_write(model_dir / relative, _writer(text.encode())) for relative, text in rendered.items()]


def _writer(data: bytes):
    return lambda handle: handle.write(data)


if __name__ == "__main__":
    # python -m maddpg_export.triton_config MODEL_DIR...: re-render the configs of exported models with the current
    # ServingSettings() (how model_repository/maddpg_ctde's configs are kept current).
    for directory in sys.argv[1:]:
        for path in rerender_model_directory(directory):
            print(f"wrote {path}")
