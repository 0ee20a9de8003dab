# --- opd/Math-v0 (envs/math) ---
import gymnasium

# Guarded: re-importing this package (e.g. in Ray workers or after importlib.reload) must not re-register.
if "opd/Math-v0" not in gymnasium.registry:
    gymnasium.register(id="opd/Math-v0", entry_point="envs.math.env:MathEnv")
# --- end opd/Math-v0 ---

# --- opd/ALFWorld-v0 (envs/alfworld) ---
import gymnasium  # noqa: E402,F811 - each env's block stands alone

# Guarded like the block above; the entry point is a string so `import envs` never imports textworld/alfworld.
if "opd/ALFWorld-v0" not in gymnasium.registry:
    gymnasium.register(id="opd/ALFWorld-v0", entry_point="envs.alfworld.env:ALFWorldEnv")
# --- end opd/ALFWorld-v0 ---
