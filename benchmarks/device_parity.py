"""Full-size GLM-4.1V / GLM-4.6V-Flash parity on a GPU: glmv vs transformers, bf16, random weights.

Builds transformers' Glm4vForConditionalGeneration from the full-size config on the GPU,
re-draws its weights with a fan-in scale so logits are well spread (the default init makes them
almost uniform, where bf16 noise alone would flip greedy choices), copies the very same tensors
into glmv's model through the checkpoint loader's name mapping, and compares:
  * the last position's logits for one 1120x1120 image + text (relative error, target <= 2e-2);
  * 16 greedy tokens (target: identical).
Also times batch-1 decode for both (eager; no CUDA graphs) as a first data point.

Run on the device machine:  PYTHONPATH=. python3 benchmarks/device_parity.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from glmv.models.config import ModelConfig
from glmv.models.generate import ImageInput, generate
from glmv.models.loader import build_model, load_weights


def main(branch_scale: float = 1.0) -> None:
    """`branch_scale` < 1 shrinks what each residual branch adds (the post-branch norms of the LM,
    the output projections of the vision blocks): a less chaotic random network, closer to how
    trained weights behave."""

    print(f"=== branch scale {branch_scale} ===")

    torch.manual_seed(0)
    dev = torch.device("cuda")
    from gpu_common import copy_bandwidth
    from hf_full import full_size_transformers

    ref, hf_cfg = full_size_transformers(branch_scale, "cuda")
    n_params = sum(p.numel() for p in ref.parameters())
    cfg_dict = json.loads(hf_cfg.to_json_string())
    config = ModelConfig.from_dict(cfg_dict)
    model = build_model(config, torch.bfloat16, dev)
    load_weights(model, ((k, v, "<in-memory>") for k, v in ref.state_dict().items()))
    print(f"params: transformers {n_params:,}  glmv {sum(p.numel() for p in model.parameters()):,}")

    # One 1120x1120 image: grid (1, 80, 80) -> 6400 patches -> 1600 image tokens.
    grid = (1, 80, 80)
    pixels = torch.randn(6400, 1176, generator=torch.Generator().manual_seed(1)).to(dev)
    img_id = config.image_token_id
    prefix = [151331, 151333, 151336, 198, 151339]
    suffix = [151340, *range(1000, 1036), 151337, 198]
    ids = prefix + [img_id] * 1600 + suffix
    input_ids = torch.tensor([ids], device=dev)
    mm = (input_ids == img_id).int()
    kwargs = {
        "input_ids": input_ids,
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([grid], device=dev),
    }
    try:
        with torch.no_grad():
            ref_logits = ref(**kwargs, mm_token_type_ids=mm).logits[0, -1].float()
        kwargs["mm_token_type_ids"] = mm
    except TypeError:
        with torch.no_grad():
            ref_logits = ref(**kwargs).logits[0, -1].float()
    images = [ImageInput(pixels, grid, len(prefix))]

    # glmv last-position logits via a 1-token generate's prefill path.
    from glmv.kernels.metadata import AttentionMetadata
    from glmv.models.positions import ImageGrid, mrope_positions

    n = len(ids)
    bs = 16
    nb = (n + bs - 1) // bs
    t = config.text
    shape = (nb, bs, t.num_key_value_heads, t.head_dim)
    caches = [
        (
            torch.zeros(shape, dtype=torch.bfloat16, device=dev),
            torch.zeros(shape, dtype=torch.bfloat16, device=dev),
        )
        for _ in range(t.num_hidden_layers)
    ]
    pos, _ = mrope_positions(n, [ImageGrid(len(prefix), 1, 40, 40)])
    with torch.inference_mode():
        emb = torch.cat(model.encode_images(pixels, [grid]))
        meta = AttentionMetadata.build(
            query_lens=[n], seq_lens=[n], block_tables=[list(range(nb))], block_size=bs, device=dev
        )
        h = model(input_ids[0], pos.to(dev), caches, meta, emb, input_ids[0] == img_id)
        ours = model.compute_logits(h[-1:])[0]
    rel = ((ours - ref_logits).norm() / ref_logits.norm()).item()
    print(
        f"last-position logits: relative error {rel:.3e} (target <= 2e-2); "
        f"argmax glmv {int(ours.argmax())} transformers {int(ref_logits.argmax())}"
    )

    # 16 greedy tokens each.
    with torch.no_grad():
        out = ref.generate(**kwargs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ref_tokens = out[0, n:].tolist()
    torch.cuda.synchronize()
    ours_tokens = generate(model, ids, images, max_new_tokens=16)
    print(f"greedy 16: transformers {ref_tokens}")
    print(f"greedy 16: glmv         {ours_tokens}")
    print(f"greedy identical: {ref_tokens == ours_tokens}")

    # Batch-1 decode timing, eager, 64 tokens after the image prompt.
    def timed(fn) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    n_new = 64
    with torch.no_grad():
        t_ref_long = timed(
            lambda: ref.generate(**kwargs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        )
        t_ref_short = timed(
            lambda: ref.generate(**kwargs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        )
    t_ours_long = timed(lambda: generate(model, ids, images, max_new_tokens=n_new))
    t_ours_short = timed(lambda: generate(model, ids, images, max_new_tokens=1))
    print(
        f"decode ms/token (eager, batch 1): transformers {(t_ref_long - t_ref_short) / (n_new - 1) * 1e3:.1f}  "
        f"glmv {(t_ours_long - t_ours_short) / (n_new - 1) * 1e3:.1f}"
    )
    print(f"TTFT-ish (prefill+1 token) s: transformers {t_ref_short:.3f}  glmv {t_ours_short:.3f}")
    # Copy bandwidth for the floor.
    bw = copy_bandwidth()
    lm_bytes = sum(
        p.numel() * p.element_size() for n_, p in model.named_parameters() if not n_.startswith("visual.")
    )
    lm_bytes -= model.embed_tokens.weight.numel() * 2  # the embedding is gathered, not read whole
    print(
        f"copy bandwidth {bw / 1e12:.2f} TB/s; LM bytes/step {lm_bytes / 1e9:.2f} GB; "
        f"floor {lm_bytes / bw * 1e3:.2f} ms/token"
    )


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:] or ["1.0"]:
        main(float(arg))
        torch.cuda.empty_cache()
