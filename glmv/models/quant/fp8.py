"""`Fp8Linear` and the conversion of a loaded model's linear layers to FP8 weights.

`--quantization fp8` needs no calibration and no special checkpoint: the bf16 (or fp32) weights
of every large linear layer are rounded at load to e4m3 with one float32 scale per output
channel (absmax / 448), which halves their bytes. The product runs on FP8 tensor cores where the
GPU has them (`glmv.kernels.fp8`); a GPU without them is refused with a clear error, since the
dequantizing fallback would be slower than bf16. On the CPU the dequantizing reference serves
(for tests and small models).
"""

from __future__ import annotations

import torch
from torch import nn

from glmv.errors import ConfigError
from glmv.kernels.fp8 import FP8_DTYPE, dequantize_rows, fp8_linear, quantize_rows, supports_fp8

# Layers whose names contain one of these stay in the model dtype: the output head decides every
# sampled token and is where rounding hurts most; embeddings are not linear layers anyway.
DEFAULT_SKIP = ("lm_head",)
# cuBLASLt's FP8 GEMM needs both weight dimensions to be multiples of 16.
_ALIGN = 16


class Fp8Linear(nn.Module):
    """`y = x @ (W * s).T + b` with `W` held as e4m3 codes [out, in] and `s` float32 [out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """The FP8 copy of `linear` (same device; the bias keeps its dtype)."""
        w = linear.weight
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            dtype=w.dtype,
            device=w.device,
        )
        codes, scale = quantize_rows(w)
        new.weight.copy_(codes)
        new.weight_scale.copy_(scale)
        if linear.bias is not None and new.bias is not None:
            new.bias.copy_(linear.bias)
        return new

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = fp8_linear(x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.bias)
        return y.reshape(*shape[:-1], self.out_features)


def fp8_linear_names(model: nn.Module, *, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[str]:
    """The `nn.Linear` layers that FP8 conversion applies to (aligned shapes, not skipped)."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(s in name for s in skip):
            continue
        if module.in_features % _ALIGN or module.out_features % _ALIGN:
            continue
        names.append(name)
    return names


def check_fp8_device(device: torch.device) -> None:
    """Refuse a CUDA device without FP8 tensor cores (the CPU runs the reference path)."""
    if device.type == "cuda" and not supports_fp8(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(
            f"FP8 weights need a GPU with FP8 tensor cores (compute capability 8.9+: Ada such as the "
            f"RTX 4090/L4/L40S, or Hopper such as the H100/H200); {torch.cuda.get_device_name(device)} "
            f"is {major}.{minor}. Serve bf16, or INT4 weights (`glmv quantize`)."
        )


@torch.no_grad()
def convert_to_fp8(model: nn.Module, *, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[str]:
    """Swap the model's eligible linear layers for `Fp8Linear`s in place, one layer at a time
    (peak memory: the model plus one layer's codes); returns the converted names."""
    names = fp8_linear_names(model, skip=skip)
    if names:
        check_fp8_device(next(model.parameters()).device)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, Fp8Linear.from_linear(getattr(parent, leaf)))
    return names
