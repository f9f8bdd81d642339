"""What one weight sync moves and costs with LoRA: adapter-only against full (merged) weights.

    .venv/bin/python -m bench.lora_sync [--ranks 8 64] [--repeats 5]

For the quickstart's model (2 x 256, 1.5M parameters) and a wider one (8 x 1024, ~100M), with LoRA
adapters of each rank on every attention and MLP projection, publishes the same policy version
both ways through `rollouts.weight_sync.WeightPublisher` (shared memory) and loads it into one
running vLLM engine started with LoRA enabled (`RolloutEngine.reload_weights` for the merged
weights, `RolloutEngine.load_adapter` for the adapter). Prints bytes written, write and load
times (medians of `--repeats`), and the ratios. Record the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from rlpost import lora
from rlpost.lora import LoraSection
from rlpost.modeling import ModelShape, build_model, build_tokenizer, save_pretrained
from rollouts.engine import EngineSettings, RolloutEngine
from rollouts.weight_sync import WeightPublisher, adapter_dir

SHAPES = {"quickstart 2x256": ModelShape(256, 2, 8, 2, 768, 64, 0.0),
          "wide 8x1024": ModelShape(1024, 8, 16, 4, 2816, 64, 0.0)}


def median_of(repeats: int, fn) -> float:
    return statistics.median(fn() for _ in range(repeats))


def measure(label: str, shape: ModelShape, rank: int, repeats: int, work: Path) -> dict:
    tokenizer = build_tokenizer()
    base = build_model(tokenizer, shape, seed=0)
    params = sum(p.numel() for p in base.parameters())
    save_pretrained(base, tokenizer, work / "base")
    model = lora.wrap(base, LoraSection(r=rank, alpha=2.0 * rank))
    with torch.no_grad():  # a trained adapter, not the zero one
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    engine = RolloutEngine(work / "base", EngineSettings(max_model_len=64), lora_rank=rank)
    publisher = WeightPublisher("bench-lora")
    out = {"model": label, "parameters": params, "rank": rank}
    try:
        for form in ("full", "adapter"):
            version = [0 if form == "full" else 1000]
            writes, loads = [], []
            for _ in range(repeats):
                version[0] += 1
                directory, write_s = publisher.publish(model, version[0], form)
                writes.append(write_s)
                loads.append(engine.reload_weights(directory) if form == "full"
                             else engine.load_adapter(adapter_dir(directory), version[0]))
            out[form] = {"bytes": publisher.last_bytes, "write_s": statistics.median(writes),
                         "load_s": statistics.median(loads)}
    finally:
        publisher.close()
        engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for label, shape in SHAPES.items():
        for rank in args.ranks:
            with tempfile.TemporaryDirectory() as work:
                rows.append(measure(label, shape, rank, args.repeats, Path(work)))
    print("| model | parameters | LoRA rank | full sync: bytes, write, vLLM reload | adapter sync: bytes, write, "
          "vLLM add_lora | bytes ratio | sync time ratio (write + load) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f, a = r["full"], r["adapter"]
        print(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['rank']} | {f['bytes'] / 1e6:.2f} MB, "
              f"{1e3 * f['write_s']:.1f} ms, {1e3 * f['load_s']:.1f} ms | {a['bytes'] / 1e6:.3f} MB, "
              f"{1e3 * a['write_s']:.1f} ms, {1e3 * a['load_s']:.1f} ms | {f['bytes'] / a['bytes']:.1f}x fewer | "
              f"{(f['write_s'] + f['load_s']) / (a['write_s'] + a['load_s']):.2f}x |")


if __name__ == "__main__":
    main()
