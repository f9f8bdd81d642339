"""PPO learner: a value model, GAE, and TRL's clipped policy loss fed with per-token advantages.

TRL 1.16 has no PPO trainer and no value head; this learner builds PPO from TRL's GRPO loss as
`rlpost.learners.grpo` does for GRPO: `GRPOTrainer.compute_loss` (clipped surrogate, sampler
importance weights, optional KL to a reference in the loss) accepts advantages of shape (B, T) as
well as (B,) (`_compute_loss`: `if advantages.dim() == 1: advantages = advantages.unsqueeze(1)`,
pinned by tests/test_ppo.py), so PPO's per-token GAE advantages go straight in. The value model,
GAE, the value loss and the optimisation loop are this module's.

Value model (`value_model`):
    "head"      a linear head v(h) = w . h + b on the policy backbone's last hidden state. It shares
                the backbone, and the value loss's gradient reaches the backbone. The hidden states
                come from the policy's own forward pass inside TRL's loss (a forward hook on
                `model.base_model`, which TRL's fused LM head calls): one forward gives both.
    "separate"  a second backbone (an `AutoModel` copy of the stage's starting policy, without LM
                head) with its own linear head; nothing is shared with the policy.
The head is initialised to zero (w = 0, b = 0, so V = 0 at the start: common practice, e.g.
OpenRLHF and TRL's former value heads start near zero, so the first advantages are the plain
rewards-to-go and no random value estimate biases them). The head (and the separate backbone) are
in the learner's optimiser as a second parameter group with learning rate `vf_lr` (default: the
policy's); `extra_state()` returns their tensors for the loop's checkpoints.

V_{i,t} is the value of the state s_t = (prompt, y_<t), read at the hidden state of the position
that predicts y_t (the last prompt token for t = 0), as TRL's former PPOTrainer did.

One rollout batch (B completions, prompts x num_generations; groups play no role), fixed for the
whole batch and computed once, before its first update, with the weights theta_0:

    pi_old   = pi_{theta_0}(y_t)                        `old_per_token_logps`
    V_old    = V_{theta_0}(s_t)
    pi_ref   (kl_coef > 0 or beta > 0): the frozen starting policy's logprobs
    w_{i,t}  = min(pi_old(y_t) / pi_sampler(y_t), cap)  sampler importance weight (stale samples;
                                                        `advantages.truncated_importance_weights`)
    r_{i,t}  = -kl_coef * (log pi_old(y_t) - log pi_ref(y_t)) + [t = last] * reward_i
                                                        (`gae.token_rewards`: KL in the reward)
    A, R     = gae(r, V_old, mask, gamma, lam)          (`gae.gae`; R = A + V_old the value target)
    A        = whiten(A, mask) over the batch           (if `whiten_advantages`)

Then `num_ppo_epochs` passes; each shuffles the B rows and splits them into `num_mini_batches`
mini-batches, one optimiser step each, with the current weights theta:

    rho_{i,t} = pi_theta(y_t) / pi_old(y_t)
    policy    = TRL's loss, loss_type "bnpo" (the token mean over the mini-batch, as TRL's former
                PPOTrainer): sum m * (-min(rho A, clip(rho, 1 - epsilon, 1 + epsilon) A) * w
                + beta * KL_k3(pi_theta || pi_ref)) / sum m
    value     = 0.5 * sum m * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) / sum m
                (c = `cliprange_value`)
    loss      = policy + vf_coef * value

with m the completion mask of the mini-batch. Gradients of all parameters (policy, head, separate
value model) are clipped together to `max_grad_norm`.

KL. `kl_coef` puts the k1 KL estimate into the per-token reward (so it is discounted and enters the
advantages, InstructGPT-style); `beta` adds TRL's k3 KL term to the loss, as GRPO does (TRL is built
with beta = 0 and `trainer.beta` set afterwards, so that TRL does not load its own reference). Either
needs the reference model, a frozen copy of the stage's starting policy.

Reported (means over the batch's optimiser steps unless said): `train/policy_loss`,
`train/value_loss`, `train/value_clipfrac` (tokens where the clipped value term is the larger),
`train/loss`, `train/grad_norm`, `train/approx_kl` (0.5 * token mean of (log rho)^2, TRL's former
`approxkl`), TRL's own metrics (`train/clip_ratio/low_mean`, `.../high_mean`, `.../region_mean`,
`train/entropy`, `train/kl` when beta > 0); per batch: `train/explained_variance`
(1 - Var[R - V_old] / Var[R] over the batch's tokens), `train/value_mean`, `train/return_mean`,
`train/advantage_mean` (before whitening), `train/kl_reward` (mean k1 KL, when kl_coef > 0) and the
same bookkeeping as GRPO (`train/samples`, `train/masked_samples`, `rollout/logprob_mismatch_max`, ...).

Masked samples. A sample without a reward (None from the reward pool, or not finite) is not trained
on: its completion-mask row is zeroed, so its token rewards, advantages and returns are 0 and it
reaches neither the policy loss, nor the value loss, nor the token counts that normalise them. PPO
needs no group baseline, so the other samples of its group train as usual. With no trainable sample
in the batch no step is taken (`train/skipped_step` = 1).

Non-finite updates. Each optimiser step (policy and value together) goes through
`rlpost.learners.update.apply_update`: a NaN/inf loss or gradient norm skips it (no optimiser step;
parameters, value model and moments untouched), counted as `train/nonfinite_updates`;
`train/nonfinite_step` = 1 when every attempted step of the batch was skipped; the loss and grad
norm means are over the applied steps (NaN when none was). One process only (a multi-process
launch is refused): the value model is not wrapped for DDP.

Dropout is switched off in the policy, the reference and the separate value model (`disable_dropout`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from datasets import Dataset

from rlpost.learners.advantages import importance_weight_stats, truncated_importance_weights
from rlpost.learners.gae import gae, token_rewards, whiten
from rlpost.learners import kl as kl_estimators
from rlpost.learners.update import apply_update, nonfinite_scalars
from rlpost.learners.grpo import (_left_pad, _masked_mean, _mean_finite, _right_pad, _unused_reward,
                                  disable_dropout, flatten_groups, freeze_reference)
from rollouts.buffer import RolloutGroup

VALUE_MODELS = ("head", "separate")
HEAD_PREFIX, BACKBONE_PREFIX = "value_head.", "value_model."
BATCHES_KEY = "ppo.batches"  # rollout batches trained on: seeds the mini-batch shuffle, kept across a resume


@dataclass
class PPOSettings:
    learning_rate: float = 1e-4
    vf_lr: float | None = None  # None: = learning_rate
    beta: float = 0.0  # KL in the loss (TRL's k3 term)
    kl_coef: float = 0.0  # KL in the reward (k1)
    epsilon: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    whiten_advantages: bool = True
    value_model: str = "head"  # "head" or "separate"
    max_grad_norm: float = 1.0
    importance_cap: float = 2.0
    max_completion_length: int = 8
    temperature: float = 1.0  # must equal the rollout temperature: TRL scales logits by it
    seed: int = 0


def value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss and the fraction of tokens where the clipped term is the larger:

        V_clip = clip(V, V_old - c, V_old + c)
        loss   = 0.5 * sum m * max((V - R)^2, (V_clip - R)^2) / sum m
        frac   = sum m * [(V_clip - R)^2 > (V - R)^2] / sum m
    """
    m = mask.float()
    count = m.sum().clamp(min=1.0)
    clipped = torch.clamp(values, values_old - cliprange_value, values_old + cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped - returns) ** 2
    loss = 0.5 * (torch.max(unclipped_loss, clipped_loss) * m).sum() / count
    fraction = ((clipped_loss > unclipped_loss).float() * m).sum() / count
    return loss, fraction.detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the masked tokens (NaN when Var[R] = 0 or no token)."""
    sel = mask.bool()
    if int(sel.sum()) < 2:
        return float("nan")
    r, v = returns[sel].float(), values[sel].float()
    var_r = r.var()
    return float("nan") if float(var_r) == 0 else float(1 - (r - v).var() / var_r)


def backbone(model):
    """The decoder stack of a causal LM (`model.base_model`), also under a peft LoRA wrapper, whose own
    `base_model` is the wrapped causal LM."""
    from peft import PeftModel

    return (model.get_base_model() if isinstance(model, PeftModel) else model).base_model


class PPOLearner:
    """Owns the policy, the value model and their optimiser; `step(groups)` is one PPO update on a
    rollout batch (module docstring). `reference_model`: a frozen copy of the stage's starting
    policy, required when kl_coef > 0 or beta > 0. `value_backbone`: for value_model "separate",
    the backbone (`AutoModel`) of the stage's starting policy; None for "head"."""

    def __init__(self, model, tokenizer, settings: PPOSettings, output_dir: str, reference_model=None,
                 value_backbone=None):
        from trl import GRPOConfig, GRPOTrainer

        s = settings
        if s.value_model not in VALUE_MODELS:
            raise ValueError(f"value_model {s.value_model!r}: use one of {VALUE_MODELS}")
        if (s.value_model == "separate") != (value_backbone is not None):
            raise ValueError("value_model 'separate' needs value_backbone= (the starting policy's AutoModel); "
                             "'head' takes none")
        if s.num_ppo_epochs < 1 or s.num_mini_batches < 1:
            raise ValueError(f"num_ppo_epochs ({s.num_ppo_epochs}) and num_mini_batches ({s.num_mini_batches}) "
                             f"must be >= 1")
        needs_reference = s.kl_coef > 0 or s.beta > 0
        if needs_reference and reference_model is None:
            raise ValueError(f"kl_coef = {s.kl_coef} / beta = {s.beta}: a KL term needs reference_model= (a frozen "
                             f"copy of the stage's starting policy)")
        if reference_model is not None:
            if reference_model is model:
                raise ValueError("reference_model must be a separate copy of the policy, not the policy itself")
            policy_storage = {p.data_ptr() for p in model.parameters()}
            if any(p.data_ptr() in policy_storage for p in reference_model.parameters()):
                raise ValueError("reference_model shares parameters with the policy; pass an independent copy")
        self.model, self.tokenizer, self.settings = model, tokenizer, s
        disable_dropout(model)
        device = next(model.parameters()).device
        args = GRPOConfig(
            output_dir=output_dir,
            learning_rate=s.learning_rate,
            beta=0.0,  # TRL would load its own reference from `name_or_path`; ours is set below
            loss_type="bnpo",  # token mean over the mini-batch
            epsilon=s.epsilon,
            # the passes and mini-batches are `step`'s; TRL's group settings are unused by its loss
            # ("bnpo" reads neither), but GRPOConfig requires num_generations >= 2 dividing the batch
            num_iterations=1,
            steps_per_generation=1,
            num_generations=2,
            per_device_train_batch_size=2,
            max_completion_length=s.max_completion_length,
            temperature=s.temperature,
            use_cpu=device.type == "cpu",
            bf16=False,
            report_to=[],
            seed=s.seed,
            use_vllm=False,
            disable_tqdm=True,
            disable_dropout=True,
            gradient_checkpointing=False,
        )
        self.trainer = GRPOTrainer(model=model, reward_funcs=[_unused_reward], args=args,
                                   train_dataset=Dataset.from_list([{"prompt": "unused"}]), processing_class=tokenizer)
        if self.trainer.accelerator.num_processes > 1:
            raise ValueError(f"the PPO learner does not train across several processes yet (this is one of "
                             f"{self.trainer.accelerator.num_processes}): launch it with one process")
        self.trainer.beta = s.beta  # `_compute_loss` reads `self.beta` and `ref_per_token_logps`
        # the samples come from vLLM: TRL multiplies each token's loss by our `importance_sampling_ratio`
        self.trainer.use_vllm = True
        self.trainer.vllm_importance_sampling_correction = True
        self.trainer.current_gradient_accumulation_steps = 1
        self.reference_model = reference_model if needs_reference else None
        if self.reference_model is not None:
            freeze_reference(self.reference_model, s.temperature, args.cast_lm_head_to_fp32)

        self.value_backbone = value_backbone
        if value_backbone is not None:
            disable_dropout(value_backbone)
            value_backbone.to(device).train()
        hidden = (value_backbone or model).config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1).to(device=device, dtype=torch.float32)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.batches = 0
        self._hidden: list[torch.Tensor] = []
        self._logps: list[torch.Tensor] = []

        self.model.train()
        policy_params = [p for p in model.parameters() if p.requires_grad]
        value_params = list(self.value_head.parameters())
        if value_backbone is not None:
            value_params += [p for p in value_backbone.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": policy_params, "lr": s.learning_rate},
             {"params": value_params, "lr": s.vf_lr if s.vf_lr is not None else s.learning_rate}],
            lr=s.learning_rate, weight_decay=0.0)

    # ------------------------------------------------------------------------- forward passes

    @contextmanager
    def _capture(self):
        """Record, for the duration, what TRL's policy forward passes compute: the per-token
        logprobs (a wrapper around the trainer's `_get_per_token_logps_and_entropies`, the one
        place TRL computes them) and, for value_model "head", the backbone's last hidden state (a
        forward hook on `model.base_model`, which TRL's fused LM head calls)."""
        self._hidden.clear()
        self._logps.clear()
        original = self.trainer._get_per_token_logps_and_entropies

        def recording(model, *args, **kwargs):
            out = original(model, *args, **kwargs)
            if model is self.model:
                self._logps.append(out[0])
            return out

        def hook(module, inputs, output):
            self._hidden.append(output.last_hidden_state)

        handle = backbone(self.model).register_forward_hook(hook) if self.value_backbone is None else None
        self.trainer._get_per_token_logps_and_entropies = recording
        try:
            yield
        finally:
            del self.trainer._get_per_token_logps_and_entropies  # back to the class's method
            if handle is not None:
                handle.remove()

    def _captured(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if len(self._logps) != 1 or (self.value_backbone is None and len(self._hidden) != 1):
            raise RuntimeError(f"expected one policy forward pass through TRL's fused LM head, saw "
                               f"{len(self._logps)} logprob and {len(self._hidden)} hidden-state captures: TRL's "
                               f"forward changed (see rlpost.learners.ppo)")
        return self._logps[0], (self._hidden[0] if self._hidden else None)

    def _values(self, hidden: torch.Tensor | None, inputs: dict) -> torch.Tensor:
        """V (B, T) for the completion tokens: the head on the hidden states of the positions that
        predict them ([P - 1, P + T - 1) of prompt (P, left padded) + completion (T, right padded))."""
        prompt_width, width = inputs["prompt_ids"].size(1), inputs["completion_ids"].size(1)
        if hidden is None:  # separate value model
            hidden = self.value_backbone(
                input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
                attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask_full"]], dim=1),
                use_cache=False,
            ).last_hidden_state
        states = hidden[:, prompt_width - 1: prompt_width + width - 1]
        return self.value_head(states.float()).squeeze(-1)

    def _policy_forward(self, model, inputs: dict) -> torch.Tensor:
        logps, _, _ = self.trainer._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask_full"]], dim=1),
            inputs["completion_ids"].size(1),
        )
        return logps

    # ------------------------------------------------------------------------- Learner protocol

    def extra_state(self) -> dict:
        """The value head's tensors (`value_head.weight`, `value_head.bias`), the separate value
        model's (`value_model.<name>`), and the batch counter that seeds the mini-batch shuffle."""
        state = {HEAD_PREFIX + k: v.detach().clone() for k, v in self.value_head.state_dict().items()}
        if self.value_backbone is not None:
            state.update({BACKBONE_PREFIX + k: v.detach().clone() for k, v in self.value_backbone.state_dict().items()})
        state[BATCHES_KEY] = torch.tensor(self.batches, dtype=torch.int64)
        return state

    def load_extra_state(self, state: dict) -> None:
        head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        if not head:
            raise RuntimeError("the checkpoint has no value head (value_head.*): it was not written by the PPO learner")
        if bool(backbone) != (self.value_backbone is not None):
            raise RuntimeError(f"the checkpoint's value model ({'separate' if backbone else 'head'}) is not this "
                               f"learner's ({self.settings.value_model})")
        with torch.no_grad():  # in place: the optimiser keeps pointing at these parameters
            self.value_head.load_state_dict(head, strict=True)
            if backbone:
                self.value_backbone.load_state_dict(backbone, strict=True)
        if BATCHES_KEY in state:
            self.batches = int(state[BATCHES_KEY])

    @torch.no_grad()
    def logprob_mismatch(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                         sampling_logprobs: list[list[float]]) -> float:
        """Max |sampler logprob - learner logprob| over the given completions, with the current weights."""
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        prompts, prompt_mask = (t.to(device) for t in _left_pad(prompt_ids, pad))
        completions, completion_mask = (t.to(device) for t in _right_pad(completion_ids, pad, torch.long))
        sampled = _right_pad(sampling_logprobs, 0.0, torch.float32)[0].to(device)
        inputs = {"prompt_ids": prompts, "prompt_mask": prompt_mask, "completion_ids": completions,
                  "completion_mask_full": completion_mask}
        ours = self._policy_forward(self.model, inputs)
        return float((ours - sampled).abs()[completion_mask.bool()].max())

    # ------------------------------------------------------------------------- the update

    @torch.no_grad()
    def build_inputs(self, groups: list[RolloutGroup]) -> dict[str, torch.Tensor]:
        """The batch's fixed tensors (module docstring), with the current weights: TRL's keys
        (`prompt_ids`, `prompt_mask`, `completion_ids`, `completion_mask` (zero on masked rows),
        `advantages` (B, T), `old_per_token_logps`, `sampling_per_token_logps`,
        `importance_sampling_ratio`, `num_items_in_batch`, `ref_per_token_logps` when beta > 0) and
        PPO's: `values_old`, `returns`, `rewards` (per token), `raw_advantages` (before whitening),
        `reward_valid`, `completion_mask_full` (the padding mask, for the forward passes)."""
        s = self.settings
        pad = self.tokenizer.pad_token_id
        prompts, completions, sampling, outcome, valid = flatten_groups(groups)
        prompt_ids, prompt_mask = _left_pad(prompts, pad)
        completion_ids, padding_mask = _right_pad(completions, pad, torch.long)
        completion_mask = padding_mask * valid[:, None].long()
        sampling_logps, _ = _right_pad(sampling, 0.0, torch.float32)
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask, completion_ids, padding_mask, completion_mask, sampling_logps, outcome, valid = (
            t.to(device) for t in (prompt_ids, prompt_mask, completion_ids, padding_mask, completion_mask,
                                   sampling_logps, outcome, valid))
        inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                  "completion_mask": completion_mask, "completion_mask_full": padding_mask}
        with self._capture():
            old_logps = self._policy_forward(self.model, inputs)
            _, hidden = self._captured()
        values_old = self._values(hidden, inputs) * completion_mask
        mask = completion_mask.float()
        if self.reference_model is not None:
            ref_logps = self._policy_forward(self.reference_model, inputs)
        kl = kl_estimators.k1(old_logps, ref_logps) * mask if s.kl_coef > 0 else None
        per_token_rewards = token_rewards(outcome, kl, completion_mask, s.kl_coef)
        raw_advantages, returns = gae(per_token_rewards, values_old, completion_mask, s.gamma, s.lam)
        advantages = whiten(raw_advantages, completion_mask) if s.whiten_advantages else raw_advantages
        inputs.update({
            "advantages": advantages,
            "old_per_token_logps": old_logps,
            "sampling_per_token_logps": sampling_logps,
            "importance_sampling_ratio": truncated_importance_weights(old_logps, sampling_logps, mask, s.importance_cap),
            "num_items_in_batch": mask.sum(),
            "values_old": values_old,
            "returns": returns,
            "rewards": per_token_rewards,
            "raw_advantages": raw_advantages,
            "reward_valid": valid,
        })
        if kl is not None:
            inputs["kl_reward"] = kl
        if s.beta > 0:
            inputs["ref_per_token_logps"] = ref_logps
        return inputs

    def loss_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        """One mini-batch's losses with the current weights: `policy_loss` (TRL's `compute_loss`),
        `value_loss`, `loss` = policy + vf_coef * value (with gradient), and the detached
        `value_clipfrac`, `approx_kl` and `values`."""
        with self._capture():
            policy_loss = self.trainer.compute_loss(self.model, batch)
            logps, hidden = self._captured()
        values = self._values(hidden, batch)
        mask = batch["completion_mask"]
        vloss, clipfrac = value_loss(values, batch["values_old"], batch["returns"], mask, self.settings.cliprange_value)
        approx_kl = (kl_estimators.k2(batch["old_per_token_logps"], logps.detach()) * mask).sum() / mask.sum().clamp(min=1)
        return {"loss": policy_loss + self.settings.vf_coef * vloss, "policy_loss": policy_loss, "value_loss": vloss,
                "value_clipfrac": clipfrac, "approx_kl": approx_kl, "values": values.detach()}

    def _parameters(self):
        yield from self.model.parameters()
        yield from self.value_head.parameters()
        if self.value_backbone is not None:
            yield from self.value_backbone.parameters()

    def step(self, groups: list[RolloutGroup], fresh: list[bool] | None = None) -> dict[str, float]:
        """One PPO update on a rollout batch: `num_ppo_epochs` shuffled passes of `num_mini_batches`
        optimiser steps over the batch's fixed pi_old, V_old, advantages and returns (module docstring)."""
        start = time.perf_counter()
        s = self.settings
        inputs = self.build_inputs(groups)
        mask = inputs["completion_mask"].bool()
        valid = inputs["reward_valid"]
        rows = mask.size(0)
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + self.batches)
        self.batches += 1
        self.trainer._metrics["train"].clear()
        records: dict[str, list[float]] = {k: [] for k in ("loss", "policy_loss", "value_loss", "value_clipfrac",
                                                           "approx_kl", "grad_norm")}
        results = []
        self.model.train()
        if self.value_backbone is not None:
            self.value_backbone.train()
        for _ in range(s.num_ppo_epochs):
            order = torch.randperm(rows, generator=generator).to(mask.device)
            for index in torch.tensor_split(order, min(s.num_mini_batches, rows)):
                batch = {k: v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.size(0) == rows else v
                         for k, v in inputs.items()}
                if not bool(batch["completion_mask"].any()):
                    continue  # nothing to train on: no step, optimiser moments untouched
                terms = self.loss_terms(batch)
                result = apply_update(list(self._parameters()), self.optimizer, terms["loss"], s.max_grad_norm)
                results.append(result)
                if not result.applied:
                    continue  # non-finite: skipped, counted in train/nonfinite_updates
                records["grad_norm"].append(result.grad_norm)
                for key in ("loss", "policy_loss", "value_loss", "value_clipfrac", "approx_kl"):
                    records[key].append(float(terms[key].detach()))
        steps = len(records["loss"])
        metrics = {f"train/{k}": _mean_finite(v) for k, v in self.trainer._metrics["train"].items() if v}
        empty = float("nan") if results else 0.0  # every attempted update non-finite / none attempted
        metrics.update({f"train/{k}": (sum(v) / len(v) if v else empty) for k, v in records.items()})
        metrics.update(nonfinite_scalars(results))
        diff = (inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]).abs()
        per_sample_fresh = torch.tensor(
            [f for f, g in zip(fresh or [True] * len(groups), groups) for _ in range(g.size)], device=mask.device)
        padding = inputs["completion_mask_full"].bool()
        fresh_mask = padding & valid[:, None] & per_sample_fresh[:, None]
        metrics.update({
            "train/optimizer_steps": float(steps),
            "train/step_s": time.perf_counter() - start,
            "train/samples": float(rows),
            "train/trained_samples": float(valid.sum()),
            "train/masked_samples": float((~valid).sum()),
            "train/skipped_step": float(not results),
            "train/completion_tokens": float(mask.sum()),
            "train/explained_variance": explained_variance(inputs["values_old"], inputs["returns"], mask),
            "train/value_mean": _masked_mean(inputs["values_old"], mask),
            "train/return_mean": _masked_mean(inputs["returns"], mask),
            "train/advantage_mean": _masked_mean(inputs["raw_advantages"], mask),
            "rollout/logprob_mismatch_max": float(diff[fresh_mask].max()) if fresh_mask.any() else float("nan"),
            **importance_weight_stats(inputs["importance_sampling_ratio"], mask),
            "train/kl_sampler_to_learner": _masked_mean(
                kl_estimators.k3(inputs["sampling_per_token_logps"], inputs["old_per_token_logps"]), mask),
        })
        if "kl_reward" in inputs:
            metrics["train/kl_reward"] = _masked_mean(inputs["kl_reward"], mask)
        return metrics
