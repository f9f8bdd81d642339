#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU (H100/H200): at most ~8 minutes from a bare machine
# that can reach the package registries. Prints, in order:
#   1. vLLM CUDA generation tokens/s for a randomly initialised ~0.5B model (against transformers
#      `generate`), learner tokens/s, and the shared-memory weight-sync time against a memcpy of the
#      same bytes (bench/scaling.py, size 500M);
#   2. weight sync by path: shared memory is (1); rlpost has no CUDA IPC or NCCL path yet, which
#      this says rather than measures;
#   3. the async step ratio against its bounds (bench/async_pipeline.py, sync and async layouts);
#   4. the bench/vs_trl.py comparison, both sides on the GPU.
# Usage: bash bench/gpu_suite.sh [OUT]   (default runs/gpu_suite). Not run yet: no GPU was lent to
# the sessions that wrote it (docs/benchmarks.md says so). Nothing in CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_suite}"
start=$SECONDS
nvidia-smi -L
[ -x .venv/bin/python ] || bash scripts/setup.sh
mkdir -p "$out"
step() { echo; echo "== $1 ($((SECONDS - start)) s so far)"; }

step "1. generation, learner and weight sync, ~0.5B parameters"
.venv/bin/python -m bench.scaling --device cuda --sizes 500M --lengths 128 512 --prompts 64 --out "$out/scaling"

step "2. weight sync by path"
echo "shared memory (/dev/shm safetensors + the model's load_weights in vLLM): the sync columns of 1"
echo "CUDA IPC: not implemented in rlpost; NCCL broadcast: not implemented in rlpost"

step "3. async step time against its bounds"
.venv/bin/python -m bench.async_pipeline --steps 40 --warmup 10 --layouts sync async --root "$out/async"

step "4. rlpost against TRL's GRPOTrainer"
.venv/bin/python -m bench.vs_trl --steps 60 --eval-every 20 --root "$out/vs_trl"

echo; echo "gpu suite done in $((SECONDS - start)) s"
