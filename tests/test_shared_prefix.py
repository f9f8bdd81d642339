"""The learner's forward with each group's prompt computed once (`shared_prefix_logps`) gives TRL's
per-token logprobs, entropies and gradients (within float reassociation), on left-padded prompts of
different lengths, groups of different sizes and right-padded completions."""

from __future__ import annotations

import pytest
import torch

from rlpost.learners.grpo import GRPOLearner, LearnerSettings, shared_prefix_logps
from tests.test_grpo_learner import make_group


def batch(tokenizer, model):
    """3 runs of shared prompts (5, 4 and 6 tokens, so 2 and 1 padding columns), 3 + 2 + 1 rows."""
    groups = [make_group(model, tokenizer, "12+3=", ["51", "5", "5111"], [1.0, 0.0, 0.5]),
              make_group(model, tokenizer, "7+8=", ["5", "511"], [0.0, 1.0]),
              make_group(model, tokenizer, "45+67=", ["211"], [1.0])]
    return groups


@pytest.fixture
def learner(tmp_path, make_tiny_model, tokenizer):
    return GRPOLearner(make_tiny_model(seed=2), tokenizer, LearnerSettings(), str(tmp_path / "trl"), 2)


def tensors(learner, groups):
    from rlpost.learners.grpo import _left_pad, _right_pad

    pad = learner.tokenizer.pad_token_id
    prompts = [g.prompt_ids for g in groups for _ in g.completion_ids]
    completions = [c for g in groups for c in g.completion_ids]
    prompt_ids, prompt_mask = _left_pad(prompts, pad)
    completion_ids, completion_mask = _right_pad(completions, pad, torch.long)
    return (torch.cat([prompt_ids, completion_ids], dim=1), torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1), completion_mask.bool())


def test_shared_prefix_forward_equals_the_full_forward(learner, tokenizer):
    input_ids, attention_mask, keep, mask = tensors(learner, batch(tokenizer, learner.model))
    trainer = learner.trainer
    model = learner.model

    full_logps, full_entropy, _ = type(trainer)._get_per_token_logps_and_entropies(
        trainer, model, input_ids, attention_mask, keep, compute_entropy=True)
    (full_logps * mask).sum().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logps, entropy = shared_prefix_logps(model, input_ids, attention_mask, keep, compute_entropy=True)
    (logps * mask).sum().backward()
    assert torch.allclose(logps[mask], full_logps[mask], atol=1e-5)
    assert torch.allclose(entropy[mask], full_entropy[mask], atol=1e-5)
    for (name, p), g in zip(model.named_parameters(), full_grads):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4), name


def test_rows_that_share_no_prompt_take_trl_forward(learner, tokenizer):
    groups = batch(tokenizer, learner.model)
    distinct = [type(g)(**{**vars(g), "completion_ids": g.completion_ids[:1]}) for g in groups]
    input_ids, attention_mask, keep, _ = tensors(learner, distinct)
    assert shared_prefix_logps(learner.model, input_ids, attention_mask, keep) is None


def test_the_learner_step_is_the_same_with_and_without_prefix_sharing(tmp_path, make_tiny_model, tokenizer,
                                                                      monkeypatch):
    import rlpost.learners.grpo as grpo

    results = []
    for share in (True, False):
        if not share:
            monkeypatch.setattr(grpo, "shared_prefix_logps", lambda *a, **k: None)
        learner = GRPOLearner(make_tiny_model(seed=2), tokenizer, LearnerSettings(learning_rate=1e-2),
                              str(tmp_path / f"trl-{share}"), 2)
        groups = [make_group(learner.model, tokenizer, "12+3=", ["51", "5"], [1.0, 0.0]),
                  make_group(learner.model, tokenizer, "7+8=", ["5", "511"], [0.0, 1.0])]
        scalars = learner.step(groups)
        results.append((scalars, [p.detach().clone() for p in learner.model.parameters()]))
    (shared, shared_params), (plain, plain_params) = results
    assert shared["train/loss"] == pytest.approx(plain["train/loss"], abs=1e-6)
    assert shared["train/grad_norm"] == pytest.approx(plain["train/grad_norm"], rel=1e-4)
    for a, b in zip(shared_params, plain_params):
        assert torch.allclose(a, b, atol=1e-6)
