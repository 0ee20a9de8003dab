"""The embedded tiny model zoo: a locally trained tokenizer and tiny Qwen2-architecture models.

No model hub is reachable on a fresh machine, so the default configs run on models this package builds.
They are saved with `save_pretrained` and loaded back through the same `from_pretrained` path real models use.
``opd_agents.zoo.resolve.resolve_model_path("zoo:<name>")`` gives the built folder (building the zoo on first use);
importing the package stays light (no torch / transformers until a build is needed).
"""
from opd_agents.zoo.paths import ZOO_NAMES

__all__ = ["ZOO_NAMES"]
