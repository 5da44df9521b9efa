"""Activation-aware weight quantization (AWQ-style) of glmv's blocks, and round-to-nearest.

For each group of linear layers that read the same input (q/k/v after the input norm, gate/up
after the post-attention norm, down after the `up` half of gate/up, …), AWQ looks for one scale
per input channel `s` such that quantizing `W · diag(s)` and dividing the input by `s` loses the
least: channels that carry large activations get finer steps. The scale is folded into the
operation before (an RMSNorm weight, or the output rows of the previous linear), so the float
model computes exactly the same function and no extra work happens at inference. The search is
AutoAWQ's: `s = x̄^α / w̄^(1−α)` (x̄ the mean |activation| per input channel, w̄ the mean of the
group-normalised |weight|) over a grid of α, plus `s = 1`, keeping the one whose quantized layer
reproduces the float outputs on the calibration activations best. A second search then clips
each group's range (shrinking its largest |weight|) where that lowers the output error (not for
the query/key rows, whose errors the softmax amplifies).

Blocks are processed one at a time with the calibration activations of that block only, so a
9B model quantizes in the memory of its float weights plus one block's activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from glmv.models.quant.int4 import QuantizedWeight, check_group_size, quantize_rtn


@dataclass(slots=True)
class ScaleGroup:
    """Linears sharing one input, and the operation before them that absorbs `1 / s`."""

    linears: list[str]  # module names inside the block
    prev_norm: str | None = None  # an RMSNorm (weight [K]) whose output is the input
    prev_linear: str | None = None  # or a linear whose output rows `prev_rows` are the input
    prev_rows: tuple[int, int] | None = None


@dataclass(slots=True)
class AwqSettings:
    group_size: int = 128
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    max_tokens: int = 2048  # calibration tokens used for the searches (a deterministic subset)


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight  # type: ignore[return-value]


def _subsample(x: torch.Tensor, limit: int) -> torch.Tensor:
    if x.shape[0] <= limit:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, limit, device=x.device).round().long()
    return x.index_select(0, idx)


def _fake_quant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return quantize_rtn(w, group_size).dequantize(torch.float32)


@torch.no_grad()
def search_scale(x: torch.Tensor, w: torch.Tensor, settings: AwqSettings) -> torch.Tensor:
    """The per-input-channel scale `[K]` for linears of stacked weight `w` `[N, K]` reading `x`
    `[T, K]` (both float32)."""
    g = check_group_size(w.shape[1], settings.group_size)
    x_mean = x.abs().mean(0)
    wg = w.abs().view(w.shape[0], -1, g)
    w_mean = (wg / (wg.amax(-1, keepdim=True) + 1e-6)).view_as(w).mean(0)
    ref = x @ w.t()
    best_err = math.inf
    best = torch.ones_like(x_mean)
    candidates: list[torch.Tensor] = [torch.ones_like(x_mean)]
    for i in range(settings.n_grid):
        ratio = i / settings.n_grid
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        candidates.append(s / (s.max() * s.min()).sqrt())
    for s in candidates:
        wq = _fake_quant(w * s, g) / s
        err = (x @ wq.t() - ref).pow(2).mean().item()
        if err < best_err:
            best_err, best = err, s
    return best


@torch.no_grad()
def search_clip(
    x: torch.Tensor, w: torch.Tensor, settings: AwqSettings, *, skip_rows: int = 0
) -> torch.Tensor:
    """`w` with each group clipped to the range that best reproduces `x @ w.T` after quantization;
    the first `skip_rows` output rows are left unclipped."""
    g = check_group_size(w.shape[1], settings.group_size)
    n, k = w.shape
    xs = _subsample(x, 512).view(-1, k // g, g)  # [T, G, g]
    out = w.clone()
    rows = range(skip_rows, n)
    if not rows:
        return out
    batch = max(1, (1 << 24) // max(1, xs.shape[0] * (k // g)))
    for start in range(skip_rows, n, batch):
        wb = w[start : start + batch].view(-1, k // g, g)  # [B, G, g]
        ref = torch.einsum("tgj,bgj->btg", xs, wb)
        max_val = wb.abs().amax(-1, keepdim=True)  # [B, G, 1]
        best_err = torch.full(max_val.shape[:2], math.inf, device=w.device)
        best_max = max_val.clone()
        for i in range(int(settings.clip_max_shrink * settings.clip_grid)):
            cur = max_val * (1 - i / settings.clip_grid)
            clipped = torch.maximum(torch.minimum(wb, cur), -cur)
            q = _fake_quant(clipped.reshape(-1, k), g).view_as(wb)
            err = (torch.einsum("tgj,bgj->btg", xs, q) - ref).pow(2).mean(1)  # [B, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), cur, best_max)
        clipped = torch.maximum(torch.minimum(wb, best_max), -best_max)
        out[start : start + batch] = clipped.view(-1, k)
    return out


def _capture_inputs(
    block: nn.Module, names: Sequence[str], run: Callable[[], None], limit: int
) -> dict[str, torch.Tensor]:
    """Run `run()` with hooks that record the float32 input rows of each named linear."""
    store: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    for name in names:
        module = block.get_submodule(name)

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            store[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {name: _subsample(torch.cat(parts), limit) for name, parts in store.items() if parts}


@torch.no_grad()
def quantize_block(
    block: nn.Module,
    groups: Sequence[ScaleGroup],
    targets: Sequence[str],
    run: Callable[[], None],
    settings: AwqSettings,
    *,
    awq: bool = True,
    no_clip_rows: dict[str, int] | None = None,
) -> tuple[dict[str, QuantizedWeight], set[str]]:
    """Quantize the linears `targets` (names inside `block`) after AWQ scaling of `groups`.

    `run()` must push the calibration inputs through `block` once. Returns the quantized weights
    by name, and the names of the block's float parameters that scaling changed (norm weights,
    biases). The block's float weights are changed in place (scaled, and clipped where chosen).
    """
    changed: set[str] = set()
    feats = _capture_inputs(block, targets, run, settings.max_tokens) if awq or settings.clip else {}
    if awq:
        for group in groups:
            linears = [name for name in group.linears if name in targets and name in feats]
            if not linears:
                continue
            x = feats[linears[0]]
            w = torch.cat([_weight(block.get_submodule(name)).float() for name in linears])
            s = search_scale(x, w, settings)
            if torch.equal(s, torch.ones_like(s)):
                continue
            if group.prev_norm is not None:
                p = block.get_submodule(group.prev_norm).weight
                p.copy_((p.float() / s).to(p.dtype))
                changed.add(f"{group.prev_norm}.weight")
            else:
                assert group.prev_linear is not None and group.prev_rows is not None
                prev = block.get_submodule(group.prev_linear)
                a, b = group.prev_rows
                pw = _weight(prev)
                pw[a:b].copy_((pw[a:b].float() / s[:, None]).to(pw.dtype))
                changed.add(f"{group.prev_linear}.weight")
                if getattr(prev, "bias", None) is not None:
                    prev.bias[a:b].copy_((prev.bias[a:b].float() / s).to(prev.bias.dtype))
                    changed.add(f"{group.prev_linear}.bias")
            for name in linears:
                lw = _weight(block.get_submodule(name))
                lw.copy_((lw.float() * s).to(lw.dtype))
                feats[name] = feats[name] / s
    out: dict[str, QuantizedWeight] = {}
    for name in targets:
        lw = _weight(block.get_submodule(name))
        w = lw.float()
        if settings.clip and name in feats:
            w = search_clip(feats[name], w, settings, skip_rows=(no_clip_rows or {}).get(name, 0))
            lw.copy_(w.to(lw.dtype))
        out[name] = quantize_rtn(w, settings.group_size)
    return out, changed
