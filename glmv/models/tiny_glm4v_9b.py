"""Tiny random-weight GLM-4v-9b checkpoints in the original (ChatGLM remote-code) layout.

`create_tiny_glm4v_9b(dir)` writes what the published checkpoint holds, at toy sizes:
``config.json`` (``model_type: chatglm`` with the original keys, a 112×112 vision input instead
of 1120), ``model.safetensors`` (or shards + index) with the original ``transformer.*`` tensor
names (including the ``rotary_pos_emb.inv_freq`` buffer the original saves),
``generation_config.json``, a tiktoken-format ``tokenizer.model`` trained on a small built-in
corpus, and ``tokenizer_config.json`` with the fourteen GLM special tokens right after the BPE
ranks. The checkpoint's remote code (``tokenization_chatglm.py`` etc.) is not written: glmv does
not run it. Weights are seeded; the same call writes the same files. Answers are random text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from glmv.models.tiny import RANDOM_INIT_KEY, RANDOM_WEIGHTS_MARKER
from glmv.processing.chatglm_tokenizer import (
    CHATGLM_SPECIAL_TOKENS,
    TIKTOKEN_FILE,
    byte_level_string,
    write_tiktoken_ranks,
)
from glmv.processing.tiny_tokenizer import GLM_PRETOKENIZE_REGEX

__all__ = ["FULL_9B", "TINY_9B", "Tiny9bSpec", "create_tiny_glm4v_9b", "train_tiny_ranks"]


@dataclass(frozen=True, slots=True)
class Tiny9bSpec:
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_groups: int = 2
    kv_channels: int = 32
    ffn: int = 256
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 128
    image_size: int = 112
    patch_size: int = 14
    seq_length: int = 8192
    bpe_vocab: int = 1000


TINY_9B = Tiny9bSpec()
# The published shape (13.9 B parameters) for GPU speed runs: no weights are written, config.json
# asks the loader to draw them on the device (`glmv.models.tiny.RANDOM_INIT_KEY`).
FULL_9B = Tiny9bSpec(
    hidden=4096,
    layers=40,
    heads=32,
    kv_groups=2,
    kv_channels=128,
    ffn=13696,
    vision_hidden=1792,
    vision_layers=63,
    vision_heads=16,
    vision_intermediate=15360,
    image_size=1120,
)

_CORPUS = """\
The invoice total is $1,895.34 including tax. Payment is due on 2024-04-14.
Describe the image. A red bus is parked in front of a brick building.
What is written on the sign? The sign says "Open 9am - 6pm, closed on Sundays".
The bar chart shows revenue by quarter: Q1 1.2M, Q2 1.5M, Q3 1.4M, Q4 2.1M.
User: Read the receipt and give me the total. Assistant: The total is 14.75.
{"vendor": "Northwind", "date": "2024-03-15", "total": 1895.34, "paid": true}
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
这张图片里有什么？图片中有一辆红色的公交车停在砖砌建筑前。
发票号码：12345678  开票日期：2024年03月15日  价税合计：1895.34元
柱状图显示了各季度的销售额，第四季度增长最快。请描述这张图表。
你好，世界！今天天气很好，我们去公园散步吧。谢谢你的帮助。
"""


def train_tiny_ranks(vocab_size: int = TINY_9B.bpe_vocab) -> dict[bytes, int]:
    """A small tiktoken rank table: the 256 single bytes, then BPE merges learnt (with GLM-4's
    split regex) on a built-in English/Chinese corpus, in merge order. Deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        max_token_length=12,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [line + "\n" for line in _CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines * 3, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    to_byte = {byte_level_string(bytes([b])): b for b in range(256)}

    def as_bytes(text: str) -> bytes:
        return bytes(to_byte[ch] for ch in text)

    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        token = as_bytes(left) + as_bytes(right)
        if token not in ranks:
            ranks[token] = len(ranks)
    return ranks


def _config(spec: Tiny9bSpec, ids: dict[str, Any], padded_vocab: int) -> dict[str, Any]:
    grid = spec.image_size // spec.patch_size
    return {
        "_name_or_path": "glmv/tiny-glm-4v-9b",
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "architectures": ["ChatGLMModel"],
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
        },
        "bias_dropout_fusion": True,
        "boi_token_id": ids["<|begin_of_image|>"],
        "classifier_dropout": None,
        "eoi_token_id": ids["<|end_of_image|>"],
        "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
        "ffn_hidden_size": spec.ffn,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": spec.hidden,
        "kv_channels": spec.kv_channels,
        "layernorm_epsilon": 1.5625e-07,
        "model_type": "chatglm",
        "multi_query_attention": True,
        "multi_query_group_num": spec.kv_groups,
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_layers": spec.layers,
        "original_rope": True,
        "pad_token_id": ids["<|endoftext|>"],
        "padded_vocab_size": padded_vocab,
        "post_layer_norm": True,
        "pre_seq_len": None,
        "prefix_projection": False,
        "rmsnorm": True,
        "rope_ratio": 1,
        "seq_length": spec.seq_length,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.44.0",
        "use_cache": True,
        "vision_config": {
            "dropout_prob": 0.0,
            "hidden_act": "gelu",
            "in_channels": 3,
            "num_hidden_layers": spec.vision_layers,
            "hidden_size": spec.vision_hidden,
            "patch_size": spec.patch_size,
            "num_heads": spec.vision_heads,
            "intermediate_size": spec.vision_intermediate,
            "layer_norm_eps": 1e-06,
            "num_positions": grid * grid + 1,
            "image_size": spec.image_size,
            "scaling_factor": 8,
        },
        RANDOM_WEIGHTS_MARKER: True,
    }


def _weights(spec: Tiny9bSpec, padded_vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random tensors under the original names, scaled so logits are well spread."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return normal(out_f, in_f, std=1.0 / math.sqrt(in_f))

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + normal(dim, std=0.1)

    h, kvc = spec.hidden, spec.kv_channels
    qkv = spec.heads * kvc + 2 * spec.kv_groups * kvc
    w: dict[str, torch.Tensor] = {}
    t = "transformer"
    w[f"{t}.embedding.word_embeddings.weight"] = normal(padded_vocab, h, std=1.0)
    steps = torch.arange(0, kvc // 2, 2, dtype=torch.float32) / (kvc // 2)
    w[f"{t}.rotary_pos_emb.inv_freq"] = 1.0 / (10000**steps)
    for i in range(spec.layers):
        p = f"{t}.encoder.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(h)
        w[f"{p}.self_attention.query_key_value.weight"] = linear(qkv, h)
        w[f"{p}.self_attention.query_key_value.bias"] = normal(qkv, std=0.1)
        w[f"{p}.self_attention.dense.weight"] = linear(h, spec.heads * kvc)
        w[f"{p}.post_attention_layernorm.weight"] = norm(h)
        w[f"{p}.mlp.dense_h_to_4h.weight"] = linear(2 * spec.ffn, h)
        w[f"{p}.mlp.dense_4h_to_h.weight"] = linear(h, spec.ffn)
    w[f"{t}.encoder.final_layernorm.weight"] = norm(h)
    w[f"{t}.output_layer.weight"] = normal(padded_vocab, h, std=2.0 / math.sqrt(h))

    vh, vi, p_sz = spec.vision_hidden, spec.vision_intermediate, spec.patch_size
    grid = spec.image_size // p_sz
    v = f"{t}.vision"
    w[f"{v}.patch_embedding.proj.weight"] = normal(vh, 3, p_sz, p_sz, std=1.0 / math.sqrt(3 * p_sz * p_sz))
    w[f"{v}.patch_embedding.proj.bias"] = normal(vh, std=0.1)
    w[f"{v}.patch_embedding.cls_embedding"] = normal(1, vh, std=0.5)
    w[f"{v}.patch_embedding.position_embedding.weight"] = normal(grid * grid + 1, vh, std=0.5)
    for i in range(spec.vision_layers):
        p = f"{v}.transformer.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(vh)
        w[f"{p}.input_layernorm.bias"] = normal(vh, std=0.1)
        w[f"{p}.attention.query_key_value.weight"] = linear(3 * vh, vh)
        w[f"{p}.attention.query_key_value.bias"] = normal(3 * vh, std=0.1)
        w[f"{p}.attention.dense.weight"] = linear(vh, vh)
        w[f"{p}.attention.dense.bias"] = normal(vh, std=0.1)
        w[f"{p}.mlp.fc1.weight"] = linear(vi, vh)
        w[f"{p}.mlp.fc1.bias"] = normal(vi, std=0.1)
        w[f"{p}.mlp.fc2.weight"] = linear(vh, vi)
        w[f"{p}.mlp.fc2.bias"] = normal(vh, std=0.1)
        w[f"{p}.post_attention_layernorm.weight"] = norm(vh)
        w[f"{p}.post_attention_layernorm.bias"] = normal(vh, std=0.1)
    w[f"{v}.linear_proj.linear_proj.weight"] = linear(h, h)
    w[f"{v}.linear_proj.norm1.weight"] = norm(h)
    w[f"{v}.linear_proj.norm1.bias"] = normal(h, std=0.1)
    w[f"{v}.linear_proj.gate_proj.weight"] = linear(spec.ffn, h)
    w[f"{v}.linear_proj.dense_h_to_4h.weight"] = linear(spec.ffn, h)
    # × 8 so the rows keep a useful size after the model divides them by its scaling factor.
    w[f"{v}.linear_proj.dense_4h_to_h.weight"] = 8.0 * linear(h, spec.ffn)
    w[f"{v}.conv.weight"] = normal(h, vh, 2, 2, std=1.0 / math.sqrt(vh * 4))
    w[f"{v}.conv.bias"] = normal(h, std=0.1)
    # The adapter's output is divided by 8; boi/eoi at the same scale as the image rows.
    w[f"{v}.boi"] = normal(1, 1, h, std=8.0)
    w[f"{v}.eoi"] = normal(1, 1, h, std=8.0)
    return {k: x.contiguous() for k, x in w.items()}


def _tokenizer_config(spec: Tiny9bSpec, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "added_tokens_decoder": {
            str(ids[content]): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for content in CHATGLM_SPECIAL_TOKENS
        },
        "additional_special_tokens": list(CHATGLM_SPECIAL_TOKENS),
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "image_size": spec.image_size,
        "model_input_names": ["input_ids", "attention_mask", "position_ids"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def create_tiny_glm4v_9b(
    out_dir: str | Path, *, seed: int = 0, shards: int = 1, spec: Tiny9bSpec = TINY_9B
) -> Path:
    """Write a tiny random-weight GLM-4v-9b checkpoint to `out_dir` (`shards` > 1 writes
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``) and return its path.

    With ``spec=FULL_9B`` the directory gets the full-size config (vocabulary 151552) and no
    weights: the loader draws them on the device."""
    full = spec.hidden == FULL_9B.hidden and spec.layers == FULL_9B.layers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = train_tiny_ranks(spec.bpe_vocab)
    write_tiktoken_ranks(out / TIKTOKEN_FILE, ranks)
    ids = {content: len(ranks) + i for i, content in enumerate(CHATGLM_SPECIAL_TOKENS)}
    padded_vocab = 151552 if full else ((len(ranks) + len(CHATGLM_SPECIAL_TOKENS) + 63) // 64) * 64
    config = _config(spec, ids, padded_vocab)
    if full:
        config[RANDOM_INIT_KEY] = {"seed": seed, "branch_scale": 0.2}
        config["torch_dtype"] = "bfloat16"
    _write_json(out / "config.json", config)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(spec, ids))
    _write_json(
        out / "generation_config.json",
        {
            "do_sample": True,
            "eos_token_id": config["eos_token_id"],
            "max_length": spec.seq_length,
            "pad_token_id": config["pad_token_id"],
            "temperature": 0.8,
            "top_p": 0.8,
            "transformers_version": "4.44.0",
        },
    )
    for old in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    if full:
        return out
    weights = _weights(spec, padded_vocab, seed)
    if shards <= 1:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(weights)
        weight_map: dict[str, str] = {}
        for k in range(shards):
            part = names[k::shards]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: weights[n] for n in part}, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        total = sum(t.numel() * t.element_size() for t in weights.values())
        _write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )
    return out
