"""The SFT stage: TRL's SFTTrainer on demonstrations, stopped on its validation plateau.

Demonstrations come from the data source (the built-in task's careless demonstrator, or a dataset's
completion column). Prompts are tokenized by the recipe's `PromptFormat`, exactly as rollouts and
evaluation tokenize them, and the completion follows with the tokenizer's EOS; the loss covers the
completion only. With a checker (the task's, or `verifier` for a dataset) the stage validates
greedy accuracy on prompts outside the demonstrations every `eval_every_epochs` epochs, keeps the
best weights and stops after `patience` validations without a new best; `num_train_epochs` is
only an upper bound, and `stage.json` says which of the two ended the stage.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from rlpost.config import setting
from rlpost import lora
from rlpost.errors import UserError
from rlpost.lora import LoraSection
from rlpost.recipe import where

log = logging.getLogger("rlpost.sft")


@dataclass
class SFTStage:
    learning_rate: float = setting(1e-3, "TRL SFTConfig.learning_rate (AdamW)")
    per_device_train_batch_size: int = setting(64, "TRL SFTConfig: demonstrations per step")
    num_train_epochs: int = setting(30, "TRL SFTConfig: upper bound on epochs (validation normally stops first)")
    warmup_steps: int = setting(0, "TRL SFTConfig: linear warm-up steps")
    lr_scheduler_type: str = setting("constant_with_warmup", "TRL SFTConfig: learning-rate schedule")
    demonstrations: int | None = setting(8000, "demonstrations to train on (built-in task: its size; dataset: "
                                               "at most this many rows, None = all)")
    completion_column: str = setting("completion", "dataset column holding the demonstration")
    validation_prompts: int = setting(400, "prompts outside the demonstrations for early stopping")
    eval_every_epochs: int = setting(1, "validate every N epochs")
    patience: int = setting(3, "stop after N validations without a new best")
    verifier: str | None = setting(None, "dataset sources: checker for validation (math, addition, or a "
                                         "reward name); None trains num_train_epochs without validation")
    max_tokens: int = setting(6, "completion budget when validating")
    lora: LoraSection | None = setting(None, "train LoRA adapters instead of all weights: {r, alpha, dropout, "
                                             "target_modules, sync} (rlpost/lora.py); none: full fine-tuning")


def check_sft(cfg: SFTStage, recipe, name: str) -> None:
    for key in ("per_device_train_batch_size", "num_train_epochs", "validation_prompts", "eval_every_epochs",
                "patience", "max_tokens"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' must be >= 1, got {getattr(cfg, key)}")
    if cfg.learning_rate <= 0:
        raise UserError(f"{where(recipe, f'{name}.learning_rate')}: key '{name}.learning_rate' must be > 0, got {cfg.learning_rate}")
    if recipe.data.source == "task":
        from rlpost.training_data import TrainingData

        pool = TrainingData(recipe.data, recipe.seed).pool_size()
        wanted = (cfg.demonstrations or 0) + cfg.validation_prompts
        if not cfg.demonstrations or wanted > pool:
            raise UserError(f"{where(recipe, f'{name}.demonstrations')}: '{name}.demonstrations' + '{name}.validation_prompts' = {wanted} but the task "
                            f"has {pool} training prompts; lower them")


def run_sft_stage(cfg: SFTStage, ctx) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlpost.evaluation.scoring import scorer
    from rlpost.sft import greedy_completions, run_sft

    tokenizer = AutoTokenizer.from_pretrained(ctx.policy_in)
    model = lora.maybe_wrap(AutoModelForCausalLM.from_pretrained(ctx.policy_in, dtype=_dtype(ctx.recipe.model.dtype))
                            .to(ctx.device), cfg.lora)
    fmt = ctx.data.format
    demos = ctx.data.demonstrations(cfg.demonstrations, cfg.completion_column)
    if ctx.recipe.data.decontaminate_against:
        _report_contamination([d["prompt"] + d["completion"] for d in demos], ctx)
    rows = [_tokenize(tokenizer, fmt, d) for d in demos]
    validate = None
    checker = "addition" if ctx.data.is_task else cfg.verifier
    if checker:
        validation = ctx.data.validation(cfg.validation_prompts, {d["prompt"] for d in demos})
        ids = [fmt.token_ids(tokenizer, row) for row in validation]
        score = scorer(checker)

        def validate(policy) -> float:
            from rlpost.evaluation.scoring import Item

            texts = greedy_completions(policy, tokenizer, ids, cfg.max_tokens)
            scores = score([Item(i, row, text) for i, (row, text) in enumerate(zip(validation, texts))])
            return sum(s.score for s in scores) / len(scores)

    result = run_sft(model, tokenizer, rows, validate, out_dir=ctx.out_dir / "trainer", cfg=cfg,
                     seed=ctx.recipe.seed, use_cpu=ctx.device == "cpu")
    lora.save_policy(model, tokenizer, ctx.out_dir / "policy")
    record = {"best_val_accuracy": result.best_accuracy, "best_epoch": result.best_epoch,
              "epochs_run": result.epochs_run, "history": result.history, "wall_s": result.wall_s,
              "demonstrations": len(rows),
              "stopped_on_plateau": validate is not None and result.epochs_run < cfg.num_train_epochs}
    if ctx.data.is_task:
        record["demonstration_accuracy"] = sum(d["completion"] == d["answer"] for d in demos) / len(demos)
    return record


def _tokenize(tokenizer, fmt, row: dict) -> dict:
    """Prompt ids from the recipe's format, then the completion and EOS; loss on the completion only."""
    prompt = fmt.token_ids(tokenizer, row)
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _report_contamination(texts: list[str], ctx) -> None:
    """Tulu 3-style 8-gram overlap of the training rows with each named benchmark, reported before training."""
    from rlpost.evaluation.decontaminate import check_contamination

    report = check_contamination(texts, ctx.recipe.data.decontaminate_against)
    path = ctx.out_dir / "decontamination.json"
    path.write_text(json.dumps(report, indent=2))
    for name, found in report["benchmarks"].items():
        log.warning("%d of %d training rows share an 8-gram with %s (%d benchmark rows); see %s",
                    found["contaminated_train_rows"], len(texts), name, found["contaminated_benchmark_rows"], path)
