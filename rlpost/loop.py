"""The asynchronous RL loop: rollout workers -> staleness gate -> learner (GRPO by default) -> weight sync.

    rollout workers (vLLM, one engine each)        learner (this process)
    generate chunks of batch b with weights v ---> take batch b (staleness gate: v >= b - max_staleness)
    score with isolated rewards                     update (TRL loss), version b+1
    reload weights when told                  <--- publish weights b+1 to shared memory, send to all

`rollouts.fleet.RolloutFleet` shares each batch out among `workers` engines on the chosen backend
(child processes or Ray actors, rollouts/transport.py) and starts a dead worker again. With
`max_staleness = 0` batch b is generated with the weights of version b (synchronous, on-policy);
with `max_staleness = k` workers run up to k versions ahead, overlapping generation with training,
and the learner corrects those samples by importance sampling. Every step appends one line to
`ledger.jsonl` (step, prompt indices, policy versions), every worker start and death one line to
`workers.jsonl`; checkpoints make a killed run resume with no gap and no repeat in steps, samples
or prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlpost import lora
from rlpost.checkpoint import RLState, latest_checkpoint, load_checkpoint, save_checkpoint
from rlpost.distributed import Context
from rlpost.learners.grpo import GRPOLearner, LearnerSettings
from rlpost.learners.update import NonFiniteStreak
from rlpost.report import JsonlLog, MetricsLog
from rollouts.buffer import StalenessCounts, StalenessGate
from rollouts.fleet import RolloutFleet
from rollouts.transport import make_transport
from rollouts.weight_sync import WeightPublisher
from rollouts.worker import WorkerSpec

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
    workers: int = 1  # rollout workers (engines); the recipe's rollout.* and ray.* keys
    backend: str = "process"
    max_restarts: int = 3
    weight_transport: str = "auto"
    ray_address: str | None = None
    ray_cpus_per_worker: float = 1.0
    max_nonfinite_steps: int = 3  # steps in a row whose every update was NaN/inf (and skipped) before the run stops


@dataclass
class FleetEngine:
    """The rollout workers seen as one `RolloutEngine` (for the evaluation runner): generation with
    the newest weights, the prompts shared out among the workers."""

    fleet: RolloutFleet
    tag: str

    def generate(self, prompt_ids: list[list[int]], **sampling) -> list[list]:
        return self.fleet.generate(self.tag, prompt_ids, **sampling)


def probe_logprob_mismatch(fleet: RolloutFleet, learner, prompt_ids: list[list[int]], tag: str,
                           temperature: float, max_tokens: int) -> float:
    """Max |vLLM sampling logprob - learner logprob| over a probe batch, same tokens, same weights
    (the newest published version, which `fleet.generate` waits for on every engine)."""
    generations = [g[0] for g in fleet.generate(tag, prompt_ids, temperature=temperature, max_tokens=max_tokens)]
    return learner.logprob_mismatch(prompt_ids, [list(g.token_ids) for g in generations],
                                    [list(g.logprobs) for g in generations])


def start_fleet(worker: WorkerSpec, settings: LoopSettings, run_dir: Path) -> RolloutFleet:
    """The rollout workers on the settings' backend, their starts and deaths logged to `workers.jsonl`."""
    transport = make_transport(settings.backend, workers=settings.workers, address=settings.ray_address,
                               cpus_per_worker=settings.ray_cpus_per_worker,
                               weight_transport=settings.weight_transport)
    fleet = RolloutFleet(worker, transport, workers=settings.workers, max_restarts=settings.max_restarts,
                         on_event=JsonlLog(run_dir / "workers.jsonl").append)
    return fleet


def run_rl(policy_dir: Path, run_dir: Path, tokenizer, worker: WorkerSpec, settings: LoopSettings,
           evaluate=None, progress=None, learner_factory=None, dist: Context | None = None) -> dict:
    """Train from `policy_dir` (or resume from the newest checkpoint in `run_dir`); return figures.

    `evaluate(engine, tag) -> {"accuracy", "low", "high", ...}` (the pipeline's evaluation runner
    on the rollout worker's engine) runs at step 0, every `eval_every` steps and at the end.
    `learner_factory` (`rlpost.learners.LearnerFactory`) picks the update rule; default GRPO.

    `dist` (`rlpost.distributed.Context`) of several processes: this is the main rank; it runs the
    rollouts and tells the other ranks (`follow_rl`) what to build and, each step, the batch to train
    on (GRPO only). Only this rank publishes weights, logs and checkpoints."""
    import torch

    dist = dist or Context()
    if dist.world_size > 1 and learner_factory is not None:
        raise ValueError("only the GRPO learner trains on several processes (rlpost.pipeline refuses other stages)")
    torch.set_num_threads(settings.learner_threads)
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if dist.world_size > 1:  # before the learner: wrapping it for DDP is itself a collective
        dist.broadcast_object(("stage", {"policy_dir": str(policy_dir), "run_dir": str(run_dir),
                                         "ckpt": None if ckpt is None else str(ckpt), "settings": settings,
                                         "group_size": worker.group_size}))
    model, learner, state = start_learner(policy_dir, run_dir, ckpt, tokenizer, settings, worker.group_size,
                                          learner_factory, dist.accelerator)
    worker.start_batch = worker.start_version = state.step
    worker.start_prompt_index = state.next_prompt_index

    metrics = MetricsLog(run_dir, resume_step=state.step)
    ledger = JsonlLog(run_dir / "ledger.jsonl")
    ledger.truncate_after(state.step)
    # a worker busy with a chunk k batches ahead loads each version later, up to max_staleness + 1 behind
    publisher = WeightPublisher(run_dir.name, keep=settings.max_staleness + 3)
    # Engines start from the stage's input (which no checkpoint rotation removes, so a worker can be
    # started again at any time) and load the current policy: LoRA, or a resumed run.
    worker.model_dir = str(policy_dir)
    if settings.lora is not None:
        worker.lora_rank, worker.lora_sync = settings.lora.r, settings.lora.sync
        worker.start_weights = str(publisher.publish(model, state.step, form="both")[0])
    elif ckpt:
        worker.start_weights = str(publisher.publish(model, state.step, form="full")[0])
    gate = StalenessGate(settings.max_staleness)
    if state.staleness:  # counts continue across a resume
        gate.groups = StalenessCounts(**state.staleness["groups"])
        gate.samples = StalenessCounts(**state.staleness["samples"])
    figures = {"start_step": state.step}
    fleet = start_fleet(worker, settings, run_dir)
    try:
        fleet.start(timeout_s=600)
        figures["engine_startup_s"] = fleet.startup_s
        if settings.lora is not None:
            figures["lora_sync"] = fleet.lora_sync
            log.info("LoRA: the rollout engine follows the learner by %s", {
                "adapter": "adapter-only sync (vLLM LoRA)", "merged": "merged full weights"}[fleet.lora_sync])
        form = "adapter" if fleet.lora_sync == "adapter" else "full"
        if state.step == 0 and evaluate is not None:
            metrics.log(0, _eval_scalars(evaluate(FleetEngine(fleet, "step-0"), "step-0")))
        streak = NonFiniteStreak(settings.max_nonfinite_steps)
        rl_start = last_step_end = time.perf_counter()
        while state.step < settings.max_steps:
            wait_start = time.perf_counter()
            batch, rollout_scalars = fleet.take(state.step, settings.sample_timeout_s)
            waited = time.perf_counter() - wait_start
            groups = [g for g in batch if gate.admit(g, state.step)]
            if not groups:
                raise RuntimeError(f"every group of batch {state.step} was beyond max_staleness "
                                   f"{settings.max_staleness}: the rollout dispatch is out of step")
            fresh = [g.policy_version == state.step for g in groups]
            if dist.world_size > 1:
                dist.broadcast_object(("step", groups, fresh))
            scalars = learner.step(groups, fresh=fresh)
            version = state.step + 1
            directory, write_s = publisher.publish(model, version, form)
            fleet.publish(version, str(directory))
            state = RLState(version, state.samples_trained + sum(g.size for g in groups),
                            batch[-1].prompt_index + 1,
                            {"groups": vars(gate.groups).copy(), "samples": vars(gate.samples).copy()})
            ledger.append({"step": version, "prompt_indices": [g.prompt_index for g in groups],
                           "policy_versions": [g.policy_version for g in groups],
                           "samples": sum(g.size for g in groups),
                           "completion_tokens": sum(len(c) for g in groups for c in g.completion_ids),
                           "samples_trained": state.samples_trained})
            scalars.update(rollout_scalars)
            scalars.update(fleet.sync_metrics())
            scalars.update(_staleness_scalars(gate))
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
                scalars["sync/logprob_mismatch_max"] = probe_logprob_mismatch(
                    fleet, learner, [g.prompt_ids for g in groups], f"probe-{version}", worker.temperature,
                    worker.max_tokens)
                if evaluate is not None and version % settings.eval_every == 0:
                    scalars.update(_eval_scalars(evaluate(FleetEngine(fleet, f"step-{version}"), f"step-{version}")))
                last_step_end = time.perf_counter()  # the next step's wall leaves this check out
                scalars["loop/eval_s"] = last_step_end - now
            metrics.log(version, scalars)
            streak.update(version, scalars)  # skipped updates changed nothing; stop after several in a row
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{scalars['train/reward_mean']:.2f}",
                                     acc=f"{scalars.get('eval/accuracy', float('nan')):.2f}")
            if version % settings.checkpoint_every == 0 or version == settings.max_steps:
                save_checkpoint(run_dir, model, tokenizer, learner.optimizer, state,
                                extra={EXTRA_STATE: learner.extra_state()})
        figures["rl_wall_s"] = time.perf_counter() - rl_start
        figures["staleness"] = vars(gate.samples)
        figures["worker_restarts"] = fleet.restarts
    finally:
        fleet.close()
        metrics.close()
        publisher.close()
    lora.save_policy(model, tokenizer, run_dir / "policy")
    figures["state"] = vars(state)
    return figures


def start_learner(policy_dir: Path, run_dir: Path, ckpt: Path | None, tokenizer, settings: LoopSettings,
                  group_size: int, learner_factory=None, accelerator=None):
    """(policy, learner, RLState): the stage's input, or checkpoint `ckpt` (policy, optimiser, state,
    a learner's extra tensors) when resuming. The same on every rank of a multi-process run."""
    import torch
    from transformers import AutoModelForCausalLM

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
            return GRPOLearner(model, tokenizer, settings.learner, str(run_dir / "trl"), group_size,
                               reference_model=reference, accelerator=accelerator)
    learner = learner_factory(model, tokenizer, load_reference)
    # latest_checkpoint has just checked every file against the manifest's sha256
    state = load_checkpoint(ckpt, model, learner.optimizer, verify=False) if ckpt else RLState()
    if ckpt and (ckpt / EXTRA_STATE).exists():
        from safetensors.torch import load_file

        learner.load_extra_state(load_file(str(ckpt / EXTRA_STATE)))
    if ckpt:
        log.info("resuming from %s (step %d)", ckpt, state.step)
    return model, learner, state


def follow_rl(dist: Context) -> None:
    """A rank other than the main one, for the whole run: build the learner the main rank's `run_rl`
    announces (("stage", job)), train on each batch it broadcasts (("step", groups, fresh)), and
    leave when it broadcasts None (at the end of the run, or when it stops on an error)."""
    import torch
    from transformers import AutoTokenizer

    learner = None
    while True:
        message = dist.broadcast_object(None)
        if message is None:
            return
        if message[0] == "stage":
            job = message[1]
            learner = None  # the previous stage's policy and optimiser go before the next are built
            settings = job["settings"]
            settings.device = str(dist.device)
            torch.set_num_threads(settings.learner_threads)
            tokenizer = AutoTokenizer.from_pretrained(job["policy_dir"])
            _, learner, _ = start_learner(Path(job["policy_dir"]), Path(job["run_dir"]),
                                          None if job["ckpt"] is None else Path(job["ckpt"]), tokenizer, settings,
                                          job["group_size"], accelerator=dist.accelerator)
        elif message[0] == "step":
            if learner is None:
                raise RuntimeError("the main rank sent a batch before any stage")
            learner.step(message[1], fresh=message[2])
        else:
            raise RuntimeError(f"unknown message from the main rank: {message[0]!r}")


def _eval_scalars(result: dict) -> dict[str, float]:
    return {"eval/accuracy": result["accuracy"], "eval/accuracy_low": result["low"],
            "eval/accuracy_high": result["high"]}


def _staleness_scalars(gate: StalenessGate) -> dict[str, float]:
    counts = gate.samples
    return {"staleness/fresh_samples": counts.fresh, "staleness/corrected_samples": counts.corrected,
            "staleness/dropped_samples": counts.dropped, "staleness/max": counts.max_seen}
