"""The weight quantizations `load_model` can apply at load, by name (torch-free: the engine's
config validates against it without loading the model stack)."""

from __future__ import annotations

# "fp8": per-channel FP8 (e4m3) weights for the large linear layers, made from bf16 at load.
QUANTIZATIONS = ("fp8",)
