"""Native model code for the GLM vision-language models, checkpoint loading and tiny checkpoints."""
