"""Per-byte cost of each weight-sync path, for docs/scaling.md's estimates.

    .venv/bin/python -m bench.sync_cost [--repeats 5]

For the 8 x 1024 model of bench/lora_sync.py (90M parameters, 361 MB in float32), medians of
`--repeats`:
- memcpy: copying every tensor of the state dict once (`torch.Tensor.clone`), the floor;
- publish: the learner writing the full weights to shared memory (`WeightPublisher.publish`);
- object store: what a Ray actor on another node costs beyond that: reading the published files,
  `ray.put`, and an actor fetching them and writing its local copy (`RolloutActor._local_copy`),
  here within one node, so without the network (add bytes / link bandwidth for that);
- vLLM reload: bench/lora_sync.py's figure (`reload_weights` of the same bytes), in docs/benchmarks.md.
Each as seconds and GB/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.lora_sync import SHAPES
from rlpost.modeling import build_model, build_tokenizer
from rollouts.weight_sync import WeightPublisher


def median_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(build_tokenizer(), SHAPES["wide 8x1024"], seed=0)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in state.values())
    publisher = WeightPublisher("sync-cost")
    rows = {}
    try:
        rows["memcpy (clone every tensor)"] = median_of(args.repeats, lambda: [t.clone() for t in state.values()])
        version = iter(range(1, 1000))
        rows["publish to /dev/shm (safetensors)"] = median_of(args.repeats,
                                                              lambda: publisher.publish(model, next(version)))
        directory, _ = publisher.publish(model, 999)
        import ray

        from rollouts.transport import RolloutActor

        ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")

        @ray.remote(num_cpus=1)
        class Receiver(RolloutActor):
            def receive(self, version, files):
                return str(self._local_copy(version, files))

        receiver = Receiver.remote(None)

        def object_store():
            root = Path(directory)
            files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
            ray.get(receiver.receive.remote(next(version), ray.put(files)))

        object_store()  # the actor's first call starts its process
        rows["object store (read, put, actor fetch + local write)"] = median_of(args.repeats, object_store)
        ray.get(receiver.close.remote())
        ray.shutdown()
    finally:
        publisher.close()
    print(f"\n{size / 1e6:.0f} MB of float32 weights (8 x 1024 model), medians of {args.repeats}\n")
    print("| path | seconds | GB/s | x memcpy |")
    print("|---|---|---|---|")
    floor = rows["memcpy (clone every tensor)"]
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.3f} | {size / seconds / 1e9:.2f} | {seconds / floor:.1f} |")


if __name__ == "__main__":
    main()
