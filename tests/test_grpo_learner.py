"""GRPOLearner on a tiny local model: input building (padding, logprobs, weights) and update direction.

Sampling logprobs are computed here independently of TRL: one unpadded forward pass per sequence,
log_softmax(logits[t-1])[y_t] for each completion token y_t. For on-policy groups the learner's
recomputed logprobs must match them (|diff| < 1e-5) and the importance weights must be 1.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.learners.grpo import GRPOLearner, LearnerSettings
from rollouts.buffer import RolloutGroup


def own_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """log pi(y_t | prompt, y_<t) for every completion token, from an unpadded forward pass."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids)
    return [float(logps[start + t - 1, tok]) for t, tok in enumerate(completion_ids)]


def make_group(model, tokenizer, prompt: str, completions: list[str], rewards: list[float], version=0):
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = [tokenizer(c)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    return RolloutGroup(
        prompt_index=0,
        prompt=prompt,
        prompt_ids=prompt_ids,
        completion_ids=completion_ids,
        sampling_logprobs=[own_logprobs(model, prompt_ids, ids) for ids in completion_ids],
        completions=completions,
        rewards=rewards,
        policy_version=version,
    )


@pytest.fixture
def learner_for(tmp_path, make_tiny_model, tokenizer):
    def make(group_size: int = 2, **settings) -> GRPOLearner:
        model = make_tiny_model(seed=1)
        return GRPOLearner(model, tokenizer, LearnerSettings(**settings), str(tmp_path / "trl"), group_size)

    return make


def two_groups(learner, tokenizer):
    """Prompts of 5 and 4 tokens (left padding), completions of 3, 2, 2 and 4 tokens (right padding)."""
    m = learner.model
    return [
        make_group(m, tokenizer, "12+3=", ["51", "5"], [1.0, 0.0]),
        make_group(m, tokenizer, "7+8=", ["5", "511"], [0.0, 0.0]),
    ]


def test_build_inputs_shapes_padding_and_logprobs(learner_for, tokenizer):
    learner = learner_for()
    groups = two_groups(learner, tokenizer)
    inputs = learner.build_inputs(groups)
    pad = tokenizer.pad_token_id

    assert inputs["prompt_ids"].shape == (4, 5)
    assert inputs["prompt_mask"].tolist() == [[1] * 5, [1] * 5, [0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert inputs["prompt_ids"][2].tolist() == [pad] + groups[1].prompt_ids  # left padded
    assert inputs["prompt_ids"][0].tolist() == groups[0].prompt_ids

    assert inputs["completion_ids"].shape == (4, 4)
    assert inputs["completion_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert inputs["completion_ids"][1].tolist() == groups[0].completion_ids[1] + [pad, pad]  # right padded
    assert inputs["completion_ids"][3].tolist() == groups[1].completion_ids[1]
    assert float(inputs["num_items_in_batch"]) == 3 + 2 + 2 + 4

    mask = inputs["completion_mask"].bool()
    sampling = inputs["sampling_per_token_logps"]
    assert sampling[1].tolist()[:2] == pytest.approx(groups[0].sampling_logprobs[1])
    assert torch.all(sampling[~mask] == 0)
    # the learner's logprobs of the padded batch equal the unpadded forward passes
    diff = (inputs["old_per_token_logps"] - sampling).abs()[mask]
    assert float(diff.max()) < 1e-5
    weights = inputs["importance_sampling_ratio"]
    assert torch.allclose(weights[mask], torch.ones(int(mask.sum())), atol=1e-4)
    assert torch.all(weights[~mask] == 0)

    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # rewards [1, 0]: centred +-0.5, unbiased std sqrt(0.5)
    assert torch.allclose(inputs["advantages"], torch.tensor([a, -a, 0.0, 0.0]), atol=1e-6)


def test_step_metrics_for_on_policy_groups(learner_for, tokenizer):
    learner = learner_for()
    metrics = learner.step(two_groups(learner, tokenizer))
    assert metrics["rollout/logprob_mismatch_max"] < 1e-5
    assert metrics["rollout/importance_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["train/samples"] == 4
    assert metrics["train/completion_tokens"] == 11
    assert metrics["train/grad_norm"] > 0
    assert metrics["train/skipped_step"] == 0 and metrics["train/masked_samples"] == 0
    assert metrics["train/masked_groups"] == 0 and metrics["train/trained_samples"] == 4
    assert all(math.isfinite(v) for v in metrics.values())


def test_stale_group_gets_importance_weight_and_is_excluded_from_mismatch(learner_for, tokenizer):
    """Sampler logprobs 0.3 below the learner's on group 2 (4 + 2 = 6 tokens): w = exp(0.3) = 1.34986 there.
    Weight mean over all 11 tokens: (5 * 1 + 6 * exp(0.3)) / 11."""
    expected_mean = (5 + 6 * math.exp(0.3)) / 11
    for fresh, expected_mismatch in (([True, False], 0.0), ([True, True], 0.3)):
        learner = learner_for()
        groups = two_groups(learner, tokenizer)
        groups[1].sampling_logprobs = [[lp - 0.3 for lp in row] for row in groups[1].sampling_logprobs]
        inputs = learner.build_inputs(groups)
        w = inputs["importance_sampling_ratio"]
        assert torch.allclose(w[2:][inputs["completion_mask"][2:].bool()], torch.full((6,), math.exp(0.3)), atol=1e-4)
        metrics = learner.step(groups, fresh=fresh)
        assert metrics["rollout/logprob_mismatch_max"] == pytest.approx(expected_mismatch, abs=1e-5)
        assert metrics["rollout/importance_weight_mean"] == pytest.approx(expected_mean, abs=1e-4)


def test_importance_weights_are_capped(learner_for, tokenizer):
    learner = learner_for(importance_cap=1.5)
    groups = two_groups(learner, tokenizer)
    groups[0].sampling_logprobs = [[lp - 2.0 for lp in row] for row in groups[0].sampling_logprobs]
    inputs = learner.build_inputs(groups)
    mask = inputs["completion_mask"].bool()
    assert torch.allclose(inputs["importance_sampling_ratio"][:2][mask[:2]], torch.full((5,), 1.5))


def sequence_logprob(model, group: RolloutGroup, i: int) -> float:
    return sum(own_logprobs(model, group.prompt_ids, group.completion_ids[i]))


def test_positive_advantage_raises_that_completions_probability(learner_for, tokenizer):
    learner = learner_for(learning_rate=1e-2)
    model = learner.model
    probe = make_group(model, tokenizer, "12+3=", ["51", "6"], [1.0, 0.0])
    before = [sequence_logprob(model, probe, i) for i in range(2)]
    for _ in range(4):  # on-policy: fresh sampling logprobs from the current weights every step
        learner.step([make_group(model, tokenizer, "12+3=", ["51", "6"], [1.0, 0.0])])
    after = [sequence_logprob(model, probe, i) for i in range(2)]
    assert after[0] > before[0] + 0.1, (before, after)  # rewarded completion more likely
    assert after[1] < before[1] - 0.1, (before, after)  # unrewarded completion less likely


def test_equal_rewards_give_zero_gradient_and_no_update(learner_for, tokenizer):
    """All advantages are 0, so the loss and its gradient are exactly 0; AdamW's first step with a zero
    gradient (zero moments, no weight decay) leaves every parameter bit-for-bit unchanged."""
    learner = learner_for(learning_rate=1e-2)
    model = learner.model
    groups = [
        make_group(model, tokenizer, "12+3=", ["51", "5"], [1.0, 1.0]),
        make_group(model, tokenizer, "7+8=", ["5", "511"], [0.0, 0.0]),
    ]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = learner.step(groups)
    assert metrics["train/grad_norm"] == 0.0
    assert metrics["train/loss"] == 0.0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
