"""Document extraction and moderation: built-in schemas, prompt presets and moderation policy."""
