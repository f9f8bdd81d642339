"""The learner's side of N rollout workers: which prompts each generates, with which weights, and restarts.

Batch `b`, what the learner trains on at step `b`, is prompts `first(b) .. first(b) + G - 1` of the
stream, `first(b) = start_prompt_index + (b - start_batch) * G` (G = groups_per_batch). It is cut
into `min(workers, G)` contiguous chunks whose sizes differ by at most one; each chunk goes to one
worker, and a batch is complete when all its chunks are in.

Dispatch (a throttle; the bound itself is applied by `rollouts.buffer.StalenessGate` when the
learner takes the batch). Requests reach a worker in the order sent, so a chunk sent after
weights `v_w` is generated with `v_w` or newer. A worker gets chunk `(b, c)` only if
`b - v_w <= max_staleness` (`may_generate`), where `v_w` is the newest version sent to it; it holds
at most one chunk at a time, and chunks go out lowest batch first. So with max_staleness 0 the N
workers generate batch b's chunks together with the weights of version b; with max_staleness k
they also run up to k batches ahead.

Faults. A worker that dies (killed, crashed, its node lost) is started again on the stage's input
and sent the newest published weights once its engine is up; the chunk and generate requests it
held are sent again. A chunk reaches
the learner as one message, whole or not at all, so no prompt is lost or trained on twice.
`max_restarts` deaths in a row without a completed chunk in between stop the run with the
worker's last error; a worker that fails before its engine is up stops it at once.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from rollouts.buffer import RolloutGroup, may_generate
from rollouts.transport import Transport
from rollouts.worker import WorkerSpec, reward_metrics

log = logging.getLogger("rollouts.fleet")


@dataclass
class _Worker:
    sent_version: int                   # newest weights sent to it (it generates with these or newer)
    acked_version: int = -1             # newest weights it has confirmed loading
    ready: bool = False
    chunk: tuple[int, int] | None = None                     # (batch, chunk) in flight
    requests: dict[str, tuple] = field(default_factory=dict)  # generate requests in flight, by tag
    error: str | None = None
    pool_stats: dict[str, float] = field(default_factory=dict)


class RolloutFleet:
    """N workers behind one `Transport`; see the module docstring. `spec.start_*` say where the
    stream, the batches and the weights stand (a resumed run starts them at its checkpoint)."""

    def __init__(self, spec: WorkerSpec, transport: Transport, workers: int = 1, max_restarts: int = 3,
                 on_event=None):
        """`on_event(record)`: called with a dict for every worker start and death (the loop's workers.jsonl)."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.spec, self.transport, self.max_restarts = spec, transport, max_restarts
        size = spec.groups_per_batch
        chunks = min(workers, size)
        self.chunk_sizes = [size // chunks + (1 if c < size % chunks else 0) for c in range(chunks)]
        self.chunk_offsets = [sum(self.chunk_sizes[:c]) for c in range(chunks)]
        self.latest: tuple[int, str | None] = (spec.start_version, spec.start_weights)
        self.workers = {w: _Worker(sent_version=spec.start_version) for w in range(workers)}
        self._next = (spec.start_batch, 0)  # the next chunk never sent
        self._again: list[tuple[int, int]] = []  # chunks to send again (their worker died)
        self._arrived: dict[int, dict[int, tuple[list[RolloutGroup], dict]]] = {}
        self._generations: dict[str, list] = {}
        self._sent_at: dict[int, float] = {}
        self._acks: dict[int, list[tuple[int, float, float]]] = {}  # version -> [(worker, reload_s, at)]
        self._dead_pool_stats: dict[str, float] = {}
        self.restarts = 0
        self._deaths_in_a_row = 0
        self.startup_s: float | None = None
        self.lora_sync: str | None = None
        self._on_event = on_event or (lambda record: None)

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 600.0) -> None:
        """Start every worker and wait until all engines are up."""
        for worker_id in self.workers:
            self.transport.start(worker_id, self.spec)
        self._pump_until(lambda: all(w.ready for w in self.workers.values()), timeout_s, "engine start")

    def close(self) -> None:
        self.transport.close()

    def _relaunch(self, worker_id: int) -> None:
        """Start a replacement on the stage's input weights; the newest ones follow once it is up (a
        directory named now may be rotated away while the engine starts)."""
        old = self.workers[worker_id]
        self.workers[worker_id] = _Worker(sent_version=-1, requests=old.requests)
        self.transport.start(worker_id, dataclasses.replace(self.spec, start_weights=None))

    # ------------------------------------------------------------------ the learner's calls
    def publish(self, version: int, directory: str) -> None:
        """Send weights `version` (a published directory) to every worker; later chunks carry it."""
        self.latest = (version, str(directory))
        self._sent_at[version] = time.perf_counter()
        for worker_id, worker in self.workers.items():
            if worker.ready:
                self.transport.send(worker_id, ("weights", version, str(directory)))
                worker.sent_version = version
        self._dispatch()

    def take(self, batch: int, timeout_s: float) -> tuple[list[RolloutGroup], dict[str, float]]:
        """Batch `batch`'s groups in prompt order and the merged metrics of its chunks; blocks."""
        need = len(self.chunk_sizes)
        self._pump_until(lambda: len(self._arrived.get(batch, {})) == need, timeout_s,
                         f"rollouts of batch {batch}")
        parts = self._arrived.pop(batch)
        groups = [g for c in range(need) for g in parts[c][0]]
        return groups, self._merge([parts[c][1] for c in range(need)], groups)

    def generate(self, tag: str, prompt_ids: list[list[int]], timeout_s: float = 600.0, **sampling) -> list[list]:
        """Completions per prompt with the newest published weights, the prompts shared out among the workers."""
        self.wait_synced(self.latest[0], timeout_s)
        ids = sorted(self.workers)
        share = -(-len(prompt_ids) // len(ids)) if prompt_ids else 0
        tags = []
        for i, worker_id in enumerate(ids):
            part = prompt_ids[i * share:(i + 1) * share]
            if not part:
                continue
            message = ("generate", f"{tag}#{i}", part, sampling)
            self.workers[worker_id].requests[message[1]] = message
            self.transport.send(worker_id, message)
            tags.append(message[1])
        self._pump_until(lambda: all(t in self._generations for t in tags), timeout_s, f"generation {tag!r}")
        return [g for t in tags for g in self._generations.pop(t)]

    def wait_synced(self, version: int, timeout_s: float = 600.0) -> None:
        """Wait until every worker holds weights `version` or newer."""
        self._pump_until(lambda: all(w.ready and w.acked_version >= version for w in self.workers.values()),
                         timeout_s, f"weights v{version} on every engine")

    def sync_metrics(self) -> dict[str, float]:
        """Per-engine weight-load seconds of the newest version every engine has loaded since the last call,
        and the round trip from `publish` to the last engine's acknowledgement."""
        out: dict[str, float] = {}
        complete = [v for v, acks in self._acks.items() if len({w for w, _, _ in acks}) >= len(self.workers)]
        if complete:
            version = max(complete)
            acks = self._acks[version]
            loads = [s for _, s, _ in acks]
            out["sync/reload_s"] = sum(loads) / len(loads)
            out["sync/reload_s_max"] = max(loads)
            out.update({f"sync/reload_s/worker_{w}": s for w, s, _ in acks})
            if version in self._sent_at:
                out["sync/roundtrip_s"] = max(at for _, _, at in acks) - self._sent_at[version]
            for v in [v for v in self._acks if v <= version]:
                self._acks.pop(v)
                self._sent_at.pop(v, None)
        out["rollout/workers"] = float(len(self.workers))
        out["rollout/worker_restarts"] = float(self.restarts)
        return out

    # ------------------------------------------------------------------ events
    def _pump_until(self, done, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        self._dispatch()
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout_s:.0f} s: the rollout workers are stuck or too slow")
            for worker_id, event in self.transport.wait(0.5):
                self._handle(worker_id, event)
            self._dispatch()

    def _handle(self, worker_id: int, event: tuple) -> None:
        worker, kind = self.workers[worker_id], event[0]
        if kind == "ready":
            worker.ready, worker.acked_version = True, max(worker.acked_version, worker.sent_version)
            if self.startup_s is None:
                self.startup_s, self.lora_sync = event[1], event[2]
            version, directory = self.latest
            if worker.sent_version < 0:  # a replacement: on the stage's input until it is sent the newest
                if directory is None:  # nothing published yet: the input is the newest
                    worker.sent_version = worker.acked_version = version
                else:
                    self.transport.send(worker_id, ("weights", version, directory))
                    worker.sent_version = version
            self._on_event({"event": "ready", "worker": worker_id, "pid": self.transport.pid(worker_id),
                            "weights": worker.sent_version, "startup_s": event[1], "time": time.time()})
            for message in worker.requests.values():  # those its predecessor did not answer
                self.transport.send(worker_id, message)
        elif kind == "synced":
            worker.acked_version = max(worker.acked_version, event[1])
            self._acks.setdefault(event[1], []).append((worker_id, event[2], time.perf_counter()))
        elif kind == "batch":
            _, batch, chunk, groups, metrics = event
            worker.chunk = None
            self._deaths_in_a_row = 0
            worker.pool_stats = {k: v for k, v in metrics.items() if k.startswith("reward/")}
            self._arrived.setdefault(batch, {}).setdefault(chunk, (groups, metrics))
        elif kind == "generations":
            worker.requests.pop(event[1], None)
            self._generations[event[1]] = event[2]
        elif kind == "error":
            worker.error = event[1]
            log.error("rollout worker %d failed:\n%s", worker_id, event[1])
        elif kind == "died":
            self._restart(worker_id, event[1])

    def _restart(self, worker_id: int, why: str) -> None:
        worker = self.workers[worker_id]
        if not worker.ready and worker.error is not None:
            raise RuntimeError(f"rollout worker {worker_id} failed while starting its engine:\n{worker.error}")
        self.restarts += 1
        self._deaths_in_a_row += 1
        if self._deaths_in_a_row > self.max_restarts:
            raise RuntimeError(f"rollout workers died {self._deaths_in_a_row} times in a row without finishing a "
                               f"chunk (last: worker {worker_id}, {why})" +
                               (f"; its last error:\n{worker.error}" if worker.error else ""))
        if worker.chunk is not None:
            self._again = sorted([*self._again, worker.chunk])
        for key, value in worker.pool_stats.items():  # its reward counters end with it
            if "latency" not in key:
                self._dead_pool_stats[key] = self._dead_pool_stats.get(key, 0.0) + value
        self._on_event({"event": "died", "worker": worker_id, "why": why, "chunk": worker.chunk,
                        "weights": worker.acked_version, "time": time.time()})
        log.warning("rollout worker %d died (%s); starting it again with weights v%d%s", worker_id, why,
                    self.latest[0], f", chunk {worker.chunk} to be generated again" if worker.chunk else "")
        self._relaunch(worker_id)

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self) -> None:
        for worker_id, worker in self.workers.items():
            if not worker.ready or worker.chunk is not None:
                continue
            unit = self._again[0] if self._again else self._next
            if not may_generate(unit[0], worker.sent_version, self.spec.max_staleness):
                continue
            if self._again:
                self._again.pop(0)
            else:
                batch, chunk = self._next
                self._next = (batch, chunk + 1) if chunk + 1 < len(self.chunk_sizes) else (batch + 1, 0)
            batch, chunk = unit
            first = (self.spec.start_prompt_index + (batch - self.spec.start_batch) * self.spec.groups_per_batch
                     + self.chunk_offsets[chunk])
            worker.chunk = unit
            self.transport.send(worker_id, ("batch", batch, chunk, first, self.chunk_sizes[chunk]))

    def _merge(self, parts: list[dict], groups: list[RolloutGroup]) -> dict[str, float]:
        """One batch's rollout metrics from its chunks': tokens summed, times the slowest chunk's; reward
        counters summed over the workers (and over those that died), latencies their maximum."""
        tokens = sum(p["rollout/tokens"] for p in parts)
        generate_s = max(p["rollout/generate_s"] for p in parts)
        out = {
            "rollout/tokens": tokens,
            "rollout/generate_s": generate_s,
            "rollout/score_s": max(p["rollout/score_s"] for p in parts),
            "rollout/batch_s": max(p["rollout/batch_s"] for p in parts),
            "rollout/tokens_per_s": tokens / generate_s if generate_s > 0 else 0.0,
            **reward_metrics([r for g in groups for r in g.rewards]),
        }
        pool = dict(self._dead_pool_stats)
        for worker in self.workers.values():
            for key, value in worker.pool_stats.items():
                pool[key] = max(pool.get(key, 0.0), value) if "latency" in key else pool.get(key, 0.0) + value
        return {**out, **pool}
