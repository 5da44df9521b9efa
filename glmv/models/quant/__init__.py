"""4-bit weight-only quantization: formats, the `Int4Linear` layer, loading AWQ/GPTQ checkpoints,
and `glmv quantize` (AWQ-style activation-aware scaling or round-to-nearest, written in AutoAWQ's
GEMM layout)."""
