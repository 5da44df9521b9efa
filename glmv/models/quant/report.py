"""How many bytes a loaded model's weights take, split into int4 layers and the rest.

Used by start-up reports (weights vs activations vs KV cache) and by the benchmarks; works on
models on any device, the meta device included (to size a model before building it).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from glmv.models.quant.linear import Int4Linear


@dataclass(slots=True)
class WeightMemory:
    """Weight bytes of one model."""

    total_bytes: int
    int4_bytes: int  # codes, zero points and scales of the Int4Linear layers
    float_bytes: int  # every other parameter and buffer (biases of int4 layers included)
    int4_layers: int
    bf16_equivalent_bytes: int  # the same model with every weight in bf16

    def describe(self) -> str:
        gb = 1e9
        if not self.int4_layers:
            return f"weights {self.total_bytes / gb:.2f} GB"
        return (
            f"weights {self.total_bytes / gb:.2f} GB ({self.int4_layers} int4 layers "
            f"{self.int4_bytes / gb:.2f} GB + other {self.float_bytes / gb:.2f} GB; "
            f"{self.bf16_equivalent_bytes / gb:.2f} GB in bf16)"
        )


def weight_memory(model: nn.Module) -> WeightMemory:
    """Count the bytes of `model`'s parameters and buffers."""
    int4 = 0
    layers = 0
    bf16 = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, Int4Linear):
            layers += 1
            for t in (module.qweight, module.zeros, module.scales):
                int4 += t.numel() * t.element_size()
                seen.add(id(t))
            bf16 += module.in_features * module.out_features * 2
    other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        other += t.numel() * t.element_size()
        bf16 += t.numel() * 2
    return WeightMemory(int4 + other, int4, other, layers, bf16)
