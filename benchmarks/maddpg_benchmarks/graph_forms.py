"""The per-agent graph: the same policy as 17 separate MLP branches, built only to compare it with the stacked form.

The exported graph holds the actors *stacked* (agent ``i``'s weights are slice ``i`` of one tensor, one batched
MatMul per layer: ~26 nodes). The obvious alternative is one branch per building (Gather, then Gemm/ReLU per layer,
then a concat: ~170 nodes). Both compute the same actions; which one onnxruntime runs faster is measured, not assumed.
"""

from __future__ import annotations

from pathlib import Path


def node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def layer_widths(path: Path) -> list[tuple[int, int]]:
    """(inputs, outputs) of each layer of one agent's MLP, read from the stacked graph's MatMul weights
    (``[agents, in, out]``): what the report derives hidden sizes and FLOPs from."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    widths = []
    for node in graph.node:
        if node.op_type == "MatMul":
            dims = next((weights[name] for name in node.input if name in weights and len(weights[name]) >= 2), None)
            if dims is not None:
                widths.append((dims[-2], dims[-1]))
    return widths


def flops_per_decision(widths: list[tuple[int, int]]) -> int:
    """One agent's decision: two FLOPs per multiply-add of every layer."""
    return sum(2 * inputs * outputs for inputs, outputs in widths)
