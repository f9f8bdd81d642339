"""Online DPO learner: TRL's DPO loss on preference pairs made from the rollout stream.

Each rollout batch (G groups of n samples of one prompt each, scored by the reward pool) becomes up
to G preference pairs (`pairs_from_groups`): per prompt, chosen = the first sample with the highest
reward, rejected = the first with the lowest, kept only when the two rewards differ. The rule is
the offline DPO stage's (`rlpost.stages.dpo.best_and_worst`), applied to sample indices, so the two
stages pick the same pair from the same scores. A masked sample (reward None from the reward pool,
also NaN/inf, as `rlpost.learners.grpo` masks them) is never chosen or rejected; a group with fewer
than two distinct valid rewards makes no pair.

The completions are the sampled token ids as they are: a completion that stopped on EOS ends with
that EOS (it is scored, as the offline stage scores the EOS it appends), one cut by the token
budget has none. The prompt is the group's prompt ids. With

    pc = log pi_theta(chosen | x),  pr = log pi_theta(rejected | x)    (summed over completion tokens)
    rc = log pi_ref(chosen | x),    rr = log pi_ref(rejected | x)

TRL's DPO loss for `loss_type` is applied to the batch's pairs, e.g. "sigmoid" (DPO):

    loss = mean over pairs of  -log sigmoid(beta * ((pc - rc) - (pr - rr)))

("hinge": relu(1 - beta * h); "ipo": (h_tok - 1 / (2 beta))^2 with per-token log-ratios; the others
as TRL 1.16's `DPOTrainer._compute_loss` defines them). One optimiser step per rollout batch on all
its pairs (AdamW, gradient clipping at `max_grad_norm`); a batch without a pair takes no step
(parameters and optimiser state untouched, `train/skipped_step` = 1). The step goes through
`rlpost.learners.update.apply_update`: a NaN/inf loss or gradient norm skips it likewise, reported as
`train/nonfinite_updates` = `train/nonfinite_step` = 1 (loss and grad norm NaN). One process only.

Log-probabilities are at temperature 1, as TRL's DPOTrainer and OnlineDPOTrainer compute them: DPO's
implicit reward is defined on the policy itself, not on the tempered sampling distribution. The
rollout temperature is used only to compare the learner with the sampler (`logprob_mismatch`, and
`rollout/logprob_mismatch_max` on the pair samples of on-policy groups), whose logprobs are
vLLM's processed (tempered) ones.

Off-policy data. The loop admits groups up to `max_staleness` policy versions old; DPO needs no
importance correction for them (its loss is a function of the pair, not an expectation under the
sampler: the reason "Asynchronous RLHF" (Noukhovitch et al., 2024) finds online DPO the most robust
of the RLHF losses to off-policy samples). The lag is reported: `train/pair_policy_lag_mean` and
`_max` (learner version minus the version that generated the pair's group) and
`train/stale_pair_fraction`. The learner version is the `policy_version` of the batch's fresh
groups (the loop marks a group fresh when it equals the learner's); with none fresh it is the last
known version plus the steps since.

Reference: a separate, frozen copy of the stage's starting policy (the loop's `load_reference`,
also after a resume), eval mode, no gradients, dropout off; the policy's dropout is off as well.

TRL API. The loss is TRL's own: the learner builds a DPOTrainer (`rlpost.stages.dpo.build_dpo_trainer`,
which feeds token ids through the pinned private `_prepare_dataset` override) only for its public
`compute_loss(model, inputs)` on a batch from its public `data_collator` (`DataCollatorForPreference`:
[chosen rows; rejected rows], prompt + completion right-padded, `completion_mask`); TRL computes the
policy and reference log-probs itself (its fused LM head). Its batch metrics (`rewards/margins`,
`rewards/accuracies`, ...) are read from the trainer's private `_metrics["train"]`, as the GRPO
learner reads them; tests/test_online_dpo.py pins both against hand-computed values.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch

from rlpost.learners.grpo import _has_reward, disable_dropout
from rlpost.learners.update import apply_update, nonfinite_scalars
from rollouts.buffer import RolloutGroup

# TRL 1.16 DPO `loss_type`s that are a function of one (chosen, rejected) pair, the policy and the
# reference only (no label smoothing, no reward model): offered by the online learner. Left out:
# "robust" and "exo_pair" (they need label_smoothing), "sft" (NLL on chosen only, not a preference loss).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
              "apo_down", "discopop", "sigmoid_norm")
_TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")


@dataclass
class OnlineDPOSettings:
    learning_rate: float = 1e-4
    beta: float = 0.1
    loss_type: str = "sigmoid"
    max_grad_norm: float = 1.0
    temperature: float = 1.0  # the rollout temperature: only for the sampler/learner logprob comparison
    seed: int = 0


def _pair_indices(group: RolloutGroup) -> tuple[int, int] | None:
    """(index of chosen, index of rejected) in `group`, or None: `best_and_worst` on sample indices,
    with non-finite rewards masked like None."""
    from rlpost.stages.dpo import best_and_worst

    if len(group.rewards) != group.size:
        raise ValueError(f"group {group.prompt_index} has {len(group.rewards)} rewards for {group.size} samples")
    totals = [float(r) if _has_reward(r) else None for r in group.rewards]
    pair = best_and_worst(totals, list(range(group.size)))
    if pair is None:
        return None
    (_, chosen), (_, rejected) = pair
    return chosen, rejected


def pairs_from_groups(groups: list[RolloutGroup]) -> list[tuple]:
    """Per group with differing valid rewards: (prompt_ids, chosen_ids, rejected_ids, chosen_reward,
    rejected_reward, policy_version), chosen = the first sample with the highest reward, rejected =
    the first with the lowest (`rlpost.stages.dpo.best_and_worst`); masked samples (reward None, NaN
    or inf) take no part; a group whose valid rewards are all equal (or that has < 2 valid) makes none."""
    pairs = []
    for group in groups:
        found = _pair_indices(group)
        if found is None:
            continue
        pairs.append(_pair(group, *found))
    return pairs


def _pair(group: RolloutGroup, c: int, r: int) -> tuple:
    return (list(group.prompt_ids), list(group.completion_ids[c]), list(group.completion_ids[r]),
            float(group.rewards[c]), float(group.rewards[r]), group.policy_version)


def _completion_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad: int,
                      temperature: float, chunk: int = 8) -> list[torch.Tensor]:
    """Per row: log pi(y_t | x, y_<t) at `temperature` for each completion token (prompt + completion in
    one right-padded row, so positions are exact), without gradient; `chunk` rows per forward."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(prompt_ids), chunk):
            rows = [p + c for p, c in zip(prompt_ids[start:start + chunk], completion_ids[start:start + chunk])]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            logps = torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            for i, (p, c) in enumerate(zip(prompt_ids[start:start + chunk], completion_ids[start:start + chunk])):
                out.append(logps[i, len(p) - 1:len(p) - 1 + len(c)])
    return out


def _mismatch(ours: list[torch.Tensor], sampled: list[list[float]]) -> float:
    """Max |learner - sampler| logprob over all tokens; NaN when there is no token."""
    diffs = [(o - torch.tensor(s, dtype=torch.float32, device=o.device)).abs().max() for o, s in zip(ours, sampled)
             if len(s)]
    return float(torch.stack(diffs).max()) if diffs else float("nan")


class OnlineDPOLearner:
    """Owns the policy and its optimiser; `step(groups)` makes the batch's pairs and takes one optimiser
    step on TRL's DPO loss against `reference` (a separate, frozen copy of the stage's starting policy).

    `output_dir`: where the TRL trainer may write (nothing is saved there; a temporary directory if None)."""

    def __init__(self, model, tokenizer, reference, settings: OnlineDPOSettings | None = None,
                 output_dir: str | None = None):
        from rlpost.stages.dpo import DPOStage, build_dpo_trainer

        settings = settings or OnlineDPOSettings()
        if settings.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {settings.loss_type!r} is not supported online; use one of {LOSS_TYPES}")
        if not settings.beta > 0 or not settings.learning_rate > 0 or not settings.temperature > 0:
            raise ValueError(f"beta ({settings.beta}), learning_rate ({settings.learning_rate}) and temperature "
                             f"({settings.temperature}) must be > 0")
        if reference is None or reference is model:
            raise ValueError("online DPO needs a reference: a separate, frozen copy of the stage's starting policy")
        policy_storage = {p.data_ptr() for p in model.parameters()}
        if any(p.data_ptr() in policy_storage for p in reference.parameters()):
            raise ValueError("the reference shares parameters with the policy; pass an independent copy")
        if tokenizer.eos_token_id is None:
            raise ValueError("the policy's tokenizer has no EOS token")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.reference = reference
        disable_dropout(model)
        disable_dropout(reference)
        reference.requires_grad_(False)
        reference.eval()
        if output_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rlpost-online-dpo-")
            output_dir = self._tmp.name
        # DPOConfig keys from a DPOStage: only beta and loss_type reach the loss; the trainer never trains
        # (no dataset, scheduler or checkpoints of its own), so the rest are inert. max_length None: the
        # completions are the sampled ones, never truncated.
        cfg = DPOStage(pairs="online", learning_rate=settings.learning_rate, beta=settings.beta,
                       loss_type=settings.loss_type, max_length=None, per_device_train_batch_size=1,
                       num_train_epochs=1, precompute_ref_log_probs=False, gradient_checkpointing=False)
        eos = tokenizer.eos_token_id
        self.trainer = build_dpo_trainer(model, reference, tokenizer,
                                         [{"prompt_ids": [eos], "chosen_ids": [eos], "rejected_ids": [eos]}], cfg,
                                         out_dir=output_dir, seed=settings.seed,
                                         use_cpu=next(model.parameters()).device.type == "cpu")
        if self.trainer.accelerator.num_processes > 1:
            raise ValueError(f"the online DPO learner does not train across several processes yet (this is one of "
                             f"{self.trainer.accelerator.num_processes}): launch it with one process")
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            (p for p in model.parameters() if p.requires_grad), lr=settings.learning_rate, weight_decay=0.0
        )
        self._version: int | None = None  # the learner's policy version, as far as the batches tell it

    # ------------------------------------------------------------------ Learner protocol

    def extra_state(self) -> dict:
        """The policy version the learner last knew (for the pair-lag metrics after a resume); the reference
        is reloaded from the stage's input by the loop's load_reference."""
        return {} if self._version is None else {"version": torch.tensor([self._version])}

    def load_extra_state(self, state: dict) -> None:
        if "version" in state:
            self._version = int(state["version"][0])

    def logprob_mismatch(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                         sampling_logprobs: list[list[float]]) -> float:
        """Max |sampler logprob - learner logprob| (at the rollout temperature) on the given tokens."""
        ours = _completion_logps(self.model, prompt_ids, completion_ids, self.tokenizer.pad_token_id,
                                 self.settings.temperature)
        return _mismatch(ours, sampling_logprobs)

    def batch(self, pairs: list[tuple]) -> dict[str, torch.Tensor]:
        """TRL's preference batch for `pairs` (`pairs_from_groups`), on the policy's device."""
        rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r, *_ in pairs]
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in self.trainer.data_collator(rows).items()}

    def step(self, groups: list[RolloutGroup], fresh: list[bool] | None = None) -> dict[str, float]:
        """One optimiser step on TRL's DPO loss over the batch's pairs (none without a pair).

        Reported: `train/pairs`, `train/loss`, `train/grad_norm` (before clipping; 0 when skipped),
        TRL's `rewards/{chosen,rejected,margins,accuracies}` and `logps/{chosen,rejected}` on the
        batch's pairs (before the update), `train/pair_reward_gap` (mean chosen - rejected reward),
        `train/pair_policy_lag_mean`/`_max`, `train/stale_pair_fraction`,
        `rollout/logprob_mismatch_max` (pair samples of fresh groups), `train/samples`,
        `train/trained_samples` (2 per pair), `train/masked_samples`, `train/skipped_step`,
        `train/optimizer_steps`, `train/step_s`. Pair statistics are NaN when there is no pair."""
        start = time.perf_counter()
        fresh = list(fresh) if fresh is not None else [True] * len(groups)
        if len(fresh) != len(groups):
            raise ValueError(f"{len(fresh)} fresh flags for {len(groups)} groups")
        version = self._learner_version(groups, fresh)
        pairs, pair_fresh, probe = [], [], ([], [], [])
        for group, is_fresh in zip(groups, fresh):
            found = _pair_indices(group)
            if found is None:
                continue
            pairs.append(_pair(group, *found))
            pair_fresh.append(is_fresh)
            if is_fresh:  # drawn with the weights the learner holds: the sampler's logprobs must be ours
                for k in found:
                    probe[0].append(list(group.prompt_ids))
                    probe[1].append(list(group.completion_ids[k]))
                    probe[2].append(list(group.sampling_logprobs[k]))
        mismatch = self.logprob_mismatch(*probe) if probe[0] else float("nan")
        nan = float("nan")
        metrics: dict[str, float] = {k: nan for k in _TRL_METRICS}
        loss_value, grad_norm = 0.0, 0.0
        results = []
        if pairs:
            self.model.train()
            self.trainer._metrics["train"].clear()
            loss = self.trainer.compute_loss(self.model, self.batch(pairs))
            results.append(apply_update(self.model, self.optimizer, loss, self.settings.max_grad_norm))
            loss_value, grad_norm = (results[0].loss, results[0].grad_norm) if results[0].applied else (nan, nan)
            logged = self.trainer._metrics["train"]
            metrics.update({k: float(logged[k][-1]) for k in _TRL_METRICS if logged.get(k)})
            if logged.get("entropy"):
                metrics["train/entropy"] = float(logged["entropy"][-1])
        lags = [version - p[5] for p in pairs] if version is not None else []
        masked = sum(1 for g in groups for rw in g.rewards if not _has_reward(rw))
        metrics.update({
            "train/pairs": float(len(pairs)),
            "train/loss": loss_value,
            "train/grad_norm": grad_norm,
            "train/optimizer_steps": float(sum(r.applied for r in results)),
            **nonfinite_scalars(results),
            "train/skipped_step": float(not pairs),
            "train/pair_reward_gap": (sum(p[3] - p[4] for p in pairs) / len(pairs)) if pairs else nan,
            "train/pair_policy_lag_mean": sum(lags) / len(lags) if lags else nan,
            "train/pair_policy_lag_max": float(max(lags)) if lags else nan,
            "train/stale_pair_fraction": (sum(not f for f in pair_fresh) / len(pairs)) if pairs else nan,
            "rollout/logprob_mismatch_max": mismatch,
            "train/samples": float(sum(g.size for g in groups)),
            "train/trained_samples": float(2 * len(pairs)),
            "train/masked_samples": float(masked),
            "train/step_s": time.perf_counter() - start,
        })
        return metrics

    def _learner_version(self, groups: list[RolloutGroup], fresh: list[bool]) -> int | None:
        """The version the learner holds for this step: a fresh group's policy_version, else the last known
        version + 1 per step since; None before any fresh group was seen."""
        known = [g.policy_version for g, f in zip(groups, fresh) if f]
        version = max(known) if known else self._version
        self._version = None if version is None else version + 1
        return version

