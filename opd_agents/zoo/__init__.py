"""The embedded tiny model zoo: a locally trained tokenizer and tiny Qwen2-architecture models.

No model hub is reachable on a fresh machine, so the default configs run on models this package builds.
They are saved with `save_pretrained` and loaded back through the same `from_pretrained` path real models use.
"""
