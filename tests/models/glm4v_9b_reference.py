"""A plain eager GLM-4v-9b, written from the published architecture, for tests only.

Independent of glmv's model code: no paging, no batching, no fused modules, float64 throughout,
weights read straight from the checkpoint by their original names. It mirrors how the original
remote code runs a prompt: the unexpanded prompt holds
``<|begin_of_image|><|endoftext|><|end_of_image|>`` per image; those three embeddings are replaced
by the vision output (boi vector, merged patches, eoi vector) and the position ids become
``pos[:boi + 1] + [pos[boi + 1]] * num_patches + pos[eoi:]`` (applied to each image in turn; the
original allows one). Also here: tiktoken's ranked BPE merge and the original prompt rules, so
tests can check glmv's tokenizer and prompt builder against them.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import regex
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------- tokenizer and prompt


class TiktokenReference:
    """tiktoken's algorithm: split with the regex, take a piece whole if it is a token, else
    repeatedly merge the leftmost adjacent pair whose concatenation has the lowest rank."""

    def __init__(self, path: Path) -> None:
        self.ranks: dict[bytes, int] = {}
        for line in (path / "tokenizer.model").read_text().splitlines():
            if line.strip():
                tok, rank = line.split()
                self.ranks[base64.b64decode(tok)] = int(rank)
        n = len(self.ranks)
        self.special = {s: n + i for i, s in enumerate(SPECIALS)}
        self.pattern = regex.compile(SPLIT)

    def _piece(self, piece: bytes) -> list[int]:
        if piece in self.ranks:
            return [self.ranks[piece]]
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            best: tuple[int, int] | None = None
            for i in range(len(parts) - 1):
                r = self.ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return [self.ranks[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            ids.extend(self._piece(piece.encode("utf-8")))
        return ids


def original_prompt(
    tok: TiktokenReference, conversation: list[dict[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """The original apply_chat_template: items {"role", "content", optional "image": True}."""
    s = tok.special
    ids = [s["[gMASK]"], s["<sop>"]]
    for item in conversation:
        prefix = (
            [s["<|begin_of_image|>"], s["<|endoftext|>"], s["<|end_of_image|>"]] if item.get("image") else []
        )
        if item["content"]:
            ids += [s[f"<|{item['role']}|>"], *tok.encode("\n"), *prefix, *tok.encode(item["content"])]
    if add_generation_prompt:
        ids.append(s["<|assistant|>"])
    return ids


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Squash to size×size bicubic, [0, 1], CLIP mean/std → [1, 3, S, S] float64."""
    arr = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


# ------------------------------------------------------------------------------------------- model


class ReferenceGlm4v9b:
    def __init__(self, path: Path) -> None:
        self.cfg = json.loads((path / "config.json").read_text())
        self.w: dict[str, torch.Tensor] = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118
                    self.w[k] = f.get_tensor(k).to(torch.float64)

    # --- vision ---

    def _ln(self, x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], eps)

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def vision(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, S, S] → [(S/28)² + 2, hidden]."""
        vc = self.cfg["vision_config"]
        v = "transformer.vision"
        x = F.conv2d(
            pixels,
            self.w[f"{v}.patch_embedding.proj.weight"],
            self.w[f"{v}.patch_embedding.proj.bias"],
            stride=vc["patch_size"],
        )
        g = x.shape[-1]
        x = x.flatten(2)[0].t()  # [g*g, vh], row-major over (row, col)
        x = (
            torch.cat([self.w[f"{v}.patch_embedding.cls_embedding"], x])
            + self.w[f"{v}.patch_embedding.position_embedding.weight"]
        )
        heads = vc["num_heads"]
        hd = vc["hidden_size"] // heads
        eps = vc["layer_norm_eps"]
        for i in range(vc["num_hidden_layers"]):
            p = f"{v}.transformer.layers.{i}"
            qkv = self._lin(x, f"{p}.attention.query_key_value").view(len(x), 3, heads, hd)
            q, k, vv = (qkv[:, j].transpose(0, 1) for j in range(3))  # [heads, L, hd]
            probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
            attn = (probs @ vv).transpose(0, 1).reshape(len(x), -1)
            x = x + self._ln(self._lin(attn, f"{p}.attention.dense"), f"{p}.input_layernorm", eps)
            mlp = self._lin(F.gelu(self._lin(x, f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
            x = x + self._ln(mlp, f"{p}.post_attention_layernorm", eps)
        x = x[1:].t().reshape(1, -1, g, g)  # drop CLS, back to an image of features
        x = F.conv2d(x, self.w[f"{v}.conv.weight"], self.w[f"{v}.conv.bias"], stride=2)
        x = x.flatten(2)[0].t()
        gl = f"{v}.linear_proj"
        x = F.linear(x, self.w[f"{gl}.linear_proj.weight"])
        x = F.gelu(self._ln(x, f"{gl}.norm1", 1e-5))
        x = F.silu(F.linear(x, self.w[f"{gl}.gate_proj.weight"])) * F.linear(
            x, self.w[f"{gl}.dense_h_to_4h.weight"]
        )
        x = F.linear(x, self.w[f"{gl}.dense_4h_to_h.weight"])
        x = torch.cat([self.w[f"{v}.boi"][0], x, self.w[f"{v}.eoi"][0]])
        return x / vc["scaling_factor"]

    # --- language model ---

    def expand(self, ids: list[int], images: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Input embeddings and position ids of the expanded sequence, the original's way."""
        c = self.cfg
        emb = self.w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
        pos = list(range(len(ids)))
        boi_at = [i for i, t in enumerate(ids) if t == c["boi_token_id"]]
        assert len(boi_at) == len(images)
        pieces: list[torch.Tensor] = []
        positions: list[int] = []
        start = 0
        for b, pixels in zip(boi_at, images, strict=True):
            assert ids[b + 2] == c["eoi_token_id"]
            feats = self.vision(pixels)
            num_patches = len(feats) - 2
            pieces += [emb[start:b], feats]
            positions += pos[start : b + 1] + [pos[b + 1]] * num_patches + [pos[b + 2]]
            start = b + 3
        pieces.append(emb[start:])
        positions += pos[start:]
        return torch.cat(pieces), positions

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        eps = self.cfg["layernorm_epsilon"]
        return self.w[f"{name}.weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def _rope(self, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """x [heads, T, hd]: rotate the first hd/2 dims, pairs (2i, 2i+1) at frequency i."""
        c = self.cfg
        n_elem = c["kv_channels"] // 2
        base = 10000 * c.get("rope_ratio", 1)
        theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float64) / n_elem))
        angle = torch.tensor(positions, dtype=torch.float64)[:, None] * theta  # [T, n_elem/2]
        cos, sin = angle.cos(), angle.sin()
        rot, rest = x[..., :n_elem], x[..., n_elem:]
        xs = rot.reshape(*rot.shape[:-1], n_elem // 2, 2)
        out = torch.stack(
            [xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1
        ).flatten(-2)
        return torch.cat([out, rest], dim=-1)

    def logits(self, ids: list[int], images: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Logits at every position of the expanded sequence, and its position ids."""
        c = self.cfg
        x, positions = self.expand(ids, images)
        t = len(x)
        heads, groups, hd = c["num_attention_heads"], c["multi_query_group_num"], c["kv_channels"]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        for i in range(c["num_layers"]):
            p = f"transformer.encoder.layers.{i}"
            h = self._rms(x, f"{p}.input_layernorm")
            qkv = self._lin(h, f"{p}.self_attention.query_key_value")
            q = qkv[:, : heads * hd].view(t, heads, hd).transpose(0, 1)
            k = qkv[:, heads * hd : (heads + groups) * hd].view(t, groups, hd).transpose(0, 1)
            v = qkv[:, (heads + groups) * hd :].view(t, groups, hd).transpose(0, 1)
            q, k = self._rope(q, positions), self._rope(k, positions)
            # Each KV group serves heads/groups consecutive query heads.
            k = k.repeat_interleave(heads // groups, dim=0)
            v = v.repeat_interleave(heads // groups, dim=0)
            scores = (q @ k.transpose(1, 2)) / math.sqrt(hd)
            scores = scores.masked_fill(~causal, float("-inf"))
            attn = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(t, heads * hd)
            x = x + F.linear(attn, self.w[f"{p}.self_attention.dense.weight"])
            h = self._rms(x, f"{p}.post_attention_layernorm")
            gate, up = F.linear(h, self.w[f"{p}.mlp.dense_h_to_4h.weight"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, self.w[f"{p}.mlp.dense_4h_to_h.weight"])
        x = self._rms(x, "transformer.encoder.final_layernorm")
        return F.linear(x, self.w["transformer.output_layer.weight"]), positions

    def greedy(self, ids: list[int], images: list[torch.Tensor], steps: int) -> tuple[list[int], list[float]]:
        """Greedy tokens (recomputing the whole sequence each step) and their log-probabilities."""
        ids = list(ids)
        out: list[int] = []
        logprobs: list[float] = []
        for _ in range(steps):
            logits, _ = self.logits(ids, images)
            lp = torch.log_softmax(logits[-1], dim=-1)
            tok = int(lp.argmax())
            out.append(tok)
            logprobs.append(float(lp[tok]))
            ids.append(tok)
        return out, logprobs
