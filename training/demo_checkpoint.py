"""The demo model's shape and the files of its checkpoint other than the weights.

`write_skeleton(dir)` writes the tokenizer (see `glmv.synth.tokenizer`), `config.json` (GLM-4.1V
architecture, transformers-5 keys, tied embeddings, the `glmv_demo_model` card), the image
processor's and the generation config. `save_weights` writes a state dict under the transformers
names (bf16, sharded when asked) next to them, so the folder loads in glmv and in transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from glmv.models.demo import DEMO_CARD_KEY, DEMO_DESCRIPTION
from glmv.models.tiny import RANDOM_WEIGHTS_MARKER, TinySpec, _config, _preprocessor_config

__all__ = ["DEMO_SPEC", "save_weights", "write_skeleton"]

# Text: hidden 256, 6 layers, 4 heads (head_dim 64) / 2 KV heads; vision: 8 blocks of 192.
# 400 image tokens at most (e.g. 672x420 or 392x784 pixels). About 9.3 M parameters, 19 MB in bf16.
DEMO_SPEC = TinySpec(
    template="glm41v",
    config_style="v5",
    hidden=256,
    intermediate=768,
    layers=6,
    heads=4,
    kv_heads=2,
    mrope_section=(4, 6, 6),
    vision_depth=8,
    vision_hidden=192,
    vision_heads=3,
    vision_image_size=336,
    max_image_tokens=400,
)
VOCAB_SIZE = 4096


def write_skeleton(out: str | Path, *, documents: int = 1400, command: str = "") -> dict[str, Any]:
    """Write everything but the weights into `out`; returns the config."""
    from glmv.synth.tokenizer import write_demo_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = write_demo_tokenizer(out, vocab_size=VOCAB_SIZE, documents=documents)
    keys = (
        "image_token_id",
        "video_token_id",
        "image_start_token_id",
        "image_end_token_id",
        "video_start_token_id",
        "video_end_token_id",
        "pad_token_id",
    )
    ids: dict[str, Any] = {k: int(info.special_ids[k]) for k in keys}
    ids["eos_token_ids"] = [int(t) for t in info.special_ids["eos_token_ids"]]
    vocab = ((info.vocab_size + 63) // 64) * 64
    config = _config(DEMO_SPEC, vocab, ids)
    config.pop(RANDOM_WEIGHTS_MARKER, None)
    config["tie_word_embeddings"] = True
    config["text_config"]["tie_word_embeddings"] = True
    config["dtype"] = "bfloat16"
    config[DEMO_CARD_KEY] = {
        "description": DEMO_DESCRIPTION,
        "trained_on": "synthetic documents from glmv.synth (receipts, VAT invoices, ID cards, business "
        "licenses, business cards, tables, chat screenshots) in English and Chinese",
        "command": command,
    }
    (out / "config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "preprocessor_config.json").write_text(
        json.dumps(_preprocessor_config(DEMO_SPEC), indent=2) + "\n", encoding="utf-8"
    )
    generation = {
        "eos_token_id": ids["eos_token_ids"],
        "pad_token_id": ids["pad_token_id"],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return config


def save_weights(
    state: dict[str, torch.Tensor], out: str | Path, *, shard_bytes: int | None = None
) -> list[Path]:
    """Save `state` (transformers names) as bf16 safetensors; tied `lm_head.weight` is left out.
    With `shard_bytes`, files above it are split and `model.safetensors.index.json` written."""
    out = Path(out)
    tensors = {
        k: v.detach().to("cpu", torch.bfloat16).contiguous()
        for k, v in state.items()
        if k != "lm_head.weight"
    }
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if shard_bytes is None or total <= shard_bytes:
        path = out / "model.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        return [path]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        paths.append(out / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths
