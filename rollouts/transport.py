"""How the learner reaches its rollout workers: spawned processes on this machine, or Ray actors.

A transport starts workers (each a `rollouts.worker.RolloutServer`), delivers requests to them in
order and hands back their replies as events; it knows nothing of batches, versions or staleness
(that is `rollouts.fleet.RolloutFleet`'s job). The seam is `Transport`:

    start(worker_id, spec)      start a worker (replies "ready" when its engine is up)
    send(worker_id, message)    one request, a tuple of rollouts/worker.py's protocol
    wait(timeout_s)             [(worker_id, event)], the replies that arrived, in order per worker;
                                ("died", detail) once when a worker is gone (killed, crashed, lost)
    pid(worker_id)              its process id (workers.jsonl records it: fault tests and
                                bench/soak.py kill workers by it)
    close()                     stop every worker

`ProcessTransport` is the embedded default: one spawned process per worker and one duplex pipe
each (a worker killed mid-write can only break its own pipe). `RayTransport` runs each worker as
a Ray actor on a local cluster (`ray.init()`) or an existing one (`address`); weights go to an
actor on this node through shared memory (the published directory itself) and to an actor on
another node through Ray's object store (the directory's files, put once per version).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
from multiprocessing import connection
from pathlib import Path
from typing import Protocol

from rewards.errors import UserError
from rollouts.worker import WorkerSpec, serve_pipe

log = logging.getLogger("rollouts.transport")


class Transport(Protocol):
    def start(self, worker_id: int, spec: WorkerSpec) -> None: ...
    def send(self, worker_id: int, message: tuple) -> None: ...
    def wait(self, timeout_s: float) -> list[tuple[int, tuple]]: ...
    def pid(self, worker_id: int) -> int | None: ...
    def close(self) -> None: ...


class ProcessTransport:
    """Workers as spawned child processes of the learner (see the module docstring)."""

    def __init__(self):
        self._ctx = mp.get_context("spawn")
        self._workers: dict[int, tuple[mp.process.BaseProcess, connection.Connection]] = {}
        self._dead: list[tuple[int, str]] = []

    def start(self, worker_id: int, spec: WorkerSpec) -> None:
        ours, theirs = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=serve_pipe, args=(spec, theirs, os.getpid()),
                                    name=f"rlpost-rollout-{worker_id}")
        process.start()
        theirs.close()
        self._workers[worker_id] = (process, ours)

    def send(self, worker_id: int, message: tuple) -> None:
        entry = self._workers.get(worker_id)
        if entry is None:
            return  # already reported dead; the fleet resends to its replacement
        try:
            entry[1].send(message)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            self._bury(worker_id, f"its pipe broke ({exc})")

    def wait(self, timeout_s: float) -> list[tuple[int, tuple]]:
        events = [(w, ("died", why)) for w, why in self._dead]
        self._dead.clear()
        if events:
            return events
        handles = {}
        for worker_id, (process, conn) in self._workers.items():
            handles[conn] = worker_id
            handles[process.sentinel] = worker_id
        if not handles:
            return []
        for ready in connection.wait(list(handles), timeout_s):
            worker_id = handles[ready]
            if worker_id not in self._workers:
                continue
            process, conn = self._workers[worker_id]
            try:
                while conn.poll():  # everything it sent, also when it has exited since
                    events.append((worker_id, conn.recv()))
            except (EOFError, OSError):
                pass
            if not process.is_alive() or ready is process.sentinel:
                process.join(timeout=5)
                if not process.is_alive():
                    self._bury(worker_id, f"exit code {process.exitcode}")
        events += [(w, ("died", why)) for w, why in self._dead]
        self._dead.clear()
        return events

    def _bury(self, worker_id: int, why: str) -> None:
        process, conn = self._workers.pop(worker_id)
        conn.close()
        if process.is_alive():
            process.kill()
            process.join(timeout=10)
        self._dead.append((worker_id, why))

    def pid(self, worker_id: int) -> int | None:
        entry = self._workers.get(worker_id)
        return entry[0].pid if entry else None

    def close(self) -> None:
        for process, conn in self._workers.values():
            try:
                conn.send(("stop",))
            except OSError:
                pass
        for process, conn in self._workers.values():
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self._workers.clear()


class RolloutActor:
    """A `RolloutServer` as a Ray actor: each method returns the event the process backend would send."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.server = None
        self.weights_root: Path | None = None

    def start(self) -> tuple:
        import ray

        from rollouts.worker import RolloutServer

        self.server = RolloutServer(self.spec)
        return ("ready", self.server.startup_s, self.server.lora_sync, os.getpid(),
                ray.get_runtime_context().get_node_id())

    def load(self, version: int, directory: str | None, files: dict[str, bytes] | None = None) -> tuple:
        if files is not None:  # from another node, through the object store: write a local copy
            directory = str(self._local_copy(version, files))
        return ("synced", version, self.server.load(version, directory))

    def batch(self, batch: int, chunk: int, first: int, count: int) -> tuple:
        groups, metrics = self.server.batch(first, count)
        return ("batch", batch, chunk, groups, metrics)

    def generate(self, tag: str, prompt_ids: list[list[int]], sampling: dict) -> tuple:
        return ("generations", tag, self.server.generate(prompt_ids, sampling))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.weights_root is not None:
            import shutil

            shutil.rmtree(self.weights_root, ignore_errors=True)

    def _local_copy(self, version: int, files: dict[str, bytes]) -> Path:
        """Write a version received through the object store to this node's shared memory, in a root
        that records this actor as its owner: a killed actor's copy is removed by the next one."""
        import shutil

        from rollouts.weight_sync import remove_leftovers, shared_memory_root

        if self.weights_root is None:
            remove_leftovers("ray-weights")
            self.weights_root = shared_memory_root("ray-weights")
        directory = self.weights_root / f"v{version:06d}"
        for relative, data in files.items():
            path = directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for old in sorted(self.weights_root.glob("v*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return directory


class RayTransport:
    """Workers as Ray actors, one engine each (see the module docstring).

    `address`: None starts a local cluster in this process (stopped by `close`); "auto" or
    "ray://host:port" joins a running one. `weight_transport`: "auto" (shared memory for actors on
    this node, the object store for the others), "shared_memory" or "object_store"."""

    def __init__(self, address: str | None = None, cpus_per_worker: float = 1.0, workers: int = 1,
                 weight_transport: str = "auto"):
        try:
            import ray
        except ImportError:
            raise UserError("rollout.backend 'ray' needs Ray: bash scripts/setup.sh ray (or pip install "
                               "'rlpost[ray]'), or set rollout.backend: process") from None
        if weight_transport not in ("auto", "shared_memory", "object_store"):
            raise ValueError(f"weight_transport {weight_transport!r}: use auto, shared_memory or object_store")
        self._ray = ray
        self._owns_cluster = not ray.is_initialized() and address is None
        if not ray.is_initialized():
            local = {"num_cpus": max(os.cpu_count() or 1, int(workers * cpus_per_worker + 0.999))} if address is None else {}
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_import_path())}}, **local)
        self._node = ray.get_runtime_context().get_node_id()
        self._actor_class = ray.remote(num_cpus=cpus_per_worker, max_restarts=0)(RolloutActor)
        self._weight_transport = weight_transport
        self._actors: dict[int, object] = {}
        self._pids: dict[int, int] = {}
        self._nodes: dict[int, str] = {}
        self._pending: dict[object, int] = {}  # ObjectRef -> worker id, in submission order
        self._files: tuple[str, object] | None = None  # (directory, ObjectRef of its files), the newest

    def start(self, worker_id: int, spec: WorkerSpec) -> None:
        actor = self._actor_class.options(name=None).remote(spec)
        self._actors[worker_id] = actor
        self._pending[actor.start.remote()] = worker_id

    def send(self, worker_id: int, message: tuple) -> None:
        actor = self._actors.get(worker_id)
        if actor is None:
            return
        kind = message[0]
        if kind == "weights":
            _, version, directory = message
            if self._by_object_store(worker_id):
                ref = actor.load.remote(version, None, self._files_ref(directory))
            else:
                ref = actor.load.remote(version, directory)
        elif kind == "batch":
            ref = actor.batch.remote(*message[1:])
        elif kind == "generate":
            ref = actor.generate.remote(*message[1:])
        elif kind == "stop":
            ref = actor.close.remote()
        else:
            raise ValueError(f"unknown request {kind!r}")
        self._pending[ref] = worker_id

    def _by_object_store(self, worker_id: int) -> bool:
        if self._weight_transport != "auto":
            return self._weight_transport == "object_store"
        return self._nodes.get(worker_id, self._node) != self._node

    def _files_ref(self, directory: str):
        if self._files is None or self._files[0] != directory:
            root = Path(directory)
            files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
            self._files = (directory, self._ray.put(files))
        return self._files[1]

    def wait(self, timeout_s: float) -> list[tuple[int, tuple]]:
        if not self._pending:
            return []
        ray = self._ray
        refs = list(self._pending)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s, fetch_local=True)
        if not ready:
            return []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=True)  # all that are in
        events = []
        done = set(ready)
        for ref in refs:  # submission order, so one worker's replies stay in order
            if ref not in done or ref not in self._pending:
                continue
            worker_id = self._pending.pop(ref)
            try:
                event = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as exc:
                events.append((worker_id, ("died", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")))
                self._forget(worker_id)
                continue
            except ray.exceptions.RayTaskError as exc:
                events.append((worker_id, ("error", str(exc))))
                events.append((worker_id, ("died", "its request raised")))
                self._forget(worker_id, kill=True)
                continue
            if event is None:
                continue  # close() answered
            if event[0] == "ready":
                self._pids[worker_id], self._nodes[worker_id] = event[3], event[4]
                event = event[:3]
            events.append((worker_id, event))
        return events

    def _forget(self, worker_id: int, kill: bool = False) -> None:
        actor = self._actors.pop(worker_id, None)
        if kill and actor is not None:
            self._ray.kill(actor, no_restart=True)
        self._pids.pop(worker_id, None)
        self._pending = {ref: w for ref, w in self._pending.items() if w != worker_id}

    def pid(self, worker_id: int) -> int | None:
        return self._pids.get(worker_id)

    def close(self) -> None:
        ray = self._ray
        closing = [actor.close.remote() for actor in self._actors.values()]
        try:
            ray.wait(closing, num_returns=len(closing), timeout=60)
        finally:
            for actor in self._actors.values():
                ray.kill(actor, no_restart=True)
            self._actors.clear()
            self._pending.clear()
            if self._owns_cluster:
                ray.shutdown()


def _import_path() -> list[str]:
    """What the actors need on sys.path to import this run's code (the repository, custom rewards)."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [*extra, os.getcwd(), *(p for p in sys.path if p and Path(p).is_dir() and "site-packages" not in p
                                   and not p.startswith(sys.base_prefix))]


def make_transport(backend: str, workers: int = 1, address: str | None = None, cpus_per_worker: float = 1.0,
                   weight_transport: str = "auto") -> Transport:
    if backend == "process":
        return ProcessTransport()
    if backend == "ray":
        return RayTransport(address=address, cpus_per_worker=cpus_per_worker, workers=workers,
                            weight_transport=weight_transport)
    raise ValueError(f"rollout backend {backend!r}: use 'process' or 'ray'")
