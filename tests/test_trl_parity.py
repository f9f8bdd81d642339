"""rlpost's GRPO learner takes the update TRL's own GRPOTrainer takes, on the same samples.

TRL's `GRPOTrainer.train()` runs two optimiser steps with its generation replaced by fixed
completions (so both sides see the same samples and rewards); rlpost's `GRPOLearner.step` gets the
same groups, in the order TRL drew its prompts, with on-policy sampling logprobs. The weights after
each step must agree to float error. A difference in advantages, masks, loss normalisation,
clipping, optimiser settings or the shared-prefix forward shows up as a weight difference (two
AdamW steps move every weight by about the learning rate, in the direction of its gradient's sign).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rlpost.learners.grpo import GRPOLearner, LearnerSettings
from rollouts.buffer import RolloutGroup
from tests.test_grpo_learner import own_logprobs

pytestmark = pytest.mark.slow

LR, GROUP = 1e-3, 4
# per step, per prompt: the group's completions; the reward is 1 for the right sum, else 0
COMPLETIONS = [
    {"12+3=": ["15", "51", "15", "1"], "7+8=": ["15", "5", "51", "15"]},
    {"12+3=": ["51", "15", "5", "15"], "7+8=": ["1", "15", "15", "51"]},
]
ANSWERS = {"12+3=": "15", "7+8=": "15"}


def _reward(prompts, completions, **kwargs):
    return [float(c == ANSWERS[p]) for p, c in zip(prompts, completions)]


def test_two_updates_equal_trl_grpo_trainer_on_the_same_samples(tmp_path, make_tiny_model, tokenizer):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    theirs = make_tiny_model(seed=3)
    ours = copy.deepcopy(theirs)
    eos = tokenizer.eos_token_id
    seen: list[list[tuple[str, list[int]]]] = []  # per TRL step: (prompt, its token ids) in batch order

    def fixed_generation(prompt_ids, *args, **kwargs):
        step = len(seen)
        prompts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompt_ids]
        seen.append([(p, list(ids)) for p, ids in zip(prompts[::GROUP], prompt_ids[::GROUP])])
        out = []
        for row, prompt in enumerate(prompts):
            text = COMPLETIONS[step][prompt][row % GROUP]
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
        return out, None

    config = GRPOConfig(
        output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2 * GROUP, num_generations=GROUP,
        max_completion_length=8, temperature=1.0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        beta=0.0, loss_type="grpo", scale_rewards="group", epsilon=0.2, max_grad_norm=1.0, weight_decay=0.0,
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        gradient_checkpointing=False)
    trainer = GRPOTrainer(model=theirs, reward_funcs=[_reward], args=config,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in ANSWERS]), processing_class=tokenizer)
    trainer._generate_single_turn = fixed_generation  # TRL's transformers generation, replaced by the fixed samples
    snapshots = []

    class Snapshot:  # TRL's weights after each of its optimiser steps
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    from transformers import TrainerCallback

    trainer.add_callback(type("SnapshotCallback", (Snapshot, TrainerCallback), {})())
    trainer.train()
    assert len(seen) == 2 and len(snapshots) == 2

    learner = GRPOLearner(ours, tokenizer, LearnerSettings(learning_rate=LR, max_completion_length=8),
                          str(tmp_path / "ours"), GROUP)
    moved = 0.0
    for step, order in enumerate(seen):
        groups = []
        for index, (prompt, prompt_ids) in enumerate(order):
            texts = COMPLETIONS[step][prompt]
            completion_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
            groups.append(RolloutGroup(
                prompt_index=index, prompt=prompt, prompt_ids=prompt_ids, completion_ids=completion_ids,
                sampling_logprobs=[own_logprobs(ours, prompt_ids, ids) for ids in completion_ids],
                completions=texts, rewards=_reward([prompt] * GROUP, texts), policy_version=step))
        before = {k: v.detach().clone() for k, v in ours.state_dict().items()}
        learner.step(groups)
        for name, value in ours.state_dict().items():
            moved = max(moved, float((value - before[name]).abs().max()))
            # 1% of the learning rate: AdamW's first steps move a weight by ~lr * g / |g|, which float
            # error in a near-zero gradient can change a little; a different update changes it by ~lr
            assert torch.allclose(value, snapshots[step][name], atol=0.01 * LR, rtol=0), (
                f"step {step + 1}: {name} differs from TRL's by {float((value - snapshots[step][name]).abs().max()):.2e}")
    assert moved > 0.5 * LR  # the updates really moved the weights, so equality means something
