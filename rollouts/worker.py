"""The rollout worker: a process that owns a vLLM engine and generates scored groups continuously.

Protocol (all messages are plain picklable tuples):

    learner -> worker (control queue)
        ("weights", version, directory)   reload weights in place (or, LoRA with adapter sync, switch to
                                          the adapter in `directory`); later batches carry `version`
        ("generate", tag, prompt_ids, sampling)   completions per prompt with the current weights
                                          (evaluation, logprob probes); sampling = RolloutEngine.generate keywords
        ("stop",)
    worker -> learner
        samples queue: RolloutGroup, one per prompt, bounded; a reward is None where the reward
                       pool masked the sample (the learner does not train on it)
        events queue:  ("ready", startup_s, lora_sync) | ("synced", version, reload_s)
                       | ("generated", metrics) | ("generations", tag, [Generation]) | ("error", traceback)

Batch `b` (the batch the learner consumes at step `b`) is generated only when the loaded weights
are recent enough for it to arrive within the staleness bound (`buffer.may_generate`); with
`max_staleness = 0` the worker waits for each step's weights before generating the next batch.

LoRA (`lora_rank` set): with `lora_sync` "adapter" or "auto" the engine starts with vLLM's LoRA
support and every sync is an adapter; "auto" falls back to merged full weights when the engine
cannot start with LoRA, and the "ready" event says which one runs ("adapter" | "merged"; None
without LoRA). `start_weights` is a directory the learner published before the start (a resumed
LoRA run): loaded before the first batch, as an adapter or as full weights.
"""

from __future__ import annotations

import logging
import os
import queue
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from rewards.registry import RewardSpec
from rollouts.buffer import RolloutGroup, may_generate
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


def worker_main(spec: WorkerSpec, samples, control, events) -> None:
    """Process entry point; reports any crash as an ("error", traceback) event before exiting."""
    try:
        _run(spec, samples, control, events)
    except BaseException:  # noqa: BLE001 - the traceback is the report the learner needs
        events.put(("error", traceback.format_exc()))
        raise


def _run(spec: WorkerSpec, samples, control, events) -> None:
    import torch
    from transformers import AutoTokenizer

    from rewards.pool import RewardPool

    torch.set_num_threads(spec.torch_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(spec.torch_threads))
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    engine, lora_sync = _start_engine(spec)
    if spec.start_weights is not None:
        _load(engine, lora_sync, spec.start_weights, spec.start_version)
    version, batch, next_prompt = spec.start_version, spec.start_batch, spec.start_prompt_index
    parent = os.getppid()
    with RewardPool(spec.rewards, workers=spec.reward_workers) as pool:
        events.put(("ready", engine.startup_s, lora_sync))
        while True:
            if os.getppid() != parent:  # the learner was killed: nobody will consume our samples
                break
            blocked = not may_generate(batch, version, spec.max_staleness)
            message = _next_message(control, block=blocked)
            if message is None and blocked:
                continue  # a poll timed out while the learner is busy: the bound still holds, wait on
            if message is not None:
                kind = message[0]
                if kind == "stop":
                    break
                if kind == "weights":
                    _, version, directory = message
                    events.put(("synced", version, _load(engine, lora_sync, directory, version)))
                elif kind == "generate":
                    _, tag, prompt_ids, sampling = message
                    events.put(("generations", tag, engine.generate(prompt_ids, **sampling)))
                continue  # drain every pending message before generating
            metrics = _generate_batch(spec, engine, tokenizer, pool, samples, version, next_prompt)
            events.put(("generated", {**metrics, "rollout/batch": batch}))
            batch += 1
            next_prompt += spec.groups_per_batch
    engine.close()


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


def _next_message(control, block: bool):
    try:
        return control.get(timeout=1.0) if block else control.get_nowait()
    except queue.Empty:
        return None


def _generate_batch(spec, engine, tokenizer, pool, samples, version: int, first_prompt: int) -> dict[str, float]:
    start = time.perf_counter()
    indices = range(first_prompt, first_prompt + spec.groups_per_batch)
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
    for k, index in enumerate(indices):
        gens = outputs[k]
        samples.put(
            RolloutGroup(
                prompt_index=index,
                prompt=prompts[k],
                prompt_ids=prompt_ids[k],
                completion_ids=[list(g.token_ids) for g in gens],
                sampling_logprobs=[list(g.logprobs) for g in gens],
                completions=[g.text for g in gens],
                rewards=scored.total[k * spec.group_size : (k + 1) * spec.group_size],
                policy_version=version,
                columns=columns[k],
            )
        )
    tokens = sum(len(g.token_ids) for g in flat)
    return {
        "rollout/generate_s": generate_s,
        "rollout/score_s": time.perf_counter() - start - generate_s,
        "rollout/batch_s": time.perf_counter() - start,
        "rollout/tokens": float(tokens),
        "rollout/tokens_per_s": tokens / generate_s if generate_s > 0 else 0.0,
        **pool.stats(),
        **reward_metrics(scored.total),
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
