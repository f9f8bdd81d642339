"""Quickstart: SFT warm-up -> asynchronous GRPO with vLLM rollouts and a verifier -> held-out evaluation.

Run it with `rlpost run` (or `python -m recipes.quickstart [recipe.yaml] [key=value ...]`).

Why this task, and why RL helps here
------------------------------------
The policy is a 1.6M-parameter Qwen2-architecture model with a character tokenizer, built locally.
The task is two-digit addition, `"57+68="` -> `"125"`, answered then EOS, checked by exact match.
The SFT demonstrations come from a *careless demonstrator*
that forgets each carry with probability `task.carry_slip` (0.6) - the situation RL post-training
exists for: demonstrations are imperfect, the verifier is exact. SFT trains on its fixed
demonstration set until validation accuracy (checked by the exact verifier on prompts outside the
demonstrations) stops improving - 3 epochs without a new best, never before epoch 20 (the first
~15 epochs are flat), at most 40 epochs (summary.json records which ended it); by imitating the
demonstrator it often prefers the carry-less answer where a carry is needed. The RL stage sees only fresh prompts and the verifier's 0/1 reward:
its samples contain the correct carry often enough (40% per carry) that group-normalised GRPO
advantages push the policy to carry every time. Settings that made plain GRPO fail on this
machine (an under-trained SFT start, lr >= 3e-4) are avoided: lr 1e-4, constant, 150 steps, beta 0
(no KL: the reference is the careless demonstrator, which we mean to move away from),
16 samples per prompt at temperature 1, 8 prompts per step.

Stages: (1) build model + tokenizer, (2) SFT with early stopping (skipped when already done),
(3) RL (resumes from its newest checkpoint), (4) report: summary.json, training.png, TensorBoard.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlpost.config import load_config, setting, to_dict

DEFAULT_RECIPE = Path(__file__).with_name("quickstart.yaml")


@dataclass
class ModelSection:
    hidden_size: int = setting(192, "width of the Qwen2 model")
    num_layers: int = setting(4, "transformer layers")
    num_heads: int = setting(6, "attention heads")
    num_kv_heads: int = setting(2, "key/value heads (grouped-query attention)")
    intermediate_size: int = setting(512, "MLP width")


@dataclass
class TaskSection:
    max_operand: int = setting(99, "operands are integers in [0, max_operand]")
    held_out_percent: int = setting(15, "percent of all operand pairs reserved for evaluation only")
    carry_slip: float = setting(0.6, "probability that the demonstrator forgets a carry")
    reverse: bool = setting(False, "write the sum least-significant digit first")


@dataclass
class SFTSection:
    demonstrations: int = setting(4000, "size of the fixed demonstration set")
    validation_prompts: int = setting(400, "prompts (not in the demonstrations) for early stopping")
    learning_rate: float = setting(2e-3, "AdamW learning rate, constant")
    batch_size: int = setting(64, "demonstrations per step")
    warmup_steps: int = setting(0, "linear learning-rate warm-up steps")
    max_epochs: int = setting(40, "upper bound on epochs (summary.json says whether SFT stopped on the plateau)")
    eval_every_epochs: int = setting(1, "validate every N epochs")
    patience: int = setting(3, "stop after N validations without improvement")
    min_epochs: int = setting(20, "never stop before this epoch (the first epochs are flat)")
    threads: int = setting(1, "torch CPU threads for SFT (2 was slower on 2 cores: the model is too small)")


@dataclass
class RLSection:
    max_steps: int = setting(150, "GRPO optimiser steps")
    groups_per_step: int = setting(8, "prompts per step")
    group_size: int = setting(16, "samples per prompt (the GRPO group)")
    temperature: float = setting(1.0, "sampling temperature for rollouts")
    max_tokens: int = setting(6, "maximum completion tokens")
    max_staleness: int = setting(1, "how many policy versions a sample may lag (0 = synchronous)")
    learning_rate: float = setting(1e-4, "AdamW learning rate, constant")
    beta: float = setting(0.0, "KL coefficient to the SFT policy")
    loss_type: str = setting("grpo", "TRL GRPO loss type", choices=("grpo", "dapo", "dr_grpo", "bnpo"))
    epsilon: float = setting(0.2, "PPO-style clipping range")
    importance_cap: float = setting(2.0, "truncation of sampler importance weights")
    rewards: list = setting(["arithmetic_exact"], "reward functions: names, dotted paths or {name, weight, timeout_s}")
    reward_workers: int = setting(2, "processes scoring rewards")
    checkpoint_every: int = setting(25, "save a checkpoint every N steps")
    eval_every: int = setting(25, "held-out evaluation every N steps")


@dataclass
class QuickstartConfig:
    run_dir: Path = setting(Path("runs/quickstart"), "where checkpoints, logs, plots and summary.json go")
    seed: int = setting(0, "seed for data, model initialisation and sampling")
    held_out_prompts: int = setting(1000, "held-out prompts for the SFT-vs-RL comparison")
    decontaminate_against: list[str] = setting(
        [], "benchmarks ('NAME' or 'NAME:FIELD') to n-gram-check the demonstrations against before training")
    model: ModelSection = setting(ModelSection, "model shape")
    task: TaskSection = setting(TaskSection, "the verifiable task")
    sft: SFTSection = setting(SFTSection, "SFT warm-up")
    rl: RLSection = setting(RLSection, "GRPO stage")


def build_task(cfg: QuickstartConfig):
    from rlpost.tasks.arithmetic import AdditionTask

    return AdditionTask(cfg.task.max_operand, cfg.task.held_out_percent, cfg.task.reverse, cfg.task.carry_slip)


def sft_stage(cfg: QuickstartConfig, task, run_dir: Path) -> dict:
    """Build the model and train it on the careless demonstrations until validation stops improving."""
    import torch

    from rlpost.modeling import ModelShape, build_model, build_tokenizer, save_pretrained
    from rlpost.sft import greedy_completions, run_sft
    from rlpost.tasks.arithmetic import score_answer

    done = run_dir / "sft" / "sft.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.set_num_threads(cfg.sft.threads)
    tokenizer = build_tokenizer()
    m = cfg.model
    model = build_model(tokenizer, ModelShape(m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads,
                                              m.intermediate_size), seed=cfg.seed)
    demos = task.demonstrations(cfg.sft.demonstrations, cfg.seed)
    if cfg.decontaminate_against:
        report_contamination([p + c for p, c in demos], cfg.decontaminate_against, run_dir)
    seen = {p for p, _ in demos}
    validation = [p for p in (task.train_problem(cfg.seed + 10_000, i) for i in range(50 * cfg.sft.validation_prompts))
                  if p.prompt not in seen][: cfg.sft.validation_prompts]

    def validate(policy) -> float:
        outs = greedy_completions(policy, tokenizer, [p.prompt for p in validation], cfg.rl.max_tokens)
        return sum(score_answer(o, p.answer) for o, p in zip(outs, validation)) / len(validation)

    result = run_sft(model, tokenizer, demos, validate, out_dir=run_dir / "sft" / "trainer", cfg=cfg.sft,
                     seed=cfg.seed)
    save_pretrained(model, tokenizer, run_dir / "sft" / "policy")
    record = {"best_val_accuracy": result.best_accuracy, "best_epoch": result.best_epoch,
              "epochs_run": result.epochs_run, "history": result.history, "wall_s": result.wall_s,
              "stopped_on_plateau": result.epochs_run < cfg.sft.max_epochs,
              "demonstration_accuracy": sum(c == task.answer_for(p) for p, c in demos) / len(demos)}
    done.write_text(json.dumps(record, indent=2))
    return record


def report_contamination(texts: list[str], benchmarks: list[str], run_dir: Path) -> None:
    """Tulu 3-style 8-gram overlap of the training data with each named benchmark, reported before training."""
    from rlpost.evaluation.decontaminate import check_contamination

    report = check_contamination(texts, benchmarks)
    (run_dir / "decontamination.json").write_text(json.dumps(report, indent=2))
    for name, found in report["benchmarks"].items():
        logging.getLogger("rlpost.decontaminate").warning(
            "%d of %d training rows share an 8-gram with %s (%d benchmark rows); see %s",
            found["contaminated_train_rows"], len(texts), name, found["contaminated_benchmark_rows"],
            run_dir / "decontamination.json")


def rl_stage(cfg: QuickstartConfig, task, run_dir: Path) -> dict:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from rewards.registry import parse_reward_specs
    from rlpost.learners.grpo import LearnerSettings
    from rlpost.loop import HeldOut, LoopSettings, run_rl
    from rlpost.tasks.arithmetic import score_answer
    from rollouts.prompts import TaskPrompts
    from rollouts.worker import WorkerSpec

    policy_dir = run_dir / "sft" / "policy"
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    r = cfg.rl
    held = task.held_out(cfg.held_out_prompts, cfg.seed)
    worker = WorkerSpec(model_dir=str(policy_dir), prompts=TaskPrompts(task, cfg.seed),
                        rewards=parse_reward_specs(r.rewards), group_size=r.group_size,
                        groups_per_batch=r.groups_per_step, temperature=r.temperature, max_tokens=r.max_tokens,
                        max_staleness=r.max_staleness, reward_workers=r.reward_workers)
    settings = LoopSettings(
        max_steps=r.max_steps, groups_per_step=r.groups_per_step, max_staleness=r.max_staleness,
        checkpoint_every=r.checkpoint_every, eval_every=r.eval_every,
        learner=LearnerSettings(learning_rate=r.learning_rate, beta=r.beta, loss_type=r.loss_type,
                                epsilon=r.epsilon, importance_cap=r.importance_cap,
                                max_completion_length=r.max_tokens, temperature=r.temperature,
                                seed=cfg.seed),
    )
    held_out = HeldOut([p.prompt for p in held], [p.answer for p in held], score_answer, r.max_tokens)
    with tqdm(total=r.max_steps, desc="RL steps", unit="step") as bar:
        return run_rl(policy_dir, run_dir, tokenizer, worker, settings, held_out, progress=bar)


def check_rewards(cfg: QuickstartConfig) -> None:
    """Resolve every entry of `rl.rewards` now, so a bad reward fails before any work or directory."""
    from rewards.registry import parse_reward_specs, resolve
    from rlpost.errors import UserError

    try:
        for spec in parse_reward_specs(cfg.rl.rewards):
            resolve(spec.name)
    except UserError as exc:
        raise UserError(f"key 'rl.rewards': {exc}") from None


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = Path(argv.pop(0)) if argv and not "=" in argv[0] else DEFAULT_RECIPE
    cfg = load_config(QuickstartConfig, recipe, argv)
    check_rewards(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    random.seed(cfg.seed)
    task = build_task(cfg)
    timings = {}
    start = time.perf_counter()
    sft = sft_stage(cfg, task, run_dir)
    timings["sft_s"] = time.perf_counter() - start
    start = time.perf_counter()
    rl = rl_stage(cfg, task, run_dir)
    timings["rl_s"] = time.perf_counter() - start
    return report_stage(run_dir, sft, rl, timings)


def report_stage(run_dir: Path, sft: dict, rl: dict, timings: dict) -> dict:
    from rlpost.report import format_report, plot_training, summarize_rl_run, write_summary

    summary = summarize_rl_run(run_dir, sft, rl, timings)
    write_summary(run_dir / "summary.json", summary)
    plot_training(run_dir / "metrics.jsonl", run_dir / "training.png", "rlpost quickstart: GRPO on careless-demo SFT")
    print(format_report(summary))
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir / 'tensorboard'})")
    return summary


if __name__ == "__main__":
    main()
