"""The per-agent graph: the same policy as 17 separate MLP branches, built only to compare it with the stacked form.

The exported graph holds the actors *stacked* (agent ``i``'s weights are slice ``i`` of one tensor, one batched
MatMul per layer: ~26 nodes). The obvious alternative is one branch per building (Gather, then Gemm/ReLU per layer,
then a concat: ~170 nodes). Both compute the same actions; which one onnxruntime runs faster is measured, not assumed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def per_agent_policy(policy):
    """A torch module equal to ``policy`` (a ``PolicyNetwork``) with one ``nn.Sequential`` per agent."""
    import torch
    from torch import nn

    class PerAgentPolicy(nn.Module):
        def __init__(self):
            super().__init__()
            self.normaliser = policy.normaliser
            self.scaler = policy.scaler
            self.register_buffer("action_mask", policy.actors.action_mask.clone())
            stacked = policy.actors.mlp.layers
            branches = []
            for agent in range(policy.layout.n_agents):
                layers = []
                for index, layer in enumerate(stacked):
                    linear = nn.Linear(layer.weight.shape[1], layer.weight.shape[2])
                    with torch.no_grad():
                        linear.weight.copy_(layer.weight[agent].T)
                        linear.bias.copy_(layer.bias[agent, 0])
                    layers.append(linear)
                    if index < len(stacked) - 1:
                        layers.append(nn.ReLU())
                branches.append(nn.Sequential(*layers))
            self.branches = nn.ModuleList(branches)

        def forward(self, observations):
            z = self.normaliser(observations)
            unit = torch.stack([branch(z[:, i]) for i, branch in enumerate(self.branches)], dim=1)
            return self.scaler(torch.tanh(unit) * self.action_mask)

    return PerAgentPolicy().eval()


def export_per_agent(policy, layout, path: Path, reference_onnx: Path, observations: np.ndarray) -> int:
    """Write the per-agent graph of ``policy`` to ``path``; proves it answers as ``reference_onnx``. Returns its node
    count."""
    import onnxruntime as ort

    from maddpg_core.layout import INPUT_NAME, OUTPUT_NAME
    from maddpg_export.onnx_graph import export_onnx

    model = export_onnx(per_agent_policy(policy), layout)
    path.write_bytes(model.SerializeToString())
    feed = {INPUT_NAME: np.ascontiguousarray(observations, dtype=np.float32)}
    ours = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], feed)[0]
    reference = ort.InferenceSession(str(reference_onnx), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], feed)[0]
    worst = float(np.abs(ours - reference).max())
    if worst > 1e-4:
        raise AssertionError(f"the per-agent graph differs from the stacked one by {worst:.2e}")
    return len(model.graph.node)


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
