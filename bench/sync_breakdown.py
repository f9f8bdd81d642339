"""Where a full-weight sync's time goes, part by part, against a memcpy of the same bytes.

    .venv/bin/python -m bench.sync_breakdown [--sizes 2M 20M 100M 300M] [--repeats 5]

For the built-in model at each size (bench/scaling.py's `SIZES`, randomly initialised, float32), in
a spawned process of its own with one torch thread and a running vLLM engine, medians of `--repeats`:

- memcpy: one clone of every tensor the sync moves (allocation and copy), the floor of any path
  that copies once;
- write: `safetensors.torch.save_file` of those tensors into a new file in /dev/shm (safetensors
  writes from the tensors' memory: one copy, into freshly allocated tmpfs pages);
- publish: `WeightPublisher.publish`, what the loop calls: the write, plus removing the oldest
  version beyond the three kept (freeing its pages);
- read: inside vLLM's worker, `safe_open(...).get_tensor` of every tensor of a published file
  (a copy out of the file into new tensors);
- load: the model's `load_weights` on tensors already read (the copy into vLLM's parameters,
  through its name mapping onto fused qkv / gate-up parameters);
- reload: `RolloutEngine.reload_weights`, what a rollout worker calls: read + load.

Prints a markdown table with each part in seconds and as a multiple of memcpy, and the whole sync
(publish + reload) against 2 x memcpy. Record it in docs/benchmarks.md with the command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.scaling import SIZES, build, in_process
from bench.sync_cost import median_of


def _read_and_load(worker, weights_dir: str) -> tuple[float, float]:
    """Runs inside vLLM's worker: seconds to read every tensor of the file, then to load them."""
    from safetensors import safe_open

    start = time.perf_counter()
    tensors = []
    for path in sorted(Path(weights_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors += [(name, f.get_tensor(name)) for name in f.keys()]
    read = time.perf_counter() - start
    start = time.perf_counter()
    worker.model_runner.model.load_weights(iter(tensors))
    return read, time.perf_counter() - start


def measure(model_dir: str, repeats: int, device: str) -> dict:
    """Every part, with an engine of its own on `model_dir`."""
    from rollouts.engine import EngineSettings, RolloutEngine

    engine = RolloutEngine(model_dir, EngineSettings(max_model_len=64, dtype="float32", seed=0))
    try:
        return sync_parts(engine, model_dir, repeats)
    finally:
        engine.close()


def sync_parts(engine, model_dir: str, repeats: int) -> dict:
    """The parts of syncing `model_dir`'s weights into the running `engine` (the module docstring)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from rollouts.weight_sync import WeightPublisher, exportable_state_dict, shared_memory_base

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = exportable_state_dict(model)
    size = sum(t.numel() * t.element_size() for t in state.values())
    row = {"bytes": size, "memcpy_s": median_of(repeats, lambda: [t.clone() for t in state.values()])}
    with tempfile.TemporaryDirectory(dir=shared_memory_base()) as scratch:
        files = iter(Path(scratch) / f"w{i}.safetensors" for i in range(repeats))
        row["write_s"] = median_of(repeats, lambda: save_file(state, next(files)))
    publisher = WeightPublisher("sync-breakdown")
    try:
        versions = iter(range(1, 1000))
        row["publish_s"] = median_of(repeats, lambda: publisher.publish(model, next(versions)))
        directory, _ = publisher.publish(model, 999)
        parts = [engine.llm.collective_rpc(_read_and_load, args=(str(directory),))[0] for _ in range(repeats)]
        row["read_s"] = statistics.median(p[0] for p in parts)
        row["load_s"] = statistics.median(p[1] for p in parts)
        row["reload_s"] = median_of(repeats, lambda: engine.reload_weights(directory))
    finally:
        publisher.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["2M", "20M", "100M", "300M"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/sync_breakdown"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        model_dir, parameters = build(size, 64, args.out / f"model-{size}")
        rows.append({"size": size, "parameters": parameters} |
                    in_process(measure, str(model_dir), args.repeats, "cpu", threads=1))
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "sync_breakdown.json").write_text(json.dumps(rows, indent=1))
    parts = ("write", "publish", "read", "load", "reload")
    print("\n| model | MB | memcpy s | " + " | ".join(f"{p} s (x memcpy)" for p in parts) +
          " | publish + reload, x memcpy |")
    print("|---|---|---|" + "---|" * len(parts) + "---|")
    for r in rows:
        cells = " | ".join(f"{r[p + '_s']:.3f} ({r[p + '_s'] / r['memcpy_s']:.1f})" for p in parts)
        print(f"| {r['size']} ({r['parameters'] / 1e6:.1f}M) | {r['bytes'] / 1e6:.1f} | {r['memcpy_s']:.3f} | {cells} | "
              f"{(r['publish_s'] + r['reload_s']) / r['memcpy_s']:.1f} |")


if __name__ == "__main__":
    main()
