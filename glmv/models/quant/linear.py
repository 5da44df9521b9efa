"""`Int4Linear`: a drop-in `nn.Linear` whose weight is held as 4-bit codes.

Buffers in glmv's layout (see `glmv.models.quant.int4`): `qweight` int32 `[K/8, N]` (stored
K-major: the transpose of a contiguous `[N, K/8]`), `zeros` uint8 and `scales` float16 `[K/g, N]`,
plus an optional `bias` parameter in the model dtype.

* On CUDA the forward runs the Triton kernels of `glmv.kernels.int4_triton`, imported on first
  use so that nothing on the CPU path needs Triton.
* Elsewhere the weight is dequantized to the activation dtype and the product is a plain
  matmul: small weights are dequantized once and cached (the float copy then costs what the
  unquantized layer would), large ones a few groups at a time on every call, so that memory stays
  at the 4-bit size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from glmv.models.quant.int4 import PACK, check_group_size, dequantize_packed, int4_matmul_reference

# Weights up to this many elements keep a dequantized copy on non-CUDA devices.
CACHE_MAX_ELEMENTS = 1 << 24


class Int4Linear(nn.Module):
    """`y = x @ W.T + b` with `W` stored as int4 codes, per-group float16 scales and zero points."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        group_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % PACK != 0:
            raise ValueError(f"in_features {in_features} is not a multiple of {PACK}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = check_group_size(in_features, group_size)
        groups = in_features // self.group_size
        # `[K/8, N]` stored K-major: each output channel's words are contiguous, which is what the
        # CUDA kernels read in 16-byte runs. Loading copies into it, so any source layout works.
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features // PACK, dtype=torch.int32, device=device).t()
        )
        self.register_buffer("zeros", torch.zeros(groups, out_features, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        self._cache: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}"
        )

    def invalidate_cache(self) -> None:
        """Forget the dequantized copy (call after writing new codes into the buffers)."""
        self._cache = None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The `[out, in]` weight this layer multiplies by, `(q - z) * s` rounded once to `dtype`."""
        return dequantize_packed(self.qweight, self.zeros, self.scales, self.group_size, dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cuda":
            from glmv.kernels.int4_triton import int4_matmul

            y = int4_matmul(x2, self.qweight, self.zeros, self.scales, self.group_size, self.bias)
        elif self.in_features * self.out_features <= CACHE_MAX_ELEMENTS:
            cache = self._cache
            if cache is None or cache.dtype != x2.dtype or cache.device != x2.device:
                cache = self._cache = self.dequantized_weight(x2.dtype).contiguous()
            y = F.linear(x2, cache, self.bias)
        else:
            y = int4_matmul_reference(x2, self.qweight, self.zeros, self.scales, self.group_size, self.bias)
        return y.reshape(*shape[:-1], self.out_features)


def replace_linears(
    model: nn.Module,
    names: Iterable[str],
    group_size: int,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, Int4Linear]:
    """Swap the `nn.Linear` modules called `names` for `Int4Linear`s of the same shape, created on
    the linear's own device (use the meta device to build a model without allocating it)."""
    swapped: dict[str, Int4Linear] = {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not a Linear")
        new = Int4Linear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            group_size=group_size,
            dtype=dtype or old.weight.dtype,
            device=old.weight.device,
        )
        setattr(parent, leaf, new)
        swapped[name] = new
    return swapped


def quantizable_linears(model: nn.Module, group_size: int, *, skip: Iterable[str] = ()) -> list[str]:
    """Names of the `nn.Linear` layers that 4-bit quantization applies to: those whose input
    width the group size divides, except where a `skip` entry is part of the name (AWQ's
    `modules_to_not_convert` rule)."""
    skip = tuple(skip)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or any(s in name for s in skip):
            continue
        try:
            check_group_size(module.in_features, group_size)
        except ValueError:
            continue
        names.append(name)
    return names


@torch.no_grad()
def random_init_int4(model: nn.Module, *, seed: int = 0, branch_scale: float = 1.0) -> None:
    """Fill every `Int4Linear` with round-to-nearest codes of a random fan-in-scaled weight, drawn
    on the layer's device one layer at a time (the scales `glmv.models.loader.random_init` uses)."""
    from glmv.models.quant.int4 import quantize_rtn, to_packed

    for index, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module, Int4Linear):
            continue
        dev = module.qweight.device
        gen = torch.Generator(device=dev).manual_seed(seed * 100003 + index)
        if name == "lm_head":
            std = 2.0 / module.in_features**0.5
        elif name.startswith("visual.blocks") and ("attn.proj" in name or "down_proj" in name):
            std = branch_scale / module.in_features**0.5
        else:
            std = 1.0 / module.in_features**0.5
        w = torch.empty(module.out_features, module.in_features, device=dev).normal_(0.0, std, generator=gen)
        packed = to_packed(quantize_rtn(w, module.group_size))
        module.qweight.copy_(packed.qweight)
        module.zeros.copy_(packed.zeros)
        module.scales.copy_(packed.scales)
        module.invalidate_cache()
