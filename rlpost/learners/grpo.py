"""GRPO learner: TRL's GRPO loss applied to batches that come from the rollout buffer.

TRL's `GRPOTrainer` generates its own samples; here generation happens elsewhere (the rollout
worker), so this learner builds the trainer only for its loss (`GRPOTrainer.compute_loss`: clipped
surrogate, optional KL to a reference, loss-type normalisation, TRL's vLLM importance-sampling
correction) and drives the optimisation steps itself.

One rollout batch, several optimiser steps (TRL's `num_iterations` = mu and `steps_per_generation`
= S). `step(groups)` trains on one rollout batch of G groups. Fixed for the whole batch, computed
once in `build_inputs` with the weights theta_0 held *before* the batch's first update:

    pi_old = pi_{theta_0}                          (`old_per_token_logps`)
    A_i    = group advantage over the full groups  (`advantages.group_advantages`)
    w_{i,t} = min(pi_old(y_t) / pi_sampler(y_t), cap)   sampler importance weight
              (`advantages.truncated_importance_weights`; pi_sampler: vLLM's sampling logprobs)
    pi_ref logprobs (beta > 0) and `num_items_in_batch` (tokens of the whole batch)

(With mu = S = 1, the default, the batch gets one optimiser step with theta = theta_0, so pi_old
is taken from the loss's own forward, detached, rather than from a separate forward: the same
values, one forward fewer. Every forward runs a group's shared prompt through the decoder once,
`shared_prefix_logps`.)

Then for each of the mu passes, for each of the S mini-batches (G/S whole groups each, in batch
order, the same split every pass), one optimiser step on TRL's loss with the current weights theta:

    token level ("token"):      r_{i,t} = pi_theta(y_t) / pi_old(y_t)
    sequence level ("sequence", GSPO):
                                r_i = exp( (1/|m_i|) sum_t m_{i,t} log(pi_theta(y_t) / pi_old(y_t)) )
                                (the geometric mean of the token ratios, one per completion)
    loss_{i,t} = -min(r * A_i, clip(r, 1 - eps_low, 1 + eps_high) * A_i) * w_{i,t} + beta * KL_{i,t}

with eps_low = `epsilon`, eps_high = `epsilon_high` (None: = epsilon; DAPO's asymmetric clip when
larger), aggregated per TRL's `loss_type`. So the first step of a batch sees r = 1 exactly (the clip
cannot bind, its gradient is the plain policy gradient A * w * grad log pi); every later step (the
second mini-batch, the second pass) sees r != 1 and the clip stops a token (or a sequence) from
being pushed further once r leaves [1 - eps_low, 1 + eps_high] in the direction of its advantage.
TRL counts those as `clip_ratio/low_mean` (r < 1 - eps_low, A < 0), `clip_ratio/high_mean`
(r > 1 + eps_high, A > 0) and `clip_ratio/region_mean` (either), token means over the mini-batch
(sequence means at sequence level); `step` reports each TRL metric as `train/<name>` averaged over
the batch's optimiser steps, and `train/optimizer_steps`. Other loss types: "cispo" weights
-A * log pi_theta by the detached clamp(r, max=epsilon_high) (an absolute cap, TRL recommends 5.0);
"sapo" replaces the clip by the soft gate sigmoid(tau * (r - 1)) * 4 / tau; "luspo" (sequence level)
sums each completion's terms instead of averaging them. "dapo" and "cispo" normalise each
mini-batch by num_items_in_batch / S (TRL reads `args.steps_per_generation`). With mu = S = 1 this
is a single step with r = 1, exactly the learner's behaviour before these settings existed.

KL to the reference (beta > 0). The reference pi_ref is a frozen copy of the stage's starting
policy, passed as `reference_model`; its logprobs are computed once per batch, without gradient,
in `build_inputs` (`ref_per_token_logps`). With d_{i,t} = log pi_ref(y_t) - log pi_theta(y_t), TRL
uses Schulman's k3 estimator of KL(pi_theta || pi_ref) from samples of pi_theta:

    KL_{i,t} = exp(d_{i,t}) - d_{i,t} - 1   (>= 0, exactly 0 where pi_theta = pi_ref)

multiplied by the ratio r (TRL's `use_bias_correction_kl`, on by default: r = 1 in value on a
batch's first step, where it changes only the gradient; the logged `kl` includes the factor), and
aggregates beta * KL like the rest of the per-token loss: for loss_type "grpo" the KL part of
the loss is beta * (1/B) sum_i (1/|m_i|) sum_t m_{i,t} KL_{i,t}; for "bnpo"/"dapo" it is
beta * sum_{i,t} m KL / sum_{i,t} m. TRL logs the token mean sum m KL / sum m as `train/kl`.
TRL would build its own reference by reloading the policy's `name_or_path` (wrong after a resume,
impossible for an in-memory model), so the trainer is built with beta = 0 and `trainer.beta` is set
afterwards; `_compute_loss` reads `self.beta` (pinned by tests/test_learner_defects.py).

Masked samples. A sample whose reward is missing (None from the reward pool: the function failed,
or none applied; also NaN/inf) has no reward and is never trained on: it is left out of its group's
mean and std, its advantage is 0 and its completion-mask row is zeroed, so neither its policy term
nor its KL term reaches the loss or the gradient. A group with fewer than 2 valid samples has no
baseline and contributes nothing (all its rows are zeroed). As with TRL's own zeroed rows
(`mask_truncated_completions`), a zeroed row still counts in the batch size B of the per-sequence
loss types ("grpo", "dr_grpo"). A mini-batch with no trainable row gets no optimiser step; when no
row of the whole batch is trainable no step is taken at all (parameters and optimiser state
untouched) and `train/skipped_step` is 1.

Dropout. The policy's and the reference's dropout is switched off (`disable_dropout`): logprobs
must be deterministic for the sampler/learner parity and the importance ratios.

Non-finite updates. Each optimiser step goes through `rlpost.learners.update.apply_update`: a NaN/inf
loss or gradient norm skips that step (parameters and optimiser moments untouched, gradients
zeroed), counted as `train/nonfinite_updates`; `train/nonfinite_step` = 1 when all of a batch's
attempted steps were skipped (`NonFiniteStreak` in the same module stops a run after several).

Several processes (`accelerator=`, an `accelerate.Accelerator` of W > 1 processes: DDP, FSDP2,
DeepSpeed; `rlpost.distributed`). The policy and optimiser are `accelerator.prepare`d; `self.model`
stays the unwrapped policy. Every rank's `step` gets the same whole batch of G groups and trains on
its shard (`rlpost.distributed.shard_groups`: of each of the S mini-batches of G/S groups, its
consecutive G/(S W) groups; G must divide by S x W, else ValueError). pi_old, advantages (per
group), sampler weights and reference logprobs are computed on the shard; gradients are averaged
over ranks (DDP), clipped as one all-reduced gradient, and the update equals the single-process
one on the whole batch, up to float reassociation, because for every loss type the mean over
ranks of the ranks' losses is the whole mini-batch's loss:

    "grpo", "sapo" (per-sequence means, averaged), "luspo" (per-sequence sums, averaged) and
    "dr_grpo" (token sum / (rows x max_completion_length)): equal shards, so the average of the
    ranks' means is the mean over the mini-batch;
    "dapo", "cispo": TRL divides the token sum by num_items_in_batch / W, so num_items_in_batch
    is set to the whole batch's trainable tokens (`trainable_token_counts`), not the shard's;
    "bnpo": TRL divides by the rank's own tokens n_r; the rank's loss is rescaled by n_r W / n
    (n: the mini-batch's tokens over all ranks), making the average the token mean over all n.

A mini-batch is skipped (on every rank) when it has no trainable token on any rank, so the ranks
take the same steps. The non-finite guard decides collectively (`apply_update`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from datasets import Dataset

from rlpost.learners import kl as kl_estimators
from rlpost.learners.advantages import (group_advantages, importance_weight_stats, rloo_advantages,
                                        truncated_importance_weights)
from rlpost.learners.update import apply_update, nonfinite_scalars
from rollouts.buffer import RolloutGroup


# The `loss_type`s of TRL 1.16's `_compute_loss` that this learner can feed, and the importance
# sampling level each may use. TRL's "vespo" is left out: it folds the sampler weights into its
# sequence weight as an unmasked sum of log(importance_sampling_ratio) over all T positions, which
# our weights (0 on padding) turn into log(1e-8) per padding token, and TRL validates its sampler
# mode only in __init__, which this learner bypasses (see `GRPOLearner.__init__`).
# Sequence level (GSPO) only with the per-sequence objectives: TRL warns that "bnpo", "dr_grpo",
# "dapo" and "cispo" sum token terms, weighting each sequence by its length; "luspo" needs it.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SEQUENCE_LEVEL_LOSS_TYPES = ("grpo", "sapo", "luspo")
TOKEN_LEVEL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


def loss_level_conflict(loss_type: str, importance_sampling_level: str) -> str | None:
    """Why TRL 1.16 rejects (or warns about) this pairing, or None when it is fine."""
    if importance_sampling_level == "sequence" and loss_type not in SEQUENCE_LEVEL_LOSS_TYPES:
        return (f"loss_type '{loss_type}' sums per-token terms, which weights each sequence by its length instead "
                f"of optimising the per-sequence (GSPO) objective; use loss_type "
                f"{', '.join(SEQUENCE_LEVEL_LOSS_TYPES)} or importance_sampling_level 'token'")
    if importance_sampling_level == "token" and loss_type not in TOKEN_LEVEL_LOSS_TYPES:
        return (f"loss_type '{loss_type}' is a sequence-level loss and needs importance_sampling_level 'sequence'")
    return None


@dataclass
class LearnerSettings:
    learning_rate: float = 1e-4
    beta: float = 0.0
    loss_type: str = "grpo"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: = epsilon (symmetric clip); for "cispo" the cap on the ratio
    importance_sampling_level: str = "token"  # "token" or "sequence" (GSPO)
    num_iterations: int = 1  # optimisation passes over each rollout batch (TRL's mu)
    steps_per_generation: int = 1  # mini-batches per rollout batch, one optimiser step each
    max_grad_norm: float = 1.0
    importance_cap: float = 2.0
    scale_rewards: str = "group"
    advantage_estimator: str = "grpo"  # "grpo" (group_advantages) or "rloo" (rloo_advantages, unscaled)
    max_completion_length: int = 8
    temperature: float = 1.0  # must equal the rollout temperature: TRL scales logits by it
    seed: int = 0


def _unused_reward(prompts, completions, **kwargs):  # rewards are computed by the rollout worker
    return [0.0] * len(completions)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(row) for row in rows])
    width = int(lengths.max())
    mask = torch.arange(width)[None, :] >= width - lengths[:, None]
    return _fill(rows, mask, pad, torch.long)


def _right_pad(rows: list[list], pad, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(row) for row in rows])
    mask = torch.arange(max(1, int(lengths.max())))[None, :] < lengths[:, None]
    return _fill(rows, mask, pad, dtype)


def _fill(rows: list[list], mask: torch.Tensor, pad, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, mask as long): the rows' values, in order, at the True positions of `mask` (row-major)."""
    values = torch.full(mask.shape, pad, dtype=dtype)
    values[mask] = torch.tensor([v for row in rows for v in row], dtype=dtype)
    return values, mask.long()


_DROPOUT_NAMES = ("dropout", "pdrop", "layerdrop", "drop_path")


def _is_dropout_rate(name: str, value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            and any(key in name.lower() for key in _DROPOUT_NAMES))


def _zero_config_dropout(config, seen: set[int]) -> None:
    from transformers import PretrainedConfig

    if id(config) in seen:
        return
    seen.add(id(config))
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _zero_config_dropout(value, seen)
        elif _is_dropout_rate(name, value):
            setattr(config, name, 0.0)


def disable_dropout(model: torch.nn.Module) -> None:
    """Switch off every kind of dropout in `model`, in train mode too.

    TRL's `disable_dropout_in_model` sets p = 0 on each `nn.Dropout` module; that misses dropout
    applied functionally from a float attribute (Qwen2/Llama attention read `self.attention_dropout`
    into scaled_dot_product_attention in train mode) or from the config at forward time. So also
    every positive numeric module attribute and config field (sub-configs included) whose name
    contains "dropout", "pdrop", "layerdrop" or "drop_path" is set to 0.
    """
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(model)
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if _is_dropout_rate(name, value):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        _zero_config_dropout(config, set())


def split_by_groups(inputs: dict, group_size: int, parts: int) -> list[dict]:
    """`inputs` (from `build_inputs`) cut along the batch into `parts` mini-batches of whole groups.

    Every tensor whose first dimension is the batch (B = groups x group_size) is sliced: rows
    [k * B/parts, (k+1) * B/parts) for mini-batch k, so group boundaries are kept and each row keeps
    the values computed on the full batch (advantages, pi_old, sampler weights, reference logprobs).
    Scalars, `num_items_in_batch` among them, are shared: TRL's "dapo"/"cispo" normalisation expects
    the whole batch's token count (and divides it by `steps_per_generation`). Padding columns are
    kept, so a row's tensors are the same in every mini-batch it could be in."""
    batch = inputs["completion_ids"].size(0)
    if batch % group_size:
        raise ValueError(f"a batch of {batch} rows is not made of groups of {group_size}")
    groups = batch // group_size
    if parts < 1 or groups % parts:
        raise ValueError(f"{groups} groups do not split into {parts} mini-batches of whole groups "
                         f"(steps_per_generation must divide the groups per batch)")
    rows = batch // parts
    out = []
    for k in range(parts):
        out.append({key: value[k * rows:(k + 1) * rows]
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == batch else value
                    for key, value in inputs.items()})
    return out


def _mean_finite(values: list[float]) -> float:
    """Mean of the non-NaN values (as TRL's `log` averages its metrics); NaN when there is none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values[mask].mean()) if mask.any() else float("nan")


def _has_reward(reward) -> bool:
    """A reward the learner may train on: not None (masked by the reward pool) and a finite number."""
    if reward is None:
        return False
    try:
        return math.isfinite(float(reward))
    except (TypeError, ValueError):
        return False


def shared_prefix_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                        compute_entropy: bool = False):
    """Per-token logprobs (and entropies) of the last `logits_to_keep` tokens of each row, as TRL's
    `_get_per_token_logps_and_entropies` computes them, but with each run of identical prompt rows
    (a rollout group's samples share their prompt) run through the decoder once; None when no two
    consecutive rows share a prompt (nothing to save), or the prompt is a single token.

    With prompt p (length L, left-padded) and completion c (length T) of row i:

        prefix:  decoder(p[:L-1]) once per distinct prompt, keeping its keys and values (the cache);
                 the cache's rows are then repeated for every row of the run (`batch_select_indices`);
        rest:    the model's fused head (TRL's `add_fused_lm_head`) on [p[L-1], c_<T-1] attending to
                 that cache, with `shift_labels` c: log_probs[t] = log pi(c_t | p, c_<t), t = 0..T-1.
                 The last completion token predicts nothing, so it never enters the decoder (TRL's
                 full forward computes its hidden state and drops its logits).

    Positions continue from the cache (the same positions as one forward of [p, c]), so the values
    are the full forward's up to float reassociation; gradients reach the prefix through the cache
    (repeating rows sums their gradients). Work: sum over runs of L-1 prefix tokens + B T, against
    B (L + T) - for 8 groups of 16 samples with L = 7, T = 5: 48 + 640 against 1,536 tokens."""
    completion_start = input_ids.size(1) - logits_to_keep
    if completion_start < 2 or input_ids.size(0) < 2:
        return None
    prompts, prompt_mask = input_ids[:, :completion_start], attention_mask[:, :completion_start]
    new_run = torch.ones(prompts.size(0), dtype=torch.bool, device=prompts.device)
    new_run[1:] = ((prompts[1:] != prompts[:-1]) | (prompt_mask[1:] != prompt_mask[:-1])).any(dim=1)
    if bool(new_run.all()):
        return None
    run_of_row = torch.cumsum(new_run.long(), dim=0) - 1
    firsts = new_run.nonzero().squeeze(1)
    decoder = model.get_decoder()  # the transformer without its head (LoRA layers, if any, are inside it)
    prefix = decoder(input_ids=prompts[firsts, :-1], attention_mask=prompt_mask[firsts, :-1], use_cache=True)
    cache = prefix.past_key_values
    cache.batch_select_indices(run_of_row)
    rest = input_ids[:, completion_start - 1:-1]
    labels = input_ids[:, completion_start:].masked_fill(attention_mask[:, completion_start:] == 0, -100)
    out = model(input_ids=rest, attention_mask=attention_mask[:, :-1], past_key_values=cache, shift_labels=labels,
                fused_lm_head=True)
    return out.log_probs, out.entropy if compute_entropy else None


def trainable_token_counts(groups: list[RolloutGroup]) -> list[int]:
    """Per group: the completion tokens that reach the loss (`build_inputs`' completion mask): those of
    its valid samples when it has >= 2 of them, else 0."""
    counts = []
    for group in groups:
        ok = [_has_reward(r) for r in group.rewards]
        counts.append(sum(len(c) for c, v in zip(group.completion_ids, ok) if v) if sum(ok) >= 2 else 0)
    return counts


def flatten_groups(groups: list[RolloutGroup]):
    """One row per sample: (prompt ids, completion ids, sampling logprobs, rewards with masked ones as 0.0,
    validity mask). A sample's reward is valid when it is a finite number (None = masked)."""
    prompts, completions, sampling, rewards = [], [], [], []
    for group in groups:
        if len(group.rewards) != group.size:
            raise ValueError(f"group {group.prompt_index} has {len(group.rewards)} rewards for {group.size} samples")
        for ids, logps, reward in zip(group.completion_ids, group.sampling_logprobs, group.rewards):
            prompts.append(group.prompt_ids)
            completions.append(ids)
            sampling.append(logps)
            rewards.append(reward)
    valid = torch.tensor([_has_reward(r) for r in rewards], dtype=torch.bool)
    values = torch.tensor([float(r) if ok else 0.0 for r, ok in zip(rewards, valid.tolist())], dtype=torch.float32)
    return prompts, completions, sampling, values, valid


def freeze_reference(reference, temperature: float, cast_lm_head_to_fp32: bool) -> None:
    """Make `reference` a frozen reference: dropout off, no gradients, eval mode, and the same fused,
    temperature-scaled logprob head TRL puts on the policy (and on its own reference)."""
    from trl.trainer.utils import add_fused_lm_head

    disable_dropout(reference)
    reference.requires_grad_(False)
    reference.eval()
    add_fused_lm_head(reference, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32)


class GRPOLearner:
    """Owns the policy model and its optimiser; `step(groups)` trains on one rollout batch with TRL's
    loss (`num_iterations` x `steps_per_generation` optimiser steps; one by default).

    `reference_model` (required when `settings.beta > 0`, unused otherwise): a separate, frozen copy
    of the stage's starting policy for the KL term; it is put in eval mode, its parameters stop
    requiring gradients and its dropout is disabled."""

    # whether `step` can train across several processes (PrimeLearner: not yet, its PRM is not sharded)
    multi_process = True

    def __init__(self, model, tokenizer, settings: LearnerSettings, output_dir: str, group_size: int,
                 reference_model=None, accelerator=None):
        from trl import GRPOConfig, GRPOTrainer

        if settings.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {settings.loss_type!r} is not supported; use one of {LOSS_TYPES}")
        if settings.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level {settings.importance_sampling_level!r}: "
                             f"use one of {IMPORTANCE_SAMPLING_LEVELS}")
        conflict = loss_level_conflict(settings.loss_type, settings.importance_sampling_level)
        if conflict:
            raise ValueError(conflict)
        if settings.loss_type == "cispo" and (settings.epsilon_high is None or settings.epsilon_high < 1):
            raise ValueError(f"loss_type 'cispo' caps the ratio at epsilon_high itself: set it >= 1 (TRL recommends "
                             f"5.0), got {settings.epsilon_high}")
        if settings.num_iterations < 1 or settings.steps_per_generation < 1:
            raise ValueError(f"num_iterations ({settings.num_iterations}) and steps_per_generation "
                             f"({settings.steps_per_generation}) must be >= 1")
        if settings.beta > 0 and reference_model is None:
            raise ValueError(
                f"beta = {settings.beta} > 0 needs a reference model for the KL term: pass reference_model= "
                "(a frozen copy of the stage's starting policy), or set beta = 0"
            )
        if reference_model is not None:
            if reference_model is model:
                raise ValueError("reference_model must be a separate copy of the policy, not the policy itself")
            policy_storage = {p.data_ptr() for p in model.parameters()}
            if any(p.data_ptr() in policy_storage for p in reference_model.parameters()):
                raise ValueError("reference_model shares parameters with the policy; pass an independent copy")
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        disable_dropout(model)
        args = GRPOConfig(
            output_dir=output_dir,
            learning_rate=settings.learning_rate,
            beta=0.0,  # TRL would load its own reference from `name_or_path`; ours is set below
            loss_type=settings.loss_type,
            epsilon=settings.epsilon,
            epsilon_high=settings.epsilon_high,
            importance_sampling_level=settings.importance_sampling_level,
            # TRL's names; the loop over passes and mini-batches is `step`'s. `_compute_loss` reads
            # `args.steps_per_generation` to normalise "dapo"/"cispo" per mini-batch.
            num_iterations=settings.num_iterations,
            steps_per_generation=settings.steps_per_generation,
            scale_rewards=settings.scale_rewards,
            num_generations=group_size,
            per_device_train_batch_size=group_size,
            max_completion_length=settings.max_completion_length,
            temperature=settings.temperature,
            use_cpu=next(model.parameters()).device.type == "cpu",
            bf16=False,
            report_to=[],
            seed=settings.seed,
            use_vllm=False,  # generation is ours; see below for the sampler correction
            disable_tqdm=True,
            disable_dropout=True,
            gradient_checkpointing=False,  # TRL's default recomputes activations: ~20% slower, and these models fit
        )
        self.trainer = GRPOTrainer(
            model=model,
            reward_funcs=[_unused_reward],
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "unused"}]),
            processing_class=tokenizer,
        )
        # `_compute_loss` adds beta * KL (reading `ref_per_token_logps` from the inputs) when `self.beta != 0`.
        self.trainer.beta = settings.beta
        self.reference_model = reference_model if settings.beta > 0 else None
        if self.reference_model is not None:
            freeze_reference(self.reference_model, settings.temperature, args.cast_lm_head_to_fp32)
        # The samples do come from vLLM: switch on TRL's sampler importance-sampling correction so that
        # `compute_loss` multiplies each token's loss by the weights we pass in `importance_sampling_ratio`.
        self.trainer.use_vllm = True
        self.trainer.vllm_importance_sampling_correction = True
        self.trainer.current_gradient_accumulation_steps = 1
        # every forward of the policy (and the reference) goes through `_per_token_logps`
        self._pi_old_target = None
        self.trainer._get_per_token_logps_and_entropies = self._per_token_logps
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            (p for p in model.parameters() if p.requires_grad), lr=settings.learning_rate, weight_decay=0.0
        )
        self.accelerator = accelerator
        self._train_model = model  # what the loss's forward runs through: the DDP/FSDP wrapper when prepared
        processes = self.trainer.accelerator.num_processes
        if processes > 1 and not self.multi_process:
            raise ValueError(f"{type(self).__name__} does not train across several processes yet (this is one of "
                             f"{processes}): launch it with one process")
        if accelerator is None and processes > 1:
            raise ValueError(f"this process is one of {processes} launched together (WORLD_SIZE={processes}): pass "
                             f"accelerator= (rlpost.distributed.Context.from_env().accelerator) so that the ranks "
                             f"train together, or launch one process")
        if accelerator is not None:
            if accelerator.num_processes != processes:
                raise ValueError(f"the accelerator has {accelerator.num_processes} processes, TRL's trainer "
                                 f"{processes}: build both in the same launch")
            self._prepare(accelerator, group_size)

    def _prepare(self, accelerator, group_size: int) -> None:
        """Wrap the policy and its optimiser for `accelerator` (DDP, FSDP2, DeepSpeed): the loss's forward
        and backward run through the wrapper (`_train_model`), `self.model` stays the unwrapped policy
        (the parameters the wrapper trains; what the loop publishes and saves)."""
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:  # not run here: DeepSpeed wants a micro batch size without a dataloader
            config = plugin.deepspeed_config
            if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                config["train_micro_batch_size_per_gpu"] = group_size
            config.setdefault("gradient_clipping", self.settings.max_grad_norm)
        self._train_model, self.optimizer = accelerator.prepare(self.model, self.optimizer)
        self.model = accelerator.unwrap_model(self._train_model)

    def _logps(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
        with torch.no_grad():
            logps, _, _ = self.trainer._get_per_token_logps_and_entropies(
                model,
                torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([prompt_mask, completion_mask], dim=1),
                completion_ids.size(1),
            )
        return logps

    def extra_state(self) -> dict:
        return {}  # the policy and optimiser are all GRPO trains

    def load_extra_state(self, state: dict) -> None:
        pass

    def build_inputs(self, groups: list[RolloutGroup], pi_old: bool = True) -> dict[str, torch.Tensor]:
        """The tensors TRL's `compute_loss` expects, from scored rollout groups, with the current weights:
        `old_per_token_logps` is pi_old (and the base of the sampler weights) for every optimiser
        step `step` takes on this batch, so call it once per batch, before the first update.
        `pi_old` False: leave out `old_per_token_logps` and `importance_sampling_ratio` (and the
        forward pass they cost) for `_single_forward_loss` to fill in from the loss's own forward.

        Besides TRL's keys: `reward_valid` (B,) marks samples that have a reward, `trainable` (B,)
        the rows that reach the loss (valid, in a group with >= 2 valid samples); `completion_mask`
        is zero on every other row (see the module docstring)."""
        pad = self.tokenizer.pad_token_id
        if len({g.size for g in groups}) != 1:
            raise ValueError(f"groups of different sizes {sorted({g.size for g in groups})} cannot share advantages")
        size = groups[0].size
        prompts, completions, sampling, reward_values, valid = flatten_groups(groups)
        trainable = (valid.view(-1, size).sum(dim=1, keepdim=True) >= 2).expand(-1, size).flatten() & valid
        prompt_ids, prompt_mask = _left_pad(prompts, pad)
        completion_ids, completion_mask = _right_pad(completions, pad, torch.long)
        completion_mask = completion_mask * trainable[:, None].long()
        sampling_logps, _ = _right_pad(sampling, 0.0, torch.float32)
        if self.settings.advantage_estimator == "rloo":
            advantages = rloo_advantages(reward_values, size, valid=valid)
        else:
            advantages = group_advantages(reward_values, size, self.settings.scale_rewards, valid=valid)
        device = next(self.model.parameters()).device  # the learner's device (model.device in the recipe)
        prompt_ids, prompt_mask, completion_ids, completion_mask, sampling_logps, advantages, valid, trainable = (
            t.to(device) for t in (prompt_ids, prompt_mask, completion_ids, completion_mask, sampling_logps,
                                   advantages, valid, trainable))
        mask = completion_mask.float()
        inputs = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": advantages,
            "sampling_per_token_logps": sampling_logps,
            "num_items_in_batch": mask.sum(),
            "reward_valid": valid,
            "trainable": trainable,
        }
        if pi_old:
            self._set_pi_old(inputs, self._logps(self.model, prompt_ids, prompt_mask, completion_ids, completion_mask))
        if self.reference_model is not None:
            inputs["ref_per_token_logps"] = self._logps(
                self.reference_model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        return inputs

    def _set_pi_old(self, inputs: dict, learner_logps: torch.Tensor) -> None:
        inputs["old_per_token_logps"] = learner_logps
        inputs["importance_sampling_ratio"] = truncated_importance_weights(
            learner_logps, inputs["sampling_per_token_logps"], inputs["completion_mask"].float(),
            self.settings.importance_cap)

    def _per_token_logps(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                         compute_entropy=False, compute_aux_loss=False, **extra):
        """TRL's `_get_per_token_logps_and_entropies`, with the prompts a group shares computed once
        (`shared_prefix_logps`) when the forward is this process's own (not through a DDP wrapper,
        whose gradient hooks need its own forward) and carries nothing multimodal. Then, inside
        `_single_forward_loss`, pi_old and the sampler weights are set from the result."""
        shared = None
        wrapped = model is self._train_model and model is not self.model
        if not wrapped and not compute_aux_loss and batch_size is None and all(v is None for v in extra.values()):
            shared = shared_prefix_logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy)
        if shared is not None:
            logps, entropies = shared
            aux = None
        else:
            logps, entropies, aux = type(self.trainer)._get_per_token_logps_and_entropies(
                self.trainer, model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        if self._pi_old_target is not None:
            self._set_pi_old(self._pi_old_target, logps.detach())
            self._pi_old_target = None
        return logps, entropies, aux

    def _single_forward_loss(self, batch: dict) -> torch.Tensor:
        """TRL's loss on `batch` (built with `pi_old=False`) in one forward pass, for a batch that gets
        exactly one optimiser step (num_iterations = steps_per_generation = 1): then pi_old is the
        current policy, so its logprobs are the loss's own, detached, and the sampler weights
        w = min(exp(log pi_old - log pi_sampler), cap) are computed from them inside that forward
        (`_per_token_logps`), instead of in a separate no-grad forward beforehand (the same values,
        one forward fewer).

        Leans on TRL 1.16's `_compute_loss`: it calls `_get_per_token_logps_and_entropies` once,
        then reads `old_per_token_logps` and `importance_sampling_ratio` from its inputs (pinned by
        tests/test_learner_defects.py, which compares this path with the two-forward one)."""
        self._pi_old_target = batch
        try:
            return self.trainer.compute_loss(self._train_model, batch)
        finally:
            self._pi_old_target = None

    @torch.no_grad()
    def logprob_mismatch(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                         sampling_logprobs: list[list[float]]) -> float:
        """Max |sampler logprob - learner logprob| over the given completions, with the current weights."""
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        prompts, prompt_mask = (t.to(device) for t in _left_pad(prompt_ids, pad))
        completions, completion_mask = (t.to(device) for t in _right_pad(completion_ids, pad, torch.long))
        sampled = _right_pad(sampling_logprobs, 0.0, torch.float32)[0].to(device)
        ours = self._logps(self.model, prompts, prompt_mask, completions, completion_mask)
        return float((ours - sampled).abs()[completion_mask.bool()].max())

    def step(self, groups: list[RolloutGroup], fresh: list[bool] | None = None) -> dict[str, float]:
        """Train on one rollout batch: `num_iterations` passes x `steps_per_generation` mini-batches,
        one optimiser step each (see the module docstring). pi_old, the advantages and the sampler
        importance weights are computed once, before the first step, and stay fixed for the batch.

        `fresh[i]` marks on-policy groups, whose sampling logprobs must equal the learner's: their
        max |difference| is reported as `rollout/logprob_mismatch_max`. Reported: `train/loss` and
        `train/grad_norm` (before clipping) as means over the batch's applied optimiser steps,
        `train/optimizer_steps` (applied), and every TRL metric of those steps (`train/entropy`,
        `train/clip_ratio/low_mean`, `.../high_mean`, `.../region_mean`, ..., `train/kl` when beta > 0)
        as its mean over them, NaNs left out as TRL's own logging does.

        Samples without a reward are masked (`train/masked_samples`; groups left with < 2 valid
        samples: `train/masked_groups`). A mini-batch without a trainable token gets no optimiser
        step; with none in the whole batch the step is skipped: no optimiser step,
        `train/skipped_step` = 1, loss and grad norm reported as 0.

        Non-finite updates (`rlpost.learners.update.apply_update`): an update whose loss or gradient
        norm is NaN/inf is skipped (no optimiser step, parameters and moments untouched) and counted
        in `train/nonfinite_updates`; `train/nonfinite_step` is 1 when every update attempted was
        skipped (then `train/loss` and `train/grad_norm` are NaN).

        With an accelerator of several processes every rank passes the same whole batch (the main
        rank's, `rlpost.distributed.Context.broadcast_groups`) and trains on its shard
        (`rlpost.distributed.shard_groups`; module docstring, "Several processes"). `train/loss`,
        `train/grad_norm`, TRL's metrics and the sample counts are over the whole batch; the
        sampler/learner comparisons (`rollout/logprob_mismatch_max`, the importance-weight statistics,
        `train/kl_sampler_to_learner`) over this rank's shard."""
        start = time.perf_counter()
        size = groups[0].size if groups else 0
        parts = self.settings.steps_per_generation
        if len(groups) % parts:
            raise ValueError(f"{len(groups)} groups do not split into steps_per_generation = {parts} mini-batches "
                             f"of whole groups")
        fresh = list(fresh) if fresh is not None else [True] * len(groups)
        world = self.accelerator.num_processes if self.accelerator is not None else 1
        tokens = trainable_token_counts(groups)  # per group, over the whole batch
        per_part = len(groups) // parts
        global_tokens = [sum(tokens[k * per_part:(k + 1) * per_part]) for k in range(parts)]
        if world > 1:
            from rlpost.distributed import shard_groups

            rank = self.accelerator.process_index
            fresh = shard_groups(fresh, rank, world, parts)
            groups = shard_groups(groups, rank, world, parts)
        # pi_old, advantages, sampler weights: fixed for the whole batch; with one optimiser step per
        # batch pi_old comes from the loss's own forward (`_single_forward_loss`)
        single_forward = self.settings.num_iterations == 1 and parts == 1
        inputs = self.build_inputs(groups, pi_old=not single_forward)
        if world > 1:  # TRL's "dapo"/"cispo" normaliser: the whole batch's tokens (it divides by the world size)
            inputs["num_items_in_batch"] = torch.tensor(float(sum(global_tokens)), device=inputs["advantages"].device)
        minibatches = split_by_groups(inputs, size, parts)
        mask = inputs["completion_mask"].bool()
        valid, trainable = inputs["reward_valid"], inputs["trainable"]
        self.trainer._metrics["train"].clear()
        metrics: dict[str, float] = {}
        results = []
        self.model.train()
        for _ in range(self.settings.num_iterations):
            for k, batch in enumerate(minibatches):
                if not global_tokens[k]:
                    continue  # nothing to train on (on any rank): no step, optimiser moments untouched
                loss = (self._single_forward_loss(batch) if single_forward
                        else self.trainer.compute_loss(self._train_model, batch))
                if world > 1 and self.settings.loss_type == "bnpo":
                    # TRL's "bnpo" divides by this rank's tokens; DDP's average over ranks of
                    # loss_r * tokens_r * world / tokens equals the whole mini-batch's token mean
                    loss = loss * (float(batch["completion_mask"].sum()) * world / global_tokens[k])
                results.append(apply_update(self._train_model, self.optimizer, loss, self.settings.max_grad_norm,
                                            self.accelerator))
        if single_forward:
            if "old_per_token_logps" in minibatches[0]:  # filled in by the loss's forward
                self._set_pi_old(inputs, minibatches[0]["old_per_token_logps"])
            else:  # no update was taken: the metrics below still want pi_old
                self._set_pi_old(inputs, self._logps(self.model, inputs["prompt_ids"], inputs["prompt_mask"],
                                                     inputs["completion_ids"], inputs["completion_mask"]))
        applied = [r for r in results if r.applied]
        metrics.update({f"train/{k}": _mean_finite(v) for k, v in self.trainer._metrics["train"].items() if v})
        diff = (inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]).abs()
        per_sample_fresh = torch.tensor(
            [f for f, g in zip(fresh, groups) for _ in range(g.size)], device=mask.device
        )
        fresh_mask = mask & per_sample_fresh[:, None]
        counts = torch.tensor([float(mask.size(0)), float(trainable.sum()), float((~valid).sum()),
                               float((valid.view(-1, size).sum(dim=1) < 2).sum()), float(mask.sum())])
        if world > 1:
            counts = self.accelerator.reduce(counts.to(self.accelerator.device), reduction="sum").cpu()
        nan = float("nan")
        metrics.update(
            {
                "train/loss": (sum(r.loss for r in applied) / len(applied) if applied else nan) if results else 0.0,
                "train/grad_norm": (sum(r.grad_norm for r in applied) / len(applied) if applied else nan)
                if results else 0.0,
                "train/optimizer_steps": float(len(applied)),
                **nonfinite_scalars(results),
                "train/step_s": time.perf_counter() - start,
                "train/samples": float(counts[0]),
                "train/trained_samples": float(counts[1]),
                "train/masked_samples": float(counts[2]),
                "train/masked_groups": float(counts[3]),
                "train/skipped_step": float(not results),
                "train/completion_tokens": float(counts[4]),
                "rollout/logprob_mismatch_max": float(diff[fresh_mask].max()) if fresh_mask.any() else float("nan"),
                **importance_weight_stats(inputs["importance_sampling_ratio"], mask),
                "train/kl_sampler_to_learner": _masked_mean(
                    kl_estimators.k3(inputs["sampling_per_token_logps"], inputs["old_per_token_logps"]), mask),
            }
        )
        if world > 1:
            metrics["train/processes"] = float(world)
        return metrics
