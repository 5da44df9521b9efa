"""Turning user input into model input: images, media fetching, tokenizer, chat template, detokenizer,
and the reasoning parser that splits the model's output back into reasoning and answer."""
