"""Triton model configs as data, written through ``model_config_pb2`` (never by pasting strings).

One model directory carries three variants of the same model (same name, tensors, dims and layout):

``config.pbtxt``        production on GPU nodes: onnxruntime backend, a KIND_GPU and a KIND_CPU instance group.
``configs/cpu.pbtxt``   CPU-only nodes (``--model-config-name=cpu``): onnxruntime backend, KIND_CPU only.
``configs/local.pbtxt`` the tritonserver bundled in nvidia-pytriton (``--model-config-name=local``), which has no
                        onnxruntime backend: the python backend runs the same ``model.onnx`` with onnxruntime.

A variant that lists KIND_GPU fails to load on a host without a GPU; the CPU variants never list it.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from maddpg_core.layout import INPUT_NAME, LAYOUT_PARAMETER, OUTPUT_NAME, PolicyLayout

DEFAULT_CONFIG = "config.pbtxt"
CONFIG_VARIANTS = ("default", "cpu", "local")


@dataclass(frozen=True)
class ServingSettings:
    """Knobs of the served model. Defaults were chosen from the benchmarks in ``docs/benchmarks.md``."""

    max_batch_size: int = 4096
    # Dynamic batching: how long the first request of a batch may wait for company, and the queue bound.
    # 0: requests that queue while every instance is busy are still merged (average batch ~3-7 at concurrency 16),
    # but a lone request is not held back; 100-500 us cost every request at concurrency 1 that much and bought no
    # throughput here (docs/benchmarks.md). A GPU deployment with expensive executions may want to raise it.
    max_queue_delay_us: int = 0
    queue_timeout_us: int = 1_000_000       # a request waiting longer than this is rejected, not served late
    max_queue_size: int = 4096              # beyond this the server answers UNAVAILABLE at once
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
    batching.max_queue_delay_microseconds = settings.max_queue_delay_us
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
