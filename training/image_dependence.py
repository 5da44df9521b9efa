"""Does the demo model look at the image? The answer loss of held-out documents (new seeds) per
task, given the document, a blank page of the same size and uniform noise, and the vision tower's
per-token reading accuracy (`training.model.glyph_loss`) on the documents.

A model that reads has a clearly lower loss with the document than with the blank page or the
noise; weights whose three losses are equal answer from the question alone, whatever their loss.

    python -m training.image_dependence --model runs/demo/checkpoint --docs 48
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from glmv.synth import Augment, generate, random_kind
from glmv.synth.fonts import find_fonts
from glmv.synth.lines import TEXT_LINES_KIND, make_text_lines
from glmv.synth.tasks import training_examples
from training.data import Encoder, Sequence, encode_example, glyph_targets
from training.model import (
    Batch,
    MergerTap,
    glyph_loss,
    hidden_states,
    install_cached_position_embeddings,
    install_padded_vision_attention,
)

__all__ = ["IMAGES", "held_out_sequences", "image_dependence", "load_model"]

IMAGES = ("document", "blank", "noise")


def load_model(weights: Path, configs: Path, device: torch.device) -> Any:
    """The transformers model of the `configs` folder with the weights of `weights`, as
    `training.train_demo` trains it."""
    from transformers import AutoConfig, Glm4vForConditionalGeneration

    from training.train_demo import load_weights

    config = AutoConfig.from_pretrained(configs)
    config._attn_implementation = "sdpa"
    model = Glm4vForConditionalGeneration(config).to(device)
    install_padded_vision_attention(model)
    install_cached_position_embeddings(model)
    load_weights(model, weights)
    return model.eval()


def held_out_sequences(enc: Encoder, docs: int, seed: int = 0) -> list[tuple[str, Sequence]]:
    """(group, sequence) of `docs` held-out documents: every fourth one a text strip (group
    `strip`), the others one training example each, grouped by task."""
    fonts = find_fonts()
    rng = random.Random(f"held-out:{seed}")
    out: list[tuple[str, Sequence]] = []
    for i in range(docs):
        if i % 4 == 3:
            doc = make_text_lines(random.Random(rng.randrange(2**40)), fonts, Augment())
        else:
            doc = generate(random_kind(rng), -1 - rng.randrange(2**40), fonts=fonts)
        pixels = enc.images.resize(doc.image)
        grid = (1, pixels.shape[0] // 14, pixels.shape[1] // 14)
        example = training_examples(doc, rng, 1)[0]
        s = encode_example(enc, example, grid)
        group = "strip" if doc.kind == TEXT_LINES_KIND else s.task.replace("extract_other", "extract")
        out.append(
            (group, (s.ids, s.targets, s.positions, s.task, pixels, grid, glyph_targets(enc, doc, pixels)))
        )
    return out


def _swap_image(seq: Sequence, how: str, rng: np.random.Generator) -> Sequence:
    pixels = seq[4]
    if how == "blank":
        pixels = np.full_like(pixels, 255)
    elif how == "noise":
        pixels = rng.integers(0, 256, pixels.shape, dtype=np.uint8)
    return (*seq[:4], pixels, *seq[5:])


@torch.no_grad()
def image_dependence(
    model: Any, enc: Encoder, seqs: list[tuple[str, Sequence]], device: torch.device, batch_size: int = 8
) -> dict[str, Any]:
    """Mean answer loss per token for each group and image (`IMAGES`), and the glyph accuracy."""
    tap = MergerTap(model)
    image_id = int(model.config.image_token_id)
    pad_id = int(model.config.text_config.pad_token_id or 0)
    sums: dict[tuple[str, str], list[float]] = {}
    glyph = [0.0, 0.0]
    noise_rng = np.random.default_rng(0)
    for how in IMAGES:
        for start in range(0, len(seqs), batch_size):
            part = seqs[start : start + batch_size]
            batch = Batch.build([_swap_image(s, how, noise_rng) for _, s in part], enc.images, pad_id, device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                hidden = hidden_states(model, batch.ids, batch.positions, batch.rows, batch.grids, image_id)
                logits = model.lm_head(hidden[:, :-1]).float()
            loss = F.cross_entropy(logits.transpose(1, 2), batch.ids[:, 1:], reduction="none")
            select = batch.targets[:, 1:]
            for row, (group, _) in enumerate(part):
                got = sums.setdefault((group, how), [0.0, 0.0])
                got[0] += float(loss[row][select[row]].sum())
                got[1] += float(select[row].sum())
            if how == "document" and tap.output is not None and batch.glyphs is not None:
                _, acc = glyph_loss(tap.output, batch.glyphs, model.lm_head.weight)
                glyph[0] += float(acc) * len(part)
                glyph[1] += len(part)
            tap.output = None
    groups = sorted({g for g, _ in sums})
    table = {
        g: {how: round(sums[g, how][0] / max(1.0, sums[g, how][1]), 4) for how in IMAGES} for g in groups
    }
    every = {
        how: sum(sums[g, how][0] for g in groups) / max(1.0, sum(sums[g, how][1] for g in groups))
        for how in IMAGES
    }
    table["all"] = {how: round(v, 4) for how, v in every.items()}
    return {"loss": table, "glyph_acc": round(glyph[0] / max(1.0, glyph[1]), 4), "sequences": len(seqs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.image_dependence",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    p.add_argument(
        "--skeleton",
        type=Path,
        help="tokenizer and configs, when --model holds only weights (e.g. glmv/checkpoints/glmv-demo)",
    )
    p.add_argument("--docs", type=int, default=48, help="held-out documents (every fourth a text strip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="also write the result here as JSON")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    configs = args.skeleton or args.model
    enc = Encoder(configs)
    result = image_dependence(
        load_model(args.model, configs, device), enc, held_out_sequences(enc, args.docs, args.seed), device
    )
    print(f"{'group':<10}" + "".join(f"{how:>10}" for how in IMAGES))
    for group, row in result["loss"].items():
        print(f"{group:<10}" + "".join(f"{row[how]:>10.4f}" for how in IMAGES))
    print(f"glyph accuracy (documents): {result['glyph_acc']:.4f} over {result['sequences']} sequences")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
