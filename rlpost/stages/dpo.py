"""The DPO stage: TRL's DPOTrainer on a file of preference pairs, against the stage's starting policy.

Pairs: `pairs: rollouts` builds them from verified samples of the stage's starting policy (Tulu 3's
recipe: best vs worst sample of each prompt by the recipe's rewards, see `rollout_pairs`); otherwise
`pairs` names a dataset read with `rlpost.data.read_rows` (JSONL, Parquet or a
`save_to_disk` directory; `pairs_split` picks a split, `columns` maps prompt/chosen/rejected to the
dataset's columns). Each row's prompt goes through the recipe's `PromptFormat` (`data.prompt`), so
DPO trains on exactly the prompt token ids rollouts, SFT and evaluation use; `chosen` and
`rejected` are tokenized without special tokens and end with the tokenizer's EOS (as SFT's
completions do). TRL's own text preprocessing would re-tokenize the rendered prompt with special
tokens (a second BOS after a chat template) and tokenize prompt+completion jointly, so the stage
hands TRL the token ids itself (see `_TokenizedDPOTrainer`).

Reference: a second, frozen copy of the stage's starting policy (`ctx.policy_in`), or, with
`precompute_ref_log_probs`, the starting policy's log-probs computed once by TRL before training.
Dropout is off in both (including the attention dropout TRL's own switch misses).

Held-out preference accuracy: `held_out_pairs` pairs (a seeded sample of the file) are not trained
on. Before and after the stage, the record gives the fraction of them on which the policy's
sequence log-probability of the chosen completion, log pi(chosen|x) summed over its tokens with
EOS, strictly exceeds the rejected one's (`held_out_accuracy_*`; not length-normalised, as DPO's
implicit reward is not), the same with per-token means (`held_out_accuracy_per_token_*`), and after
the stage the DPO implicit-reward accuracy, (logp_c - ref_c) - (logp_r - ref_r) > 0
(`held_out_reward_accuracy`, TRL's `rewards/accuracies` on held-out pairs; before training every
such margin is 0, so it has no "before").
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from rlpost.config import setting
from rlpost import lora
from rlpost.errors import UserError
from rlpost.lora import LoraSection
from rlpost.recipe import where

log = logging.getLogger("rlpost.dpo")

# TRL 1.16 `DPOConfig.loss_type` values (DPOTrainer._compute_loss). All of them train on a paired
# dataset with the policy and a reference only: no reward model or judge.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
_TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


@dataclass
class DPOStage:
    pairs: str | None = setting(None, "preference dataset with prompt/chosen/rejected columns: a .jsonl / .parquet "
                                      "file or save_to_disk directory (relative to the working directory), or "
                                      "'rollouts': pairs built from verified samples of the stage's starting "
                                      "policy (the rollout_* keys); required")
    rollout_prompts: int = setting(512, "pairs: rollouts — prompts to sample (the data stream's first N)")
    rollout_samples: int = setting(8, "pairs: rollouts — samples per prompt (vLLM)")
    rollout_temperature: float = setting(1.0, "pairs: rollouts — sampling temperature")
    rollout_max_tokens: int = setting(6, "pairs: rollouts — completion budget in tokens")
    rewards: list = setting(["arithmetic_exact"], "pairs: rollouts — reward functions that rank the samples")
    reward_workers: int = setting(2, "pairs: rollouts — processes scoring rewards")
    pairs_split: str | None = setting(None, "split of a save_to_disk DatasetDict given as `pairs`")
    columns: dict[str, str] = setting({}, "target -> dataset column for `pairs`, e.g. {chosen: good, rejected: bad} "
                                          "(as data.columns: mapped columns renamed, the rest kept)")
    held_out_pairs: int = setting(100, "pairs (a seeded sample) kept out of training to measure preference accuracy "
                                       "before and after the stage; 0 = none")
    learning_rate: float = setting(1e-4, "TRL DPOConfig: AdamW learning rate; TRL's 1e-6 suits large pretrained "
                                         "models, but on the built-in tiny model 1e-5 barely moves in 3 epochs and 1e-4 "
                                         "(10x below its SFT rate) does; lower it for a real model")
    lr_scheduler_type: str = setting("linear", "TRL DPOConfig: learning-rate schedule")
    warmup_steps: int = setting(0, "TRL DPOConfig: linear warm-up steps")
    beta: float = setting(0.1, "TRL DPOConfig: strength of the pull to the reference (higher = closer); the "
                               "regularisation tau for 'ipo'")
    loss_type: str = setting("sigmoid", "TRL DPOConfig: 'sigmoid' is DPO; 'ipo', 'hinge' (SLiC), 'robust' (rDPO, "
                                        "uses label_smoothing), 'apo_zero'/'apo_down' (APO), 'exo_pair', 'nca_pair', "
                                        "'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired', 'discopop', 'sigmoid_norm' "
                                        "as TRL defines them; 'sft' is NLL on chosen only", choices=LOSS_TYPES)
    label_smoothing: float = setting(0.0, "TRL DPOConfig: assumed probability that a pair's label is flipped, in "
                                          "[0, 0.5) ('robust', 'aot*'; 'exo_pair' needs > 0, e.g. 1e-3)")
    per_device_train_batch_size: int = setting(32, "TRL DPOConfig: pairs per optimiser step")
    num_train_epochs: int = setting(3, "TRL DPOConfig: passes over the training pairs")
    max_length: int | None = setting(1024, "TRL DPOConfig: longest prompt + completion in tokens, truncated at the "
                                           "end; pairs whose prompt alone fills it are dropped (counted in the record)")
    precompute_ref_log_probs: bool = setting(False, "TRL DPOConfig: compute the reference log-probs once before "
                                                    "training instead of keeping a second copy of the model")
    gradient_checkpointing: bool = setting(False, "TRL DPOConfig: recompute activations in the backward pass (less "
                                                  "memory for large models, ~20% slower; TRL's default is on)")
    lora: LoraSection | None = setting(None, "train LoRA adapters instead of all weights: {r, alpha, dropout, "
                                             "target_modules, sync} (rlpost/lora.py); none: full fine-tuning")


def check_dpo(cfg: DPOStage, recipe, name: str) -> None:
    for key in ("per_device_train_batch_size", "num_train_epochs"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' must be >= 1, got {getattr(cfg, key)}")
    for key in ("held_out_pairs", "warmup_steps"):
        if getattr(cfg, key) < 0:
            raise UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' must be >= 0, got {getattr(cfg, key)}")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise UserError(f"{where(recipe, f'{name}.max_length')}: key '{name}.max_length' must be >= 2 (or null for "
                        f"no truncation), got {cfg.max_length}")
    for key in ("learning_rate", "beta"):
        if not getattr(cfg, key) > 0:
            raise UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' must be > 0, got {getattr(cfg, key)}")
    if cfg.loss_type not in LOSS_TYPES:  # the config's `choices` catch this on load; kept for direct use
        raise UserError(f"{where(recipe, f'{name}.loss_type')}: key '{name}.loss_type' must be one of "
                        f"{', '.join(LOSS_TYPES)}, got {cfg.loss_type!r}")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise UserError(f"{where(recipe, f'{name}.label_smoothing')}: key '{name}.label_smoothing' must be in [0, 0.5), "
                        f"got {cfg.label_smoothing}")
    if cfg.loss_type == "exo_pair" and cfg.label_smoothing == 0:
        raise UserError(f"{where(recipe, f'{name}.label_smoothing')}: loss_type 'exo_pair' needs '{name}.label_smoothing' "
                        f"> 0 (the EXO paper uses 1e-3)")
    if cfg.pairs == ROLLOUTS:
        from rewards.registry import parse_reward_specs, resolve

        for key in ("rollout_prompts", "rollout_samples", "rollout_max_tokens", "reward_workers"):
            if getattr(cfg, key) < (2 if key == "rollout_samples" else 1):
                raise UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' is too small "
                                f"(got {getattr(cfg, key)}; rollout_samples needs 2 to make a pair)")
        if cfg.rollout_temperature <= 0:
            raise UserError(f"{where(recipe, f'{name}.rollout_temperature')}: key '{name}.rollout_temperature' "
                            f"must be > 0: greedy samples are all alike and make no pairs")
        try:
            for spec in parse_reward_specs(cfg.rewards):
                resolve(spec.name)
        except UserError as exc:
            raise UserError(f"{where(recipe, f'{name}.rewards')}: key '{name}.rewards': {exc}") from None
        if cfg.held_out_pairs >= cfg.rollout_prompts:
            raise UserError(f"{where(recipe, f'{name}.held_out_pairs')}: key '{name}.held_out_pairs' "
                            f"({cfg.held_out_pairs}) must be below '{name}.rollout_prompts' ({cfg.rollout_prompts})")
        return
    rows = read_pairs(cfg, recipe, name)
    if cfg.held_out_pairs >= len(rows):
        raise UserError(f"{where(recipe, f'{name}.held_out_pairs')}: key '{name}.held_out_pairs' ({cfg.held_out_pairs}) "
                        f"leaves none of the {len(rows)} pairs to train on; lower it")


def read_pairs(cfg: DPOStage, recipe, name: str, base_dir: Path | None = None) -> list[dict]:
    """The rows of `cfg.pairs`, each with text prompt/chosen/rejected and every column the prompt template
    reads; any problem is a one-line UserError naming the key, the file, the row and the column."""
    from rlpost.data import read_rows

    if cfg.pairs is None:
        raise UserError(f"{where(recipe, name)}: stage '{name}' (dpo) needs key '{name}.pairs': a .jsonl / .parquet "
                        f"file or save_to_disk directory with prompt, chosen and rejected columns")
    prefix = f"{where(recipe, f'{name}.pairs')}: key '{name}.pairs'"
    try:
        rows = read_rows(cfg.pairs, split=cfg.pairs_split, columns=cfg.columns, base_dir=base_dir)
    except UserError as err:
        raise UserError(f"{prefix}: {err}") from None
    source = cfg.pairs
    template = recipe.data.prompt
    for i, row in enumerate(rows):
        for target in ("chosen", "rejected"):
            column = cfg.columns.get(target, target)
            if target not in row:
                raise UserError(f"{prefix}: {source}: row {i} has no {target} column {column!r}; its columns are: "
                                f"{', '.join(row)}; map one with columns={{{target}: NAME}}")
            if not isinstance(row[target], str):
                raise UserError(f"{prefix}: {source}: row {i} column {column!r} holds {type(row[target]).__name__}, "
                                f"not {target} completion text; fix the row or map a text column to '{target}'")
        missing = [c for c in template.columns if c not in row]
        if missing:
            raise UserError(f"{prefix}: {source}: row {i} has no column {missing[0]!r}, which the prompt template "
                            f"{template.template!r} reads; its columns are: {', '.join(row)}")
    return rows


ROLLOUTS = "rollouts"


def best_and_worst(totals: list[float | None], texts: list[str]):
    """((reward, text) of the first highest-reward sample, (reward, text) of the first lowest), or None
    when the rewards do not differ; masked samples (reward None) take no part."""
    scored = [(t, x) for t, x in zip(totals, texts) if t is not None]
    if not scored:
        return None
    best, worst = max(scored, key=lambda s: s[0]), min(scored, key=lambda s: s[0])
    return (best, worst) if best[0] > worst[0] else None


def rollout_pairs(cfg: DPOStage, ctx, tokenizer) -> list[dict]:
    """Preference pairs from verified rollouts of the stage's starting policy (Tulu 3's on-policy pairs):
    `rollout_samples` samples for each of the data stream's first `rollout_prompts` prompts, scored by
    `rewards` in the isolated pool; per prompt, chosen = the first sample with the highest total
    reward, rejected = the first with the lowest, kept only when the two rewards differ (masked
    samples never count). Cached in RUN/<stage>/pairs.jsonl, so a resumed stage trains on the same pairs."""
    import json

    from rewards.pool import RewardPool
    from rewards.registry import parse_reward_specs
    from rollouts.engine import EngineSettings, RolloutEngine

    cache = ctx.out_dir / "pairs.jsonl"
    if cache.exists():
        return [json.loads(line) for line in cache.read_text().splitlines()]
    source = ctx.data.prompts()
    rows = [{**columns, "prompt": prompt} for prompt, columns in (source.get(i) for i in range(cfg.rollout_prompts))]
    engine = RolloutEngine(ctx.policy_in, ctx.engine_settings or EngineSettings())
    try:
        outputs = engine.generate([ctx.data.format.token_ids(tokenizer, r) for r in rows], n=cfg.rollout_samples,
                                  temperature=cfg.rollout_temperature, max_tokens=cfg.rollout_max_tokens)
    finally:
        engine.close()
    k = cfg.rollout_samples
    texts = [g.text for gens in outputs for g in gens]
    columns = {key: [r[key] for r in rows for _ in range(k)] for key in rows[0] if key != "prompt"}
    with RewardPool(parse_reward_specs(cfg.rewards), workers=cfg.reward_workers) as pool:
        totals = pool.score([r["prompt"] for r in rows for _ in range(k)], texts,
                            [list(g.token_ids) for gens in outputs for g in gens], columns).total
    pairs = []
    for i, row in enumerate(rows):
        pair = best_and_worst(totals[i * k:(i + 1) * k], texts[i * k:(i + 1) * k])
        if pair is not None:
            (chosen_reward, chosen), (rejected_reward, rejected) = pair
            pairs.append({**row, "chosen": chosen, "rejected": rejected,
                          "chosen_reward": chosen_reward, "rejected_reward": rejected_reward})
    if len(pairs) <= cfg.held_out_pairs:
        raise UserError(f"{ctx.name}: only {len(pairs)} of {len(rows)} prompts had samples with different rewards "
                        f"(need more than held_out_pairs={cfg.held_out_pairs}); raise {ctx.name}.rollout_prompts or "
                        f"{ctx.name}.rollout_samples, or train the policy further first")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "rollouts.json").write_text(json.dumps(
        {"samples": len(texts), "completion_tokens": sum(len(g.token_ids) for gens in outputs for g in gens),
         "pairs": len(pairs)}))
    cache.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return pairs


def split_pairs(rows: list[dict], held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): `held_out` rows drawn by a seeded shuffle, the rest in file order."""
    order = list(range(len(rows)))
    random.Random(f"dpo-held-out:{seed}").shuffle(order)
    held = set(order[:held_out])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def tokenize_pair(tokenizer, fmt, row: dict) -> dict:
    """TRL's pre-tokenized preference row: the recipe format's prompt ids, then each completion's ids + EOS."""
    return {"prompt_ids": fmt.token_ids(tokenizer, row),
            "chosen_ids": _completion_ids(tokenizer, row["chosen"]),
            "rejected_ids": _completion_ids(tokenizer, row["rejected"])}


def _completion_ids(tokenizer, text: str) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise UserError("the policy's tokenizer has no EOS token, which ends DPO's completions; give it one")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids or ids[-1] != tokenizer.eos_token_id:  # as TRL: a completion already ending in EOS keeps one
        ids.append(tokenizer.eos_token_id)
    return ids


# ----------------------------------------------------------------------------- TRL


def _dpo_trainer_class():
    """DPOTrainer taking rows that are already `{prompt_ids, chosen_ids, rejected_ids}`.

    TRL 1.16's `DPOTrainer._prepare_dataset` (private) always tokenizes text columns; this subclass
    overrides it to pass such a dataset through unchanged (the stage drops over-long prompts itself,
    by TRL's rule). Its signature is pinned here and in tests/test_dpo_stage.py, so a TRL that renames
    it fails loudly instead of tokenizing `prompt` text that is not there."""
    from trl import DPOTrainer

    expected = ["self", "dataset", "processing_class", "args", "dataset_name"]
    method = getattr(DPOTrainer, "_prepare_dataset", None)
    found = list(inspect.signature(method).parameters) if method is not None else None
    if found != expected:
        raise RuntimeError(f"this TRL's DPOTrainer._prepare_dataset has parameters {found}, not {expected} (TRL 1.16): "
                           f"rlpost.stages.dpo feeds it token ids and must be updated for this TRL version")

    class _TokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
            if missing:
                raise ValueError(f"{dataset_name} dataset lacks {sorted(missing)}: give tokenize_pair rows")
            return dataset

    return _TokenizedDPOTrainer


def fits(row: dict, max_length: int | None) -> bool:
    """TRL's rule (keep_start truncation): a pair whose prompt alone fills max_length is dropped."""
    return max_length is None or len(row["prompt_ids"]) < max_length


def build_dpo_trainer(model, ref_model, tokenizer, rows: list[dict], cfg, *, out_dir: Path, seed: int = 0,
                      use_cpu: bool = True, callbacks=()):
    """TRL's DPOTrainer on tokenized rows (`tokenize_pair`), with `cfg`'s DPOConfig keys; `ref_model` None
    only with `cfg.precompute_ref_log_probs` (TRL then precomputes with `model` before any step)."""
    from datasets import Dataset
    from trl import DPOConfig

    args = DPOConfig(
        output_dir=str(out_dir),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=cfg.label_smoothing,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        num_train_epochs=cfg.num_train_epochs,
        max_length=cfg.max_length,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        precompute_ref_batch_size=max(64, cfg.per_device_train_batch_size),
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=False,  # TRL defaults to bf16 autocast: ~10x slower on CPUs without AMX; weights keep model.dtype
        disable_dropout=True,
        logging_steps=10,
        report_to=[],  # TensorBoard through our own writer (see run_dpo)
        save_strategy="epoch",  # a killed stage resumes from its last finished epoch
        save_total_limit=1,
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=use_cpu,
    )
    trainer_class = _dpo_trainer_class()
    trainer = trainer_class(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, callbacks=list(callbacks))
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


# ----------------------------------------------------------------------------- held-out accuracy


def sequence_logps(model, rows: list[dict], pad_token_id: int, max_length: int | None = None,
                   batch_size: int = 64):
    """Per pair: summed log-probs of the chosen and rejected completion tokens (as TRL's DPO sums them, after
    its truncation) and their token counts; returns four 1-D float tensors (chosen, rejected, n_c, n_r)."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=pad_token_id, max_length=max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, counts = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            ids = batch["input_ids"].to(device)
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
            logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            mask = batch["completion_mask"][:, 1:].to(device).float()
            n = len(batch["input_ids"]) // 2
            seq, cnt = (logps * mask).sum(1).cpu(), mask.sum(1).cpu()
            sums.append((seq[:n], seq[n:]))
            counts.append((cnt[:n], cnt[n:]))
    model.train(was_training)
    cat = lambda parts, k: torch.cat([p[k] for p in parts]) if parts else torch.zeros(0)  # noqa: E731
    return cat(sums, 0), cat(sums, 1), cat(counts, 0), cat(counts, 1)


def preference_accuracy(chosen, rejected, n_chosen, n_rejected) -> dict:
    """Fractions of pairs whose chosen completion out-scores the rejected: summed and per-token log-probs."""
    if len(chosen) == 0:
        return {"accuracy": None, "accuracy_per_token": None, "mean_logp_margin": None}
    per_token = chosen / n_chosen.clamp(min=1) > rejected / n_rejected.clamp(min=1)
    return {"accuracy": float((chosen > rejected).float().mean()),
            "accuracy_per_token": float(per_token.float().mean()),
            "mean_logp_margin": float((chosen - rejected).mean())}


# ----------------------------------------------------------------------------- the stage


def run_dpo(cfg: DPOStage, ctx) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlpost.checkpoint import last_trainer_checkpoint
    from rlpost.learners.grpo import disable_dropout

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(ctx.policy_in)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[ctx.recipe.model.dtype]

    def load():
        model = AutoModelForCausalLM.from_pretrained(ctx.policy_in, dtype=dtype).to(ctx.device)
        disable_dropout(model)
        return model

    model = lora.maybe_wrap(load(), cfg.lora)
    ref_model = None
    if not cfg.precompute_ref_log_probs:
        ref_model = load().eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fmt = ctx.data.format
    rows = rollout_pairs(cfg, ctx, tokenizer) if cfg.pairs == ROLLOUTS else read_pairs(cfg, ctx.recipe, ctx.name)
    train_rows, held_rows = split_pairs(rows, cfg.held_out_pairs, ctx.recipe.seed)
    train = [tokenize_pair(tokenizer, fmt, r) for r in train_rows]
    kept = [r for r in train if fits(r, cfg.max_length)]
    if not kept:
        raise UserError(f"{where(ctx.recipe, f'{ctx.name}.max_length')}: every training pair's prompt fills "
                        f"'{ctx.name}.max_length' ({cfg.max_length} tokens); raise it")
    held = [r for r in (tokenize_pair(tokenizer, fmt, r) for r in held_rows) if fits(r, cfg.max_length)]

    # The starting policy is the reference: its log-probs on the held-out pairs are "before" and the baseline
    # of the implicit reward after.
    before = sequence_logps(model, held, tokenizer.pad_token_id, cfg.max_length)

    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    trainer_dir = ctx.out_dir / "trainer"
    writer = SummaryWriter(str(ctx.out_dir / "tensorboard"))
    trainer = build_dpo_trainer(model, ref_model, tokenizer, kept, cfg, out_dir=trainer_dir, seed=ctx.recipe.seed,
                                use_cpu=ctx.device == "cpu", callbacks=[TensorBoardCallback(writer)])
    last = last_trainer_checkpoint(trainer_dir)
    if last is not None:
        log.info("resuming DPO from %s", last)
    train_start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=last)
    train_wall_s = time.perf_counter() - train_start
    writer.close()

    after = sequence_logps(model, held, tokenizer.pad_token_id, cfg.max_length)
    lora.save_policy(model, tokenizer, ctx.out_dir / "policy")

    acc_before, acc_after = preference_accuracy(*before), preference_accuracy(*after)
    reward_accuracy = None
    if held:
        margin = (after[0] - before[0]) - (after[1] - before[1])
        reward_accuracy = float((margin > 0).float().mean())
    # TRL averages its metrics over each logging window (logging_steps=10); the last window with metrics is
    # the one the end-of-training log closes, which carries no "loss" (transformers reports `train_loss` there).
    logged = [e for e in trainer.state.log_history if "rewards/margins" in e]
    final = logged[-1] if logged else {}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "pairs_source": cfg.pairs,
        "pairs": len(rows),
        "pairs_trained": len(kept),
        "pairs_dropped_too_long": len(train) - len(kept),
        "held_out_pairs": len(held),
        "loss_type": cfg.loss_type,
        "beta": cfg.beta,
        "held_out_accuracy_before": acc_before["accuracy"],
        "held_out_accuracy_after": acc_after["accuracy"],
        "held_out_accuracy_per_token_before": acc_before["accuracy_per_token"],
        "held_out_accuracy_per_token_after": acc_after["accuracy_per_token"],
        "held_out_logp_margin_before": acc_before["mean_logp_margin"],
        "held_out_logp_margin_after": acc_after["mean_logp_margin"],
        "held_out_reward_accuracy": reward_accuracy,
        "steps": trainer.state.global_step,
        "final_train_loss": losses[-1] if losses else None,
        "mean_train_loss": output.training_loss,
        **{k: final.get(k) for k in _TRL_METRICS},
        "history": [{"step": e["step"], "loss": e.get("loss"), **{k: e.get(k) for k in _TRL_METRICS}} for e in logged],
        "resumed_from": str(last) if last else None,
        "train_wall_s": train_wall_s,
        "stage_wall_s": time.perf_counter() - start,
    }
