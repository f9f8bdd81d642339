"""A rollout worker: one vLLM engine and one reward pool, serving requests from the learner in order.

`RolloutServer` is the worker itself, the same object whichever backend runs it (a spawned process,
`serve_pipe`, or a Ray actor, rollouts/transport.py). It answers four requests, in the order sent:

    load(version, directory)            reload the weights (or, LoRA with adapter sync, switch to the
                                        adapter in `directory`); returns the seconds taken
    batch(batch, chunk, first, count)   prompts first .. first+count-1 of the stream, `group_size`
                                        completions each, scored by the reward pool; returns
                                        (list[RolloutGroup], metrics), every group tagged with the
                                        policy version the worker holds
    generate(prompt_ids, sampling)      completions with the current weights (evaluation, probes)
    close()

The worker decides nothing about staleness or which prompts to take: the learner's fleet
(rollouts/fleet.py) sends it a chunk only when the weights it will hold are recent enough, and
assigns every prompt exactly once. A worker that dies is replaced and its chunk sent again.

Process backend messages (tuples over one duplex pipe; the worker's replies go through a sender
thread, so it never blocks on a learner that is busy sending it a large request):

    learner -> worker   ("weights", version, directory) | ("batch", batch, chunk, first, count)
                        | ("generate", tag, prompt_ids, sampling) | ("stop",)
    worker -> learner   ("ready", startup_s, lora_sync) | ("synced", version, reload_s)
                        | ("batch", batch, chunk, groups, metrics) | ("generations", tag, [Generation])
                        | ("error", traceback)

LoRA (`lora_rank` set): with `lora_sync` "adapter" or "auto" the engine starts with vLLM's LoRA
support and every sync is an adapter; "auto" falls back to merged full weights when the engine
cannot start with LoRA, and "ready" says which one runs ("adapter" | "merged"; None without
LoRA). `start_weights`: a published version directory to load before the first request (a resumed
LoRA run, or a worker restarted mid-run with the current weights).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from rewards.registry import RewardSpec
from rollouts.buffer import RolloutGroup
from rollouts.engine import EngineSettings
from rollouts.prompts import PromptSource
from rollouts.weight_sync import adapter_dir

log = logging.getLogger("rollouts.worker")


@dataclass
class WorkerSpec:
    model_dir: str
    prompts: PromptSource
    prompt_format: Any  # rlpost.prompting.PromptFormat: the one way rows become token ids
    rewards: list[RewardSpec]
    group_size: int
    groups_per_batch: int
    temperature: float
    max_tokens: int
    max_staleness: int
    start_batch: int = 0
    start_version: int = 0
    start_prompt_index: int = 0
    reward_workers: int = 2
    torch_threads: int = 1
    engine: EngineSettings = field(default_factory=EngineSettings)
    lora_rank: int | None = None
    lora_sync: str = "auto"
    start_weights: str | None = None


class RolloutServer:
    """One engine, one reward pool; see the module docstring for the requests it answers."""

    def __init__(self, spec: WorkerSpec):
        import torch
        from transformers import AutoTokenizer

        from rewards.pool import RewardPool

        torch.set_num_threads(spec.torch_threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(spec.torch_threads))
        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        self.engine, self.lora_sync = _start_engine(spec)
        self.version = spec.start_version
        if spec.start_weights is not None:
            _load(self.engine, self.lora_sync, spec.start_weights, spec.start_version)
        self.pool = RewardPool(spec.rewards, workers=spec.reward_workers)
        self.pool.start()

    @property
    def startup_s(self) -> float:
        return self.engine.startup_s

    def load(self, version: int, directory: str) -> float:
        self.version = version
        return _load(self.engine, self.lora_sync, directory, version)

    def batch(self, first_prompt: int, count: int) -> tuple[list[RolloutGroup], dict[str, float]]:
        return _generate_chunk(self.spec, self.engine, self.tokenizer, self.pool, self.version, first_prompt, count)

    def generate(self, prompt_ids: list[list[int]], sampling: dict) -> list[list]:
        return self.engine.generate(prompt_ids, **sampling)

    def close(self) -> None:
        self.pool.close()
        self.engine.close()


def serve_pipe(spec: WorkerSpec, conn, parent_pid: int) -> None:
    """Process backend entry point: serve requests from `conn` until "stop", the pipe closes or the
    learner (`parent_pid`) dies; a crash is reported as ("error", traceback) before exiting."""
    die_with_parent(parent_pid)
    outbox: queue.Queue = queue.Queue()
    sender = threading.Thread(target=_send_all, args=(conn, outbox), daemon=True)
    sender.start()
    server = None
    try:
        server = RolloutServer(spec)
        outbox.put(("ready", server.startup_s, server.lora_sync))
        while os.getppid() == parent_pid:
            if not conn.poll(1.0):
                continue
            try:
                message = conn.recv()
            except EOFError:  # the learner closed its end
                break
            kind = message[0]
            if kind == "stop":
                break
            if kind == "weights":
                _, version, directory = message
                outbox.put(("synced", version, server.load(version, directory)))
            elif kind == "batch":
                _, batch, chunk, first, count = message
                groups, metrics = server.batch(first, count)
                outbox.put(("batch", batch, chunk, groups, metrics))
            elif kind == "generate":
                _, tag, prompt_ids, sampling = message
                outbox.put(("generations", tag, server.generate(prompt_ids, sampling)))
    except BaseException:  # noqa: BLE001 - the traceback is the report the learner needs
        outbox.put(("error", traceback.format_exc()))
        raise
    finally:
        outbox.put(None)
        sender.join(timeout=30)
        if server is not None:
            server.close()


def _send_all(conn, outbox: queue.Queue) -> None:
    while (message := outbox.get()) is not None:
        try:
            conn.send(message)
        except (BrokenPipeError, EOFError, OSError):
            return  # the learner is gone


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM to this process when its parent dies (Linux), and turn SIGTERM into
    a normal exit so the engine and reward pool are closed; a learner killed alone leaves no worker."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the getppid check in the serving loop remains
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        raise SystemExit(0)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _start_engine(spec: WorkerSpec):
    """(engine, lora_sync): LoRA-enabled when the spec asks for adapter sync and vLLM supports it."""
    from rollouts.engine import RolloutEngine

    if spec.lora_rank is None:
        return RolloutEngine(spec.model_dir, spec.engine), None
    if spec.lora_sync in ("adapter", "auto"):
        try:
            return RolloutEngine(spec.model_dir, spec.engine, lora_rank=spec.lora_rank), "adapter"
        except Exception as exc:  # noqa: BLE001 - vLLM's own error names what it lacks
            if spec.lora_sync == "adapter":
                raise RuntimeError(f"vLLM cannot run LoRA adapters for {spec.model_dir} ({exc}); set the stage's "
                                   f"lora.sync to 'merged' or 'auto'") from exc
            log.warning("vLLM cannot run LoRA adapters here (%s); syncing merged weights instead", exc)
    return RolloutEngine(spec.model_dir, spec.engine), "merged"


def _load(engine, lora_sync: str | None, directory: str, version: int) -> float:
    if lora_sync == "adapter":
        return engine.load_adapter(adapter_dir(directory), version)
    return engine.reload_weights(directory)


def _generate_chunk(spec, engine, tokenizer, pool, version: int, first_prompt: int,
                    count: int) -> tuple[list[RolloutGroup], dict[str, float]]:
    start = time.perf_counter()
    indices = range(first_prompt, first_prompt + count)
    prompts, columns = zip(*(spec.prompts.get(i) for i in indices))
    prompt_ids = [spec.prompt_format.token_ids(tokenizer, {**c, "prompt": p}) for p, c in zip(prompts, columns)]
    outputs = engine.generate(
        prompt_ids, n=spec.group_size, temperature=spec.temperature, max_tokens=spec.max_tokens
    )
    generate_s = time.perf_counter() - start
    flat_prompts = [p for p in prompts for _ in range(spec.group_size)]
    flat = [g for gens in outputs for g in gens]
    flat_columns = {
        key: [c[key] for c in columns for _ in range(spec.group_size)] for key in (columns[0] if columns else {})
    }
    scored = pool.score(flat_prompts, [g.text for g in flat], [list(g.token_ids) for g in flat], flat_columns)
    groups = [
        RolloutGroup(
            prompt_index=index,
            prompt=prompts[k],
            prompt_ids=prompt_ids[k],
            completion_ids=[list(g.token_ids) for g in outputs[k]],
            sampling_logprobs=[list(g.logprobs) for g in outputs[k]],
            completions=[g.text for g in outputs[k]],
            rewards=scored.total[k * spec.group_size : (k + 1) * spec.group_size],
            policy_version=version,
            columns=columns[k],
        )
        for k, index in enumerate(indices)
    ]
    tokens = sum(len(g.token_ids) for g in flat)
    return groups, {
        "rollout/generate_s": generate_s,
        "rollout/score_s": time.perf_counter() - start - generate_s,
        "rollout/batch_s": time.perf_counter() - start,
        "rollout/tokens": float(tokens),
        **pool.stats(),
    }


def reward_metrics(totals: list[float | None]) -> dict[str, float]:
    """`rollout/reward_mean` over the samples that have a reward (NaN when none has) and
    `rollout/masked_samples`, the samples of this batch whose reward is None (failed or not
    applicable: the learner masks them, so they must not count as 0 here either)."""
    scored = [t for t in totals if t is not None]
    return {
        "rollout/reward_mean": sum(scored) / len(scored) if scored else float("nan"),
        "rollout/masked_samples": float(len(totals) - len(scored)),
    }
