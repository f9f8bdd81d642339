"""GRPO learner: TRL's GRPO loss applied to batches that come from the rollout buffer.

TRL's `GRPOTrainer` generates its own samples; here generation happens elsewhere (the rollout
worker), so this learner builds the trainer only for its loss (`GRPOTrainer.compute_loss`: clipped
surrogate, optional KL to a reference, loss-type normalisation, TRL's vLLM importance-sampling
correction) and drives the optimisation step itself. The objective per token t of completion i:

    ratio_{i,t} = pi_theta(y_t) / pi_old(y_t)
    loss_{i,t}  = -min(ratio * A_i, clip(ratio, 1-eps_low, 1+eps_high) * A_i) * w_{i,t} + beta * KL_{i,t}

with A_i the group advantage (`advantages.group_advantages`) and w the truncated importance weight
of the sampler (`advantages.truncated_importance_weights`), aggregated per TRL's `loss_type`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from datasets import Dataset

from rlpost.learners.advantages import group_advantages, truncated_importance_weights
from rollouts.buffer import RolloutGroup


@dataclass
class LearnerSettings:
    learning_rate: float = 1e-4
    beta: float = 0.0
    loss_type: str = "grpo"
    epsilon: float = 0.2
    max_grad_norm: float = 1.0
    importance_cap: float = 2.0
    scale_rewards: str = "group"
    max_completion_length: int = 8
    temperature: float = 1.0  # must equal the rollout temperature: TRL scales logits by it
    seed: int = 0


def _unused_reward(prompts, completions, **kwargs):  # rewards are computed by the rollout worker
    return [0.0] * len(completions)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _right_pad(rows: list[list], pad, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(map(len, rows)))
    values = torch.full((len(rows), width), pad, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        values[i, : len(row)] = torch.tensor(row, dtype=dtype)
        mask[i, : len(row)] = 1
    return values, mask


def _k3_kl(sampler_logps: torch.Tensor, learner_logps: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(sampler || learner) from samples of the sampler (Schulman's k3):

        log_r = log pi_learner(y) - log pi_sampler(y),   k3 = exp(log_r) - 1 - log_r  >= 0

    Zero for on-policy samples; it measures how far the learner has moved since a sample was drawn.
    (TRL reports KL to the reference model only when beta > 0.)
    """
    log_r = learner_logps - sampler_logps
    return torch.exp(log_r) - 1 - log_r


class GRPOLearner:
    """Owns the policy model and its optimiser; `step(groups)` applies one GRPO update with TRL's loss."""

    def __init__(self, model, tokenizer, settings: LearnerSettings, output_dir: str, group_size: int):
        from trl import GRPOConfig, GRPOTrainer

        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        args = GRPOConfig(
            output_dir=output_dir,
            learning_rate=settings.learning_rate,
            beta=settings.beta,
            loss_type=settings.loss_type,
            epsilon=settings.epsilon,
            scale_rewards=settings.scale_rewards,
            num_generations=group_size,
            per_device_train_batch_size=group_size,
            max_completion_length=settings.max_completion_length,
            temperature=settings.temperature,
            use_cpu=True,
            bf16=False,
            report_to=[],
            seed=settings.seed,
            use_vllm=False,  # generation is ours; see below for the sampler correction
            disable_tqdm=True,
        )
        self.trainer = GRPOTrainer(
            model=model,
            reward_funcs=[_unused_reward],
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "unused"}]),
            processing_class=tokenizer,
        )
        # The samples do come from vLLM: switch on TRL's sampler importance-sampling correction so that
        # `compute_loss` multiplies each token's loss by the weights we pass in `importance_sampling_ratio`.
        self.trainer.use_vllm = True
        self.trainer.vllm_importance_sampling_correction = True
        self.trainer.current_gradient_accumulation_steps = 1
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            (p for p in model.parameters() if p.requires_grad), lr=settings.learning_rate, weight_decay=0.0
        )

    def build_inputs(self, groups: list[RolloutGroup]) -> dict[str, torch.Tensor]:
        """The tensors TRL's `compute_loss` expects, from scored rollout groups."""
        pad = self.tokenizer.pad_token_id
        if len({g.size for g in groups}) != 1:
            raise ValueError(f"groups of different sizes {sorted({g.size for g in groups})} cannot share advantages")
        prompts, completions, sampling, rewards = [], [], [], []
        for group in groups:
            for ids, logps, reward in zip(group.completion_ids, group.sampling_logprobs, group.rewards):
                prompts.append(group.prompt_ids)
                completions.append(ids)
                sampling.append(logps)
                rewards.append(reward)
        prompt_ids, prompt_mask = _left_pad(prompts, pad)
        completion_ids, completion_mask = _right_pad(completions, pad, torch.long)
        sampling_logps, _ = _right_pad(sampling, 0.0, torch.float32)
        advantages = group_advantages(
            torch.tensor(rewards, dtype=torch.float32), groups[0].size, self.settings.scale_rewards
        )
        with torch.no_grad():
            learner_logps, _, _ = self.trainer._get_per_token_logps_and_entropies(
                self.model,
                torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([prompt_mask, completion_mask], dim=1),
                completion_ids.size(1),
            )
        mask = completion_mask.float()
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": advantages,
            "old_per_token_logps": learner_logps,
            "sampling_per_token_logps": sampling_logps,
            "importance_sampling_ratio": truncated_importance_weights(
                learner_logps, sampling_logps, mask, self.settings.importance_cap
            ),
            "num_items_in_batch": mask.sum(),
        }

    @torch.no_grad()
    def logprob_mismatch(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                         sampling_logprobs: list[list[float]]) -> float:
        """Max |sampler logprob - learner logprob| over the given completions, with the current weights."""
        pad = self.tokenizer.pad_token_id
        prompts, prompt_mask = _left_pad(prompt_ids, pad)
        completions, completion_mask = _right_pad(completion_ids, pad, torch.long)
        sampled, _ = _right_pad(sampling_logprobs, 0.0, torch.float32)
        ours, _, _ = self.trainer._get_per_token_logps_and_entropies(
            self.model, torch.cat([prompts, completions], 1), torch.cat([prompt_mask, completion_mask], 1),
            completions.size(1))
        return float((ours - sampled).abs()[completion_mask.bool()].max())

    def step(self, groups: list[RolloutGroup], fresh: list[bool] | None = None) -> dict[str, float]:
        """One optimiser step on `groups`. `fresh[i]` marks on-policy groups, whose sampling logprobs
        must equal the learner's: their max |difference| is reported as `rollout/logprob_mismatch_max`."""
        start = time.perf_counter()
        inputs = self.build_inputs(groups)
        self.trainer._metrics["train"].clear()
        self.model.train()
        loss = self.trainer.compute_loss(self.model, inputs)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        self.optimizer.step()
        metrics = {f"train/{k}": sum(v) / len(v) for k, v in self.trainer._metrics["train"].items() if v}
        mask = inputs["completion_mask"].bool()
        diff = (inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]).abs()
        per_sample_fresh = torch.tensor(
            [f for f, g in zip(fresh or [True] * len(groups), groups) for _ in range(g.size)]
        )
        fresh_mask = mask & per_sample_fresh[:, None]
        metrics.update(
            {
                "train/loss": float(loss.detach()),
                "train/grad_norm": float(grad_norm),
                "train/step_s": time.perf_counter() - start,
                "train/samples": float(mask.size(0)),
                "train/completion_tokens": float(mask.sum()),
                "rollout/logprob_mismatch_max": float(diff[fresh_mask].max()) if fresh_mask.any() else float("nan"),
                "rollout/importance_weight_mean": float(inputs["importance_sampling_ratio"][mask].mean()),
                "train/kl_sampler_to_learner": float(_k3_kl(inputs["sampling_per_token_logps"],
                                                            inputs["old_per_token_logps"])[mask].mean()),
            }
        )
        return metrics
