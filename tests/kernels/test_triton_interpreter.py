"""The Triton kernels of the CUDA path, run by Triton's interpreter on the CPU: paged decode
attention against its torch statement of the same algorithm and against plain attention, and the
fused RMSNorm, SwiGLU and M-RoPE against the torch code they replace in the model."""

from __future__ import annotations

from tests.kernels.interpreter import requires_triton, run_in_interpreter


@requires_triton
def test_paged_decode_attention_in_interpreter() -> None:
    run_in_interpreter(
        """
import torch
from glmv.kernels.attention import split_decode_reference
from glmv.kernels.triton_decode import num_splits_for, paged_decode_attention
torch.manual_seed(0)
assert num_splits_for(1, 2, 132) == 32 and num_splits_for(64, 2, 132) == 3
for heads, kv_heads, dim, block_size in ((8, 2, 32, 16), (4, 4, 16, 8)):
    lens = [1, 17, 40, 0]  # one token, a block boundary, several blocks, a padding row
    per_seq = max(-(-n // block_size) for n in lens) + 1
    num_blocks = len(lens) * per_seq + 2
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    # Blocks scattered over the cache, in a different order per sequence.
    perm = torch.randperm(num_blocks - 1)[: len(lens) * per_seq] + 1
    tables = perm.view(len(lens), per_seq).to(torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), heads, dim)
    scale = dim ** -0.5
    group = heads // kv_heads
    for splits in (1, 3, 32):  # 32: MAX_SPLITS, most of them empty
        out = paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale, num_splits=splits)
        ref = split_decode_reference(q, k_cache, v_cache, tables, seq_lens, scale, splits)
        assert torch.isfinite(out[:3]).all()
        assert (out[:3] - ref[:3]).abs().max() < 1e-4, (heads, splits)
        for b, n in enumerate(lens[:3]):  # plain softmax attention over the sequence's tokens
            blocks = tables[b, : -(-n // block_size)].long()
            k = k_cache[blocks].reshape(-1, kv_heads, dim)[:n].repeat_interleave(group, dim=1)
            v = v_cache[blocks].reshape(-1, kv_heads, dim)[:n].repeat_interleave(group, dim=1)
            p = torch.softmax(torch.einsum("hd,thd->ht", q[b], k) * scale, dim=-1)
            assert (out[b] - torch.einsum("ht,thd->hd", p, v)).abs().max() < 1e-4
"""
    )


@requires_triton
def test_fused_norm_swiglu_mrope_in_interpreter() -> None:
    run_in_interpreter(
        """
import torch
import torch.nn.functional as F
from glmv.kernels import triton_fused as T
from glmv.models.glm4v import RMSNorm, apply_mrope
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96) + 0.5)
    norm = norm.to(dtype)
    x = torch.randn(5, 96, dtype=dtype) * 3
    res = torch.randn(5, 96, dtype=dtype)
    for r in (None, res):
        got = T.rms_norm(x, norm.weight, 1e-5, r).float()
        want = norm(x, r).float()
        assert (got - want).abs().max() <= tol * want.abs().max(), (dtype, r is None)
    gate_up = torch.randn(3, 2 * 1500, dtype=dtype)  # two column blocks, the second ragged
    gate, up = gate_up.float().split(1500, dim=-1)
    want = (up * F.silu(gate)).to(dtype).float()
    got = T.silu_mul(gate_up).float()
    assert (got - want).abs().max() <= tol * want.abs().max(), dtype
    x = torch.randn(4, 3, 32, dtype=dtype)
    angles = torch.randn(4, 8).repeat_interleave(2, dim=-1)  # rotary dims 16 of 32, pairs
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    want = apply_mrope(x.clone(), cos, sin).float()
    got = T.mrope_(x.clone(), cos, sin).float()
    assert (got - want).abs().max() <= tol * 4, dtype
"""
    )
