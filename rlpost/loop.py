"""The asynchronous RL loop: rollout worker -> bounded buffer -> learner (GRPO by default) -> weight sync.

    worker process (vLLM)                     learner (this process)
    generate batch b with weights v   --->    take batch b (staleness gate: v >= b - max_staleness)
    score with isolated rewards               GRPO step (TRL loss), version b+1
    reload weights when told          <---    publish weights b+1 to shared memory

With `max_staleness = 0` the worker waits for version b before generating batch b (synchronous,
on-policy); with `max_staleness = k` it runs up to k versions ahead, overlapping generation with
training, and the learner corrects those samples by importance sampling. Every step appends one
line to `ledger.jsonl` (step, prompt indices, policy versions); checkpoints make a killed run
resume with no gap and no repeat in steps, samples or prompts.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlpost import lora
from rlpost.checkpoint import RLState, latest_checkpoint, load_checkpoint, save_checkpoint
from rlpost.learners.grpo import GRPOLearner, LearnerSettings
from rlpost.report import JsonlLog, MetricsLog
from rollouts.buffer import SampleBuffer, StalenessCounts
from rollouts.weight_sync import WeightPublisher
from rollouts.worker import WorkerSpec, worker_main

log = logging.getLogger("rlpost.loop")
EXTRA_STATE = "learner_extra.safetensors"  # a learner's own tensors (e.g. a value head) in each checkpoint


@dataclass
class LoopSettings:
    max_steps: int
    groups_per_step: int
    max_staleness: int
    checkpoint_every: int
    eval_every: int
    learner: LearnerSettings = field(default_factory=LearnerSettings)
    sample_timeout_s: float = 600.0
    learner_threads: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    lora: Any = None  # rlpost.lora.LoraSection: train adapters (see rlpost/lora.py), None: all weights


class WorkerLink:
    """The learner's side of the rollout worker: starts it, sends control messages, pumps its events."""

    def __init__(self, spec: WorkerSpec, capacity: int):
        ctx = mp.get_context("spawn")
        self.spec = spec
        self.samples, self.control, self.events = ctx.Queue(capacity), ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=worker_main, args=(spec, self.samples, self.control, self.events),
                                   name="rlpost-rollout")
        self.generated: list[dict] = []
        self.synced: list[tuple[int, float, float]] = []  # (version, reload_s, acknowledged_at)
        self.generations: dict[str, list] = {}
        self.process.start()

    def alive(self) -> bool:
        return self.process.is_alive()

    def pump(self, block_for: str | None = None, timeout_s: float = 600.0) -> None:
        """Handle pending events; with `block_for`, wait until an event of that kind has arrived."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                event = self.events.get(timeout=0.5 if block_for else 0.0) if block_for else self.events.get_nowait()
            except queue.Empty:
                if not block_for:
                    return
                if not self.alive():
                    raise RuntimeError("the rollout worker exited unexpectedly (see its log above)")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the rollout worker sent no '{block_for}' event within {timeout_s:.0f} s")
                continue
            kind = event[0]
            if kind == "error":
                raise RuntimeError(f"the rollout worker crashed:\n{event[1]}")
            if kind == "generated":
                self.generated.append(event[1])
            elif kind == "synced":
                self.synced.append((event[1], event[2], time.perf_counter()))
            elif kind == "generations":
                self.generations[event[1]] = event[2]
            elif kind == "ready":
                self.startup_s, self.lora_sync = event[1], event[2]
            if block_for and kind == block_for:
                return

    def generate(self, tag: str, prompt_ids: list[list[int]], **sampling) -> list[list]:
        """Completions per prompt from the worker's engine with its current weights
        (`sampling`: `RolloutEngine.generate`'s keywords)."""
        self.control.put(("generate", tag, prompt_ids, sampling))
        while tag not in self.generations:
            self.pump(block_for="generations")
        return self.generations.pop(tag)

    def engine(self, tag: str) -> "WorkerEngine":
        return WorkerEngine(self, tag)

    def stop(self) -> None:
        if self.alive():
            self.control.put(("stop",))
            self.process.join(timeout=60)
        if self.alive():
            self.process.kill()
            self.process.join()


@dataclass
class WorkerEngine:
    """The rollout worker's engine seen as a `RolloutEngine` (for the evaluation runner): generation
    with the weights the worker holds now."""

    link: WorkerLink
    tag: str

    def generate(self, prompt_ids: list[list[int]], **sampling) -> list[list]:
        return self.link.generate(self.tag, prompt_ids, **sampling)


def probe_logprob_mismatch(link: WorkerLink, learner: GRPOLearner, prompt_ids: list[list[int]], tag: str,
                           temperature: float, max_tokens: int) -> float:
    """Max |vLLM sampling logprob - learner logprob| over a probe batch, same tokens, same weights.

    Call only when the worker has acknowledged the learner's current version."""
    generations = [g[0] for g in link.generate(tag, prompt_ids, temperature=temperature, max_tokens=max_tokens)]
    return learner.logprob_mismatch(prompt_ids, [list(g.token_ids) for g in generations],
                                    [list(g.logprobs) for g in generations])


def run_rl(policy_dir: Path, run_dir: Path, tokenizer, worker: WorkerSpec, settings: LoopSettings,
           evaluate=None, progress=None, learner_factory=None) -> dict:
    """Train from `policy_dir` (or resume from the newest checkpoint in `run_dir`); return figures.

    `evaluate(engine, tag) -> {"accuracy", "low", "high", ...}` (the pipeline's evaluation runner
    on the rollout worker's engine) runs at step 0, every `eval_every` steps and at the end.
    `learner_factory` (`rlpost.learners.LearnerFactory`) picks the update rule; default GRPO."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(settings.learner_threads)
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    dtype = getattr(torch, settings.dtype)
    if settings.lora is not None:  # adapters on the stage's input; a checkpoint holds the adapter alone
        model = lora.wrap(AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype).to(settings.device),
                          settings.lora)
    else:
        model = AutoModelForCausalLM.from_pretrained(ckpt / "policy" if ckpt else policy_dir,
                                                     dtype=dtype).to(settings.device)
    def load_reference():  # the stage's starting policy, also after a resume
        return AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype).to(settings.device)

    if learner_factory is None:
        def learner_factory(model, tokenizer, load_reference):
            reference = load_reference() if settings.learner.beta > 0 else None
            return GRPOLearner(model, tokenizer, settings.learner, str(run_dir / "trl"), worker.group_size,
                               reference_model=reference)
    learner = learner_factory(model, tokenizer, load_reference)
    state = load_checkpoint(ckpt, model, learner.optimizer) if ckpt else RLState()
    if ckpt and (ckpt / EXTRA_STATE).exists():
        from safetensors.torch import load_file

        learner.load_extra_state(load_file(str(ckpt / EXTRA_STATE)))
    if ckpt:
        log.info("resuming from %s (step %d)", ckpt, state.step)
    worker.start_batch = worker.start_version = state.step
    worker.start_prompt_index = state.next_prompt_index

    metrics = MetricsLog(run_dir, resume_step=state.step)
    ledger = JsonlLog(run_dir / "ledger.jsonl")
    ledger.truncate_after(state.step)
    publisher = WeightPublisher(run_dir.name)
    if settings.lora is not None:  # the engine starts on the base weights and loads the current policy
        worker.model_dir = str(policy_dir)
        worker.lora_rank, worker.lora_sync = settings.lora.r, settings.lora.sync
        worker.start_weights = str(publisher.publish(model, state.step, form="both")[0])
    else:
        worker.model_dir = str(ckpt / "policy" if ckpt else policy_dir)
    link = WorkerLink(worker, capacity=(settings.max_staleness + 1) * settings.groups_per_step)
    link.synced.append((state.step, 0.0, time.perf_counter()))  # it starts with the weights it was given
    buffer = SampleBuffer(link.samples, settings.max_staleness)
    if state.staleness:  # counts continue across a resume
        buffer.gate.groups = StalenessCounts(**state.staleness["groups"])
        buffer.gate.samples = StalenessCounts(**state.staleness["samples"])
    figures = {"start_step": state.step}
    try:
        link.pump(block_for="ready", timeout_s=600)
        figures["engine_startup_s"] = link.startup_s
        if settings.lora is not None:
            figures["lora_sync"] = link.lora_sync
            log.info("LoRA: the rollout engine follows the learner by %s", {
                "adapter": "adapter-only sync (vLLM LoRA)", "merged": "merged full weights"}[link.lora_sync])
        form = "adapter" if link.lora_sync == "adapter" else "full"
        if state.step == 0 and evaluate is not None:
            metrics.log(0, _eval_scalars(evaluate(link.engine("step-0"), "step-0")))
        sent_at: dict[int, float] = {}
        rl_start = last_step_end = time.perf_counter()
        while state.step < settings.max_steps:
            wait_start = time.perf_counter()
            groups = buffer.take(settings.groups_per_step, state.step, settings.sample_timeout_s, link.alive)
            waited = time.perf_counter() - wait_start
            scalars = learner.step(groups, fresh=[g.policy_version == state.step for g in groups])
            version = state.step + 1
            directory, write_s = publisher.publish(model, version, form)
            link.control.put(("weights", version, str(directory)))
            sent_at[version] = time.perf_counter()
            link.pump()
            state = RLState(version, state.samples_trained + sum(g.size for g in groups),
                            groups[-1].prompt_index + 1,
                            {"groups": vars(buffer.gate.groups).copy(), "samples": vars(buffer.gate.samples).copy()})
            ledger.append({"step": version, "prompt_indices": [g.prompt_index for g in groups],
                           "policy_versions": [g.policy_version for g in groups],
                           "samples": sum(g.size for g in groups),
                           "completion_tokens": sum(len(c) for g in groups for c in g.completion_ids),
                           "samples_trained": state.samples_trained})
            scalars.update(_drain_rollout_metrics(link, sent_at, buffer))
            now = time.perf_counter()
            rewards = [r for g in groups for r in g.rewards if r is not None]  # None: masked, not 0
            scalars.update({"train/reward_mean": sum(rewards) / len(rewards) if rewards else float("nan"),
                            "learner/wait_s": waited,
                            "sync/write_s": write_s,
                            "sync/bytes": float(publisher.last_bytes),
                            "learner/update_s": scalars["train/step_s"] + write_s,
                            "loop/step_wall_s": now - last_step_end,
                            "learner/samples_per_s": scalars["train/samples"] / max(1e-9, scalars["train/step_s"])})
            last_step_end = now
            if version % settings.eval_every == 0 or version == settings.max_steps:
                _wait_synced(link, version)
                scalars["sync/logprob_mismatch_max"] = probe_logprob_mismatch(
                    link, learner, [g.prompt_ids for g in groups], f"probe-{version}", worker.temperature,
                    worker.max_tokens)
                if evaluate is not None and version % settings.eval_every == 0:
                    scalars.update(_eval_scalars(evaluate(link.engine(f"step-{version}"), f"step-{version}")))
            metrics.log(version, scalars)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{scalars['train/reward_mean']:.2f}",
                                     acc=f"{scalars.get('eval/accuracy', float('nan')):.2f}")
            if version % settings.checkpoint_every == 0 or version == settings.max_steps:
                save_checkpoint(run_dir, model, tokenizer, learner.optimizer, state,
                                extra={EXTRA_STATE: learner.extra_state()})
        figures["rl_wall_s"] = time.perf_counter() - rl_start
        figures["staleness"] = vars(buffer.gate.samples)
    finally:
        link.stop()
        metrics.close()
        publisher.close()
    lora.save_policy(model, tokenizer, run_dir / "policy")
    figures["state"] = vars(state)
    return figures


def _wait_synced(link: WorkerLink, version: int) -> None:
    """Wait until the worker holds weights of `version` or newer."""
    while not any(v >= version for v, _, _ in link.synced):
        link.pump(block_for="synced")


def _eval_scalars(result: dict) -> dict[str, float]:
    return {"eval/accuracy": result["accuracy"], "eval/accuracy_low": result["low"],
            "eval/accuracy_high": result["high"]}


def _drain_rollout_metrics(link: WorkerLink, sent_at: dict[int, float], buffer: SampleBuffer) -> dict[str, float]:
    out: dict[str, float] = {}
    if link.generated:
        last = link.generated[-1]
        out.update({k: v for k, v in last.items() if isinstance(v, (int, float))})
        out["rollout/batch_s_mean"] = sum(g["rollout/batch_s"] for g in link.generated) / len(link.generated)
        link.generated.clear()
    for version, reload_s, acked in link.synced:
        if version in sent_at:
            out["sync/reload_s"] = reload_s
            out["sync/roundtrip_s"] = acked - sent_at.pop(version)
    gate = buffer.gate.samples
    out.update({"staleness/fresh_samples": gate.fresh, "staleness/corrected_samples": gate.corrected,
                "staleness/dropped_samples": gate.dropped, "staleness/max": gate.max_seen})
    return out
