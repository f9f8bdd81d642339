"""The rejection-sampling (expert iteration) stage: sample with vLLM, keep what the rewards accept, SFT on it.

Each of `rounds` rounds, starting from the previous round's weights (the first from the stage's input):

1. Sample. A vLLM engine (`rollouts.engine.RolloutEngine`) is started on the current weights and
   draws `num_generations` completions at `temperature` for each of `prompts_per_round` prompts.
   Round n (1-based) takes the prompt stream's indices [(n-1) P, n P) with P = prompts_per_round
   (`ctx.data.prompts()`, the same resumable stream the GRPO stage reads), so rounds never share
   a stream position and a resumed stage samples the same prompts. Prompts are tokenized by the
   recipe's `PromptFormat` (`ctx.data.format`), exactly as rollouts, SFT and evaluation do.
2. Score. The recipe's reward functions run in the isolated `rewards.pool.RewardPool`; a sample
   is *passed* when its total reward is >= `threshold` (a masked sample, total None, never is).
3. Keep. Per prompt, the first `keep_per_prompt` passed samples with distinct completion texts,
   in sampling order.
4. Train. TRL's SFTTrainer (`rlpost.sft.run_sft`) on the kept (prompt, completion) rows, tokenized
   as the SFT stage tokenizes demonstrations (`rlpost.stages.sft._tokenize`: the format's prompt
   ids, then the completion's text and EOS, loss on the completion only), for `num_train_epochs`
   epochs at a constant `learning_rate` (no warm-up, no validation or early stopping). A round
   that keeps nothing trains nothing: its policy is the previous one.

Objective. With binary rewards and threshold 1 this is expert iteration / ReST-EM (Singh et al.
2023) or STaR without rationalisation (Zelikman et al. 2022): maximising the log-likelihood of the
policy's own successful samples is an EM / filtered-behaviour-cloning step on
E_{y ~ pi}[1{R(x, y) >= threshold}]. Unlike ReST-EM, which restarts every iteration from the base
model, each round here continues from the previous round's weights.

Engine life. The engine is closed before training and a new one is started from the new weights
for the next round, so the engine and the learner never hold GPU memory at the same time and no
weight sync is needed. The cost is one engine start per round (`engine_startup_s` in each round's
record: a few seconds for the tiny model on a CPU, typically 20 s to a few minutes for a real
model on a GPU, mostly weight loading and, without `enforce_eager`, graph capture), against a
round's sampling and training time.

Files, per round n: `round-n/samples.jsonl` (every sample: prompt index, completion, total reward,
finish reason, kept), `round-n/sampling.json` (the sampling counts; written after samples.jsonl,
it marks sampling as done), `round-n/policy` and `round-n/round.json` (the round's record; marks
the round as done). `policy` is the last round's policy. Resume: a finished round is skipped; a
round killed after sampling trains on its saved samples without starting vLLM again, and a round
killed during training continues from the trainer's last epoch checkpoint (`run_sft`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from rlpost.config import setting
from rlpost import lora
from rlpost.errors import UserError
from rlpost.lora import LoraSection
from rlpost.recipe import where
from rlpost.stages.rollout_stage import check_rollout_context

log = logging.getLogger("rlpost.rejection")

_SIZE_KEYS = ("rounds", "prompts_per_round", "num_generations", "max_completion_length", "keep_per_prompt",
              "reward_workers", "per_device_train_batch_size", "num_train_epochs")


@dataclass
class RejectionStage:
    rounds: int = setting(3, "sample -> filter -> SFT rounds, each from the previous round's weights")
    prompts_per_round: int = setting(512, "prompts sampled per round; round n uses stream indices "
                                          "[(n-1) x prompts_per_round, n x prompts_per_round)")
    num_generations: int = setting(8, "samples drawn per prompt (vLLM)")
    temperature: float = setting(1.0, "sampling temperature (> 0)")
    max_completion_length: int = setting(6, "completion budget in tokens")
    threshold: float = setting(1.0, "keep a sample whose total reward is >= threshold (masked samples never)")
    keep_per_prompt: int = setting(4, "at most this many kept samples per prompt, distinct completion texts, "
                                      "first sampled first")
    rewards: list = setting(["arithmetic_exact"], "reward functions: names, dotted paths or "
                                                  "{name, weight, timeout_s, args}")
    reward_workers: int = setting(2, "processes scoring rewards")
    learning_rate: float = setting(1e-4, "TRL SFTConfig.learning_rate (AdamW, constant, no warm-up)")
    per_device_train_batch_size: int = setting(64, "TRL SFTConfig: kept samples per optimiser step")
    num_train_epochs: int = setting(2, "TRL SFTConfig: epochs over each round's kept samples")
    lora: LoraSection | None = setting(None, "train LoRA adapters instead of all weights: {r, alpha, dropout, "
                                             "target_modules, sync} (rlpost/lora.py); none: full fine-tuning")


def check_rejection(cfg: RejectionStage, recipe, name: str) -> None:
    for key in _SIZE_KEYS:
        if getattr(cfg, key) < 1:
            raise UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' must be >= 1, got {getattr(cfg, key)}")
    if not cfg.temperature > 0:
        raise UserError(f"{where(recipe, f'{name}.temperature')}: key '{name}.temperature' must be > 0, got "
                        f"{cfg.temperature}: greedy samples of a prompt are all the same")
    if not cfg.learning_rate > 0:
        raise UserError(f"{where(recipe, f'{name}.learning_rate')}: key '{name}.learning_rate' must be > 0, got {cfg.learning_rate}")
    if not math.isfinite(cfg.threshold):
        raise UserError(f"{where(recipe, f'{name}.threshold')}: key '{name}.threshold' must be a finite number, got {cfg.threshold}")
    check_rollout_context(cfg, recipe, name, prompts_key="prompts_per_round")


def select_kept(texts: list[str], totals: list[float | None], group_size: int, threshold: float,
                keep_per_prompt: int) -> list[int]:
    """Flat indices of the kept samples: per group of `group_size` consecutive samples (one prompt),
    those with total >= threshold (None never), the first of each distinct text, at most
    `keep_per_prompt` of them, in sampling order."""
    if len(texts) != len(totals) or len(texts) % group_size:
        raise ValueError(f"{len(texts)} texts and {len(totals)} rewards do not form groups of {group_size}")
    kept: list[int] = []
    for start in range(0, len(texts), group_size):
        seen: set[str] = set()
        for i in range(start, start + group_size):
            if len(seen) == keep_per_prompt:
                break
            if totals[i] is not None and totals[i] >= threshold and texts[i] not in seen:
                seen.add(texts[i])
                kept.append(i)
    return kept


def run_rejection(cfg: RejectionStage, ctx) -> dict:
    from transformers import AutoTokenizer

    from rewards.pool import RewardPool
    from rewards.registry import parse_reward_specs

    tokenizer = AutoTokenizer.from_pretrained(ctx.policy_in)
    source = ctx.data.prompts()
    policy = Path(ctx.policy_in)
    records = []
    with RewardPool(parse_reward_specs(cfg.rewards), workers=cfg.reward_workers) as pool:
        for n in range(1, cfg.rounds + 1):
            round_dir = ctx.out_dir / f"round-{n}"
            done = round_dir / "round.json"
            if done.exists():
                log.info("round %d is done (%s); skipping it", n, done)
            else:
                _run_round(cfg, ctx, n, round_dir, policy, tokenizer, source, pool)
            records.append(json.loads(done.read_text()))
            policy = round_dir / "policy"
    final = ctx.out_dir / "policy"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(policy, final)
    samples = sum(r["samples"] for r in records)
    kept = sum(r["kept"] for r in records)
    return {"rounds": records, "samples": samples, "kept": kept,
            "fraction_kept": kept / samples if samples else 0.0,
            "kept_completion_tokens": sum(r["kept_completion_tokens"] for r in records),
            "sampled_tokens": sum(r["sampled_tokens"] for r in records)}


def _run_round(cfg, ctx, n: int, round_dir: Path, policy: Path, tokenizer, source, pool) -> None:
    from rlpost.pipeline import write_json

    round_dir.mkdir(parents=True, exist_ok=True)
    start, stop = (n - 1) * cfg.prompts_per_round, n * cfg.prompts_per_round
    prompts = [source.get(i) for i in range(start, stop)]
    rows = [{**columns, "prompt": prompt} for prompt, columns in prompts]
    marker = round_dir / "sampling.json"
    if marker.exists():  # killed after sampling: train on the saved samples, no engine
        sampling = json.loads(marker.read_text())
        saved = [json.loads(line) for line in (round_dir / "samples.jsonl").read_text().splitlines()]
        kept = [(s["prompt_index"] - start, s["completion"], s["finish_reason"]) for s in saved if s["kept"]]
        log.info("round %d: reusing its %d saved samples (%d kept)", n, len(saved), len(kept))
    else:
        sampling, kept = _sample_and_filter(cfg, ctx, n, round_dir, policy, tokenizer, rows, start, pool)
        write_json(marker, sampling)

    from rlpost.stages.sft import _tokenize

    fmt = ctx.data.format
    train_rows = [_tokenize(tokenizer, fmt, {**rows[k], "completion": text}) for k, text, _ in kept]
    train_s = 0.0
    if train_rows:
        train_s = _train(cfg, ctx, policy, tokenizer, train_rows, round_dir)
    else:  # nothing to learn from: the round's policy is the previous one
        log.warning("round %d kept no sample (threshold %s); its policy is the previous round's", n, cfg.threshold)
        if (round_dir / "policy").exists():
            shutil.rmtree(round_dir / "policy")
        shutil.copytree(policy, round_dir / "policy")
    record = {
        "round": n,
        "prompt_indices": [start, stop],
        **sampling,
        "kept_truncated": sum(reason == "length" for _, _, reason in kept),
        "kept_completion_tokens": sum(sum(r["completion_mask"]) for r in train_rows),
        "sft_tokens": sum(len(r["input_ids"]) for r in train_rows),
        "trained": bool(train_rows),
        "train_s": train_s,
    }
    write_json(round_dir / "round.json", record)
    shutil.rmtree(round_dir / "trainer", ignore_errors=True)  # checkpoints: never read once the round is done


def _sample_and_filter(cfg, ctx, n: int, round_dir: Path, policy: Path, tokenizer, rows: list[dict], start: int,
                       pool) -> tuple[dict, list[tuple[int, str, str | None]]]:
    from rollouts.engine import EngineSettings, RolloutEngine

    fmt = ctx.data.format
    prompt_ids = [fmt.token_ids(tokenizer, row) for row in rows]
    settings = ctx.engine_settings or EngineSettings()
    settings = dataclasses.replace(settings, seed=settings.seed + n - 1)  # fresh sampling noise each round
    engine = RolloutEngine(policy, settings)
    try:
        evaluation = None
        if ctx.evaluate is not None and n > 1:  # the input policy was evaluated by the pipeline already
            result = ctx.evaluate(engine, f"round-{n}")
            evaluation = {k: result.get(k) for k in ("accuracy", "low", "high", "n")}
        began = time.perf_counter()
        outputs = engine.generate(prompt_ids, n=cfg.num_generations, temperature=cfg.temperature,
                                  max_tokens=cfg.max_completion_length)
        generate_s = time.perf_counter() - began
    finally:
        engine.close()
        _release_memory()
    k = cfg.num_generations
    flat = [g for gens in outputs for g in gens]
    began = time.perf_counter()
    columns = {key: [row[key] for row in rows for _ in range(k)] for key in rows[0] if key != "prompt"}
    scored = pool.score([row["prompt"] for row in rows for _ in range(k)], [g.text for g in flat],
                        [list(g.token_ids) for g in flat], columns)
    score_s = time.perf_counter() - began
    texts = [g.text for g in flat]
    chosen = select_kept(texts, scored.total, k, cfg.threshold, cfg.keep_per_prompt)
    chosen_set = set(chosen)
    samples_path = round_dir / "samples.jsonl"
    tmp = samples_path.with_name(f".{samples_path.name}.tmp")
    with tmp.open("w") as f:
        for i, g in enumerate(flat):
            f.write(json.dumps({"prompt_index": start + i // k, "completion": g.text, "reward": scored.total[i],
                                "finish_reason": g.finish_reason, "kept": i in chosen_set}) + "\n")
    os.replace(tmp, samples_path)
    valid = [t for t in scored.total if t is not None]
    passed = sum(t >= cfg.threshold for t in valid)
    sampling = {
        "samples": len(flat),
        "masked": scored.masked,
        "mean_reward": sum(valid) / len(valid) if valid else None,
        "passed": passed,
        "kept": len(chosen),
        "fraction_passed": passed / len(flat),
        "fraction_kept": len(chosen) / len(flat),
        "prompts_with_kept": len({i // k for i in chosen}),
        "sampled_tokens": sum(len(g.token_ids) for g in flat),
        "engine_startup_s": engine.startup_s,
        "generate_s": generate_s,
        "score_s": score_s,
        **({"eval_before": evaluation} if evaluation else {}),
    }
    log.info("round %d: %d of %d samples kept (%d passed, %d masked)", n, len(chosen), len(flat), passed,
             scored.masked)
    return sampling, [(i // k, flat[i].text, flat[i].finish_reason) for i in chosen]


def _train(cfg, ctx, policy: Path, tokenizer, rows: list[dict], round_dir: Path) -> float:
    from transformers import AutoModelForCausalLM

    from rlpost.sft import run_sft
    from rlpost.stages.sft import _dtype

    model = lora.maybe_wrap(AutoModelForCausalLM.from_pretrained(policy, dtype=_dtype(ctx.recipe.model.dtype))
                            .to(ctx.device), cfg.lora)
    sft = SimpleNamespace(learning_rate=cfg.learning_rate, per_device_train_batch_size=cfg.per_device_train_batch_size,
                          num_train_epochs=cfg.num_train_epochs, warmup_steps=0, lr_scheduler_type="constant",
                          eval_every_epochs=1, patience=1)
    result = run_sft(model, tokenizer, rows, None, out_dir=round_dir / "trainer", cfg=sft, seed=ctx.recipe.seed,
                     use_cpu=ctx.device == "cpu")
    lora.save_policy(model, tokenizer, round_dir / "policy")
    del model
    _release_memory()
    return result.wall_s


def _release_memory() -> None:
    """Free what a closed engine or a finished learner held, before the other starts (GPU memory above all)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # never fail a round over cache housekeeping
        pass
