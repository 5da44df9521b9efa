"""How far is bf16 from exact on the full-size model, for glmv and for transformers alike?

A random 40-layer network amplifies rounding, so the bf16 comparison in device_parity.py is
judged against the noise floor: both bf16 implementations are compared with a float32 reference
(glmv's float32 model, itself equal to transformers to 1e-6 on the tiny checkpoints), and the
prefill is profiled.

Run on the device machine:  PYTHONPATH=. python3 benchmarks/device_parity_fp32.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from glmv.kernels.metadata import AttentionMetadata
from glmv.models.config import ModelConfig
from glmv.models.loader import build_model, load_weights
from glmv.models.positions import ImageGrid, mrope_positions


def glmv_logits(model, ids, pixels, grid, offset, dev):
    n = len(ids)
    bs = 16
    nb = (n + bs - 1) // bs
    t = model.config.text
    shape = (nb, bs, t.num_key_value_heads, t.head_dim)
    caches = [
        (torch.zeros(shape, dtype=model.dtype, device=dev), torch.zeros(shape, dtype=model.dtype, device=dev))
        for _ in range(t.num_hidden_layers)
    ]
    pos, _ = mrope_positions(n, [ImageGrid(offset, 1, grid[1] // 2, grid[2] // 2)])
    x = torch.tensor(ids, device=dev)
    with torch.inference_mode():
        emb = torch.cat(model.encode_images(pixels, [grid]))
        meta = AttentionMetadata.build(
            query_lens=[n], seq_lens=[n], block_tables=[list(range(nb))], block_size=bs, device=dev
        )
        h = model(x, pos.to(dev), caches, meta, emb, x == model.config.image_token_id)
        return model.compute_logits(h[-1:])[0].float()


def main() -> None:

    dev = torch.device("cuda")
    from hf_full import full_size_transformers

    ref, hf_cfg = full_size_transformers(1.0, "cuda")
    config = ModelConfig.from_dict(json.loads(hf_cfg.to_json_string()))
    grid = (1, 80, 80)
    pixels = torch.randn(6400, 1176, generator=torch.Generator().manual_seed(1)).to(dev)
    img = config.image_token_id
    prefix = [151331, 151333, 151336, 198, 151339]
    ids = prefix + [img] * 1600 + [151340, *range(1000, 1036), 151337, 198]
    input_ids = torch.tensor([ids], device=dev)
    kw = {
        "input_ids": input_ids,
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([grid], device=dev),
        "mm_token_type_ids": (input_ids == img).int(),
    }
    with torch.no_grad():
        hf_bf16 = ref(**kw).logits[0, -1].float()
        ref.set_attn_implementation("eager")
        hf_bf16_eager = ref(**kw).logits[0, -1].float()

    ours16 = build_model(config, torch.bfloat16, dev)
    load_weights(ours16, ((k, v, "<mem>") for k, v in ref.state_dict().items()))
    g16 = glmv_logits(ours16, ids, pixels, grid, len(prefix), dev)
    # Profile glmv's bf16 prefill.
    from torch.profiler import ProfilerActivity, profile

    glmv_logits(ours16, ids, pixels, grid, len(prefix), dev)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        glmv_logits(ours16, ids, pixels, grid, len(prefix), dev)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    del ours16
    torch.cuda.empty_cache()

    sd = {k: v for k, v in ref.state_dict().items()}
    del ref
    torch.cuda.empty_cache()
    ours32 = build_model(config, torch.float32, dev)
    load_weights(ours32, ((k, v, "<mem>") for k, v in sd.items()))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g32 = glmv_logits(ours32, ids, pixels, grid, len(prefix), dev)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    print(
        f"relative error vs float32 reference: transformers bf16 (sdpa) {rel(hf_bf16, g32):.3e}; "
        f"transformers bf16 (eager) {rel(hf_bf16_eager, g32):.3e}; glmv bf16 {rel(g16, g32):.3e}"
    )
    print(
        f"transformers sdpa vs eager (both bf16): {rel(hf_bf16, hf_bf16_eager):.3e}; glmv bf16 vs transformers bf16: {rel(g16, hf_bf16):.3e}"
    )
    top = torch.topk(g32, 2).values
    print(
        f"float32 top-2 logit margin at the last position: {float(top[0] - top[1]):.3f}; "
        f"argmax fp32 {int(g32.argmax())} glmv-bf16 {int(g16.argmax())} hf-bf16 {int(hf_bf16.argmax())}"
    )


if __name__ == "__main__":
    main()
