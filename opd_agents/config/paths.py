"""Model paths as a config names them: a hub id, a local folder, or `zoo:<name>` for the embedded tiny models."""
from __future__ import annotations

from opd_agents.config.errors import ConfigError

ZOO_PREFIX = "zoo:"


def model_folder(path: str, key: str) -> str:
    """`path` as a model loader takes it (a folder or hub id). A `zoo:` name must have been resolved at the entry
    point (`opd_agents.run.preflight.resolve_models`): loaders never build the zoo themselves."""
    if path.startswith(ZOO_PREFIX):
        raise ConfigError(f"{key} = {path!r} is an unresolved zoo name; resolve it first with "
                          "opd_agents.run.preflight.resolve_models(cfg) (the train / evaluate entry points do)")
    return path
