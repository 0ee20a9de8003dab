"""The project's Gymnasium text environments, registered under the `opd/` namespace on import.

An env author's front door: an environment is a `gymnasium.Env` with `spaces.Text` observation and action spaces
whose `step` answers malformed actions with textual feedback (never an exception) and sets `info["success"]` at the
episode's end; it brings its own prompt adapter (`envs/adapter.py`: observation -> chat messages, model text ->
action). Register it with `gymnasium.register` (a string entry point, so importing `envs` stays cheap) and name its id
in a config's `tasks[].env_id`; an env outside this package registers from a module listed in `run.imports`.

Registered here: `opd/Math-v0` (`envs/math`, a math verifier) and `opd/ALFWorld-v0` (`envs/alfworld`, ALFWorld text
games on the real alfworld/TextWorld engine).
"""
import gymnasium

# Guarded: re-importing this package (e.g. in Ray workers or after importlib.reload) must not re-register.
# --- opd/Math-v0 (envs/math) ---
if "opd/Math-v0" not in gymnasium.registry:
    gymnasium.register(id="opd/Math-v0", entry_point="envs.math.env:MathEnv")
# --- end opd/Math-v0 ---

# --- opd/ALFWorld-v0 (envs/alfworld): the entry point is a string, so `import envs` never imports textworld ---
if "opd/ALFWorld-v0" not in gymnasium.registry:
    gymnasium.register(id="opd/ALFWorld-v0", entry_point="envs.alfworld.env:ALFWorldEnv")
# --- end opd/ALFWorld-v0 ---
