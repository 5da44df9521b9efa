"""transformers' full-size GLM-4.1V / GLM-4.6V-Flash on the GPU with random weights, for the
device scripts that compare glmv with it.

transformers' default `Glm4vConfig` lacks the real rope settings, so they are set here. The
weights are re-drawn with a fan-in scale so logits are spread (the default init makes them almost
uniform); `branch_scale` < 1 shrinks what each residual branch adds, a less chaotic random network.
"""

from __future__ import annotations

import math
from typing import Any

import torch

ROPE = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "mrope_section": [8, 12, 12],
    "partial_rotary_factor": 0.5,
}


def full_size_transformers(branch_scale: float = 1.0, device: str = "cuda", seed: int = 0) -> tuple[Any, Any]:
    """`(Glm4vForConditionalGeneration in bf16 on device, its config)`."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    dev = torch.device(device)
    hf_cfg = Glm4vConfig(text_config={"rope_parameters": dict(ROPE)})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(dev):
        model = Glm4vForConditionalGeneration(hf_cfg).eval()
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "post_self_attn_layernorm" in name or "post_mlp_layernorm" in name:
                p.fill_(branch_scale)
            elif name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif p.ndim == 1:
                p.normal_(0.0, 0.02, generator=gen)
            elif "embed_tokens" in name or "position_embedding" in name:
                p.normal_(0.0, 1.0, generator=gen)
            elif name == "lm_head.weight":
                p.normal_(0.0, 2.0 / math.sqrt(p.shape[1]), generator=gen)
            else:
                vision_out = "visual.blocks" in name and ("attn.proj" in name or "down_proj" in name)
                scale = branch_scale if vision_out else 1.0
                p.normal_(0.0, scale / math.sqrt(p[0].numel()), generator=gen)
    return model, hf_cfg
