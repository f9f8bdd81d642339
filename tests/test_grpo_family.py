"""Several optimiser steps per rollout batch (TRL's `num_iterations`, `steps_per_generation`), GSPO
(`importance_sampling_level="sequence"`), asymmetric clipping (`epsilon_high`) and the loss types
beyond "grpo": checked against values computed here, independently of TRL.

Hand computations. Logprobs come from unpadded forward passes (`own_logprobs`). pi_old is the policy
before a batch's first update; pi_theta the policy at the step being checked. With A_i the group
advantage, w_{i,t} the sampler importance weight, m_{i,t} the completion mask, n_i = sum_t m_{i,t}:

  token level:     r_{i,t} = exp(log pi_theta(y_t) - log pi_old(y_t))
  sequence level:  r_i     = exp((1/n_i) sum_t m_{i,t} (log pi_theta(y_t) - log pi_old(y_t)))   (GSPO)
  surrogate:       c = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i)
  "grpo" loss:     (1/B) sum_i (1/n_i) sum_t m_{i,t} c_{i,t} w_{i,t}
  "dapo" loss of one of S mini-batches: sum_{i,t in it} m c w / (N / S), N = tokens of the whole batch
  TRL's clip ratios: low = r < 1 - eps_low and A < 0, high = r > 1 + eps_high and A > 0, region =
  either; averaged over the tokens of the mini-batch (over its sequences at sequence level).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from rlpost.errors import UserError
from rlpost.learners.advantages import group_advantages
from rlpost.learners.grpo import (LOSS_TYPES, GRPOLearner, LearnerSettings, loss_level_conflict,
                                  split_by_groups)
from rlpost.recipe import load_recipe
from tests.test_grpo_learner import make_group, own_logprobs
from tests.test_recipe import QUICKSTART

CLIP_KEYS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def learner_with(tmp_path, make_tiny_model, tokenizer, group_size=2, seed=1, **settings) -> GRPOLearner:
    return GRPOLearner(make_tiny_model(seed), tokenizer, LearnerSettings(**settings), str(tmp_path / "trl"),
                       group_size)


def two_groups(model, tokenizer):
    return [
        make_group(model, tokenizer, "12+3=", ["51", "5"], [1.0, 0.0]),
        make_group(model, tokenizer, "7+8=", ["5", "511"], [0.0, 1.0]),
    ]


def four_groups(model, tokenizer):
    return two_groups(model, tokenizer) + [
        make_group(model, tokenizer, "3+4=", ["7", "61"], [1.0, 0.0]),
        make_group(model, tokenizer, "9+9=", ["18", "81"], [0.0, 1.0]),
    ]


def rows(groups):
    """(prompt_ids, completion_ids) per row, in batch order."""
    return [(g.prompt_ids, ids) for g in groups for ids in g.completion_ids]


class Recorder:
    """Wraps `trainer.compute_loss`: for each call, the weights it ran with, its inputs and its loss."""

    def __init__(self, learner: GRPOLearner):
        self.calls: list[dict] = []
        self.learner = learner
        original = learner.trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            loss = original(model, inputs, *args, **kwargs)
            self.calls.append({
                "state": copy.deepcopy(model.state_dict()),
                "inputs": {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
                "loss": float(loss.detach()),
            })
            return loss

        learner.trainer.compute_loss = compute_loss

    def model_at(self, call: int, make_tiny_model):
        return frozen_copy(self.calls[call]["state"], make_tiny_model)


def frozen_copy(state: dict, make_tiny_model):
    """A separate model with these weights. (Not `copy.deepcopy(learner.model)`: TRL's fused LM head
    replaces `model.forward` by a closure over the original model, so a deep copy would still run it.)"""
    twin = make_tiny_model(1)
    twin.load_state_dict(state)
    return twin


def token_expectations(new: list[list[float]], old: list[list[float]], advantages: list[float],
                       weights: list[list[float]], eps_low: float, eps_high: float) -> dict[str, float]:
    """The "grpo" loss and TRL's token-level clip ratios, from per-row logprob lists."""
    low = high = tokens = 0
    loss = 0.0
    for new_i, old_i, a, w_i in zip(new, old, advantages, weights):
        row = 0.0
        for n, o, w in zip(new_i, old_i, w_i):
            r = math.exp(n - o)
            row += -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a) * w
            low += r < 1 - eps_low and a < 0
            high += r > 1 + eps_high and a > 0
            tokens += 1
        loss += row / len(new_i)
    return {"loss": loss / len(new), "clip_ratio/low_mean": low / tokens, "clip_ratio/high_mean": high / tokens,
            "clip_ratio/region_mean": (low + high) / tokens}


def row_weights(inputs) -> list[list[float]]:
    mask = inputs["completion_mask"].bool()
    return [inputs["importance_sampling_ratio"][i][mask[i]].tolist() for i in range(mask.size(0))]


# --- 1. one pass, one mini-batch: today's single step --------------------------------------------------


def test_defaults_are_the_single_step_update_and_never_clip(tmp_path, make_tiny_model, tokenizer):
    """mu = S = 1: step() is build_inputs, one compute_loss, backward, grad clip, AdamW step; the only
    ratio TRL sees is exactly 1, so even with a large learning rate no token is ever clipped."""
    learner = learner_with(tmp_path / "a", make_tiny_model, tokenizer, learning_rate=0.05, epsilon=0.1)
    twin = learner_with(tmp_path / "b", make_tiny_model, tokenizer, learning_rate=0.05, epsilon=0.1)
    groups = two_groups(learner.model, tokenizer)

    metrics = learner.step(groups)
    inputs = twin.build_inputs(groups)
    loss = twin.trainer.compute_loss(twin.model, inputs)
    twin.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(twin.model.parameters(), twin.settings.max_grad_norm))
    twin.optimizer.step()

    for (name, p), q in zip(learner.model.named_parameters(), twin.model.parameters()):
        assert torch.equal(p, q), name
    assert metrics["train/loss"] == float(loss.detach()) and metrics["train/grad_norm"] == grad_norm
    assert metrics["train/optimizer_steps"] == 1
    for key in CLIP_KEYS:
        assert learner.trainer._metrics["train"][key] == [0.0]
        assert metrics[f"train/{key}"] == 0.0
    # and a second batch, on-policy for the moved weights, again sees ratio 1 only
    assert all(learner.step(two_groups(learner.model, tokenizer))[f"train/{k}"] == 0.0 for k in CLIP_KEYS)


# --- 2. the clip binds once the weights have moved within a batch --------------------------------------


@pytest.mark.parametrize("mu, s", [(2, 1), (1, 2)])
def test_later_steps_of_a_batch_see_ratios_away_from_one_and_the_clip_binds(tmp_path, make_tiny_model, tokenizer,
                                                                             mu, s):
    """num_iterations = 2: the second pass runs with the weights after the first step, against the same
    pi_old; steps_per_generation = 2: the second mini-batch (group 2) likewise. The loss and clip ratios
    TRL reports for that step equal the hand computation, and the clip binds (region > 0)."""
    eps = 0.1
    learner = learner_with(tmp_path, make_tiny_model, tokenizer, learning_rate=0.05, epsilon=eps,
                           num_iterations=mu, steps_per_generation=s)
    start = frozen_copy(copy.deepcopy(learner.model.state_dict()), make_tiny_model)
    groups = two_groups(learner.model, tokenizer)
    recorder = Recorder(learner)
    policy_passes = []
    original_logps = learner._logps
    learner._logps = lambda model, *a: policy_passes.append(model) or original_logps(model, *a)

    metrics = learner.step(groups)

    assert metrics["train/optimizer_steps"] == 2 and len(recorder.calls) == 2
    assert len(policy_passes) == 1  # pi_old: computed once, in build_inputs, before the first update
    first, second = (c["inputs"] for c in recorder.calls)
    # pi_old is not recomputed: what the second step uses is what the first used (its rows) ...
    if mu == 2:
        assert torch.equal(first["old_per_token_logps"], second["old_per_token_logps"])
        assert torch.equal(first["importance_sampling_ratio"], second["importance_sampling_ratio"])
        step_rows = rows(groups)
    else:
        step_rows = rows(groups[1:])
    # ... and it is the policy before the batch's first update
    old = [own_logprobs(start, p, c) for p, c in step_rows]
    mask = second["completion_mask"].bool()
    for i, values in enumerate(old):
        assert second["old_per_token_logps"][i][mask[i]].tolist() == pytest.approx(values, abs=1e-5)

    theta = recorder.model_at(1, make_tiny_model)  # the weights after the first optimiser step
    new = [own_logprobs(theta, p, c) for p, c in step_rows]
    ratios = [math.exp(n - o) for new_i, old_i in zip(new, old) for n, o in zip(new_i, old_i)]
    assert max(abs(r - 1) for r in ratios) > 0.05  # the second step is off pi_old
    expected = token_expectations(new, old, second["advantages"].tolist(), row_weights(second), eps, eps)

    assert recorder.calls[1]["loss"] == pytest.approx(expected["loss"], rel=1e-4, abs=1e-6)
    trl = learner.trainer._metrics["train"]
    for key in CLIP_KEYS:
        assert trl[key][0] == 0.0  # the first step: ratio exactly 1
        assert trl[key][1] == pytest.approx(expected[key], abs=1e-6)
        assert metrics[f"train/{key}"] == pytest.approx((trl[key][0] + trl[key][1]) / 2, abs=1e-9)
    assert expected["clip_ratio/region_mean"] > 0 and metrics["train/clip_ratio/region_mean"] > 0
    assert metrics["train/loss"] == pytest.approx((recorder.calls[0]["loss"] + recorder.calls[1]["loss"]) / 2)


def test_epsilon_high_sets_the_upper_clip_only(tmp_path, make_tiny_model, tokenizer):
    """DAPO's asymmetric clip: the same second pass with epsilon_high = 10 never counts a high clip,
    while the low clip (epsilon) is unchanged."""
    metrics = {}
    for high in (None, 10.0):
        learner = learner_with(tmp_path / str(high), make_tiny_model, tokenizer, learning_rate=0.05, epsilon=0.1,
                               epsilon_high=high, num_iterations=2)
        assert learner.trainer.epsilon_low == 0.1 and learner.trainer.epsilon_high == (high or 0.1)
        metrics[high] = learner.step(two_groups(learner.model, tokenizer))
    assert metrics[None]["train/clip_ratio/high_mean"] > 0
    assert metrics[10.0]["train/clip_ratio/high_mean"] == 0.0
    assert metrics[10.0]["train/clip_ratio/low_mean"] == metrics[None]["train/clip_ratio/low_mean"] > 0


# --- 3. the sampler importance weights reach the loss ----------------------------------------------------


def gradient(learner, inputs) -> tuple[torch.Tensor, float]:
    learner.model.zero_grad(set_to_none=True)
    loss = learner.trainer.compute_loss(learner.model, inputs)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None])
    learner.model.zero_grad(set_to_none=True)
    return grad, float(loss.detach())


def test_sampler_importance_weight_scales_that_samples_gradient(tmp_path, make_tiny_model, tokenizer):
    """TRL multiplies each token's loss by `importance_sampling_ratio`: at r = 1 the loss is linear in it,
    so sample 0 alone (sample 1 weighted 0) with weight 2 gives exactly twice its gradient with weight 1
    (a factor 2 is exact in floating point), and the weights of two samples add up."""
    learner = learner_with(tmp_path, make_tiny_model, tokenizer)
    inputs = learner.build_inputs([make_group(learner.model, tokenizer, "12+3=", ["51", "5"], [1.0, 0.0])])
    mask = inputs["completion_mask"].float()

    def with_weights(w0: float, w1: float):
        weighted = dict(inputs, importance_sampling_ratio=mask * torch.tensor([[w0], [w1]]))
        return gradient(learner, weighted)

    (g1, l1), (g2, l2) = with_weights(1.0, 0.0), with_weights(2.0, 0.0)
    assert float(g1.abs().max()) > 1e-4
    assert torch.equal(g2, 2 * g1) and l2 == 2 * l1
    (g_other, _), (g_both, _) = with_weights(0.0, 1.0), with_weights(1.0, 1.0)
    assert not torch.allclose(g1, g_other)
    assert torch.allclose(g_both, g1 + g_other, atol=1e-7, rtol=1e-5)
    # the weights build_inputs computes are those that reach the loss: on-policy they are 1
    assert torch.allclose(gradient(learner, inputs)[0], g_both, atol=1e-6, rtol=1e-4)


# --- 4. GSPO: sequence-level ratios ----------------------------------------------------------------------


def test_sequence_level_ratio_is_the_mean_token_log_ratio(tmp_path, make_tiny_model, tokenizer):
    """importance_sampling_level = "sequence", loss_type "grpo", one group of 2 (A = +a, -a), w = 1:

        s_i = (1/n_i) sum_t (log pi_theta(y_t) - log pi_old(y_t)),   r_i = exp(s_i)
        loss = (1/2) sum_i -min(r_i A_i, clip(r_i, 1 - eps_low, 1 + eps_high) A_i)

    pi_theta: pi_old after a gradient step raising the logprob of both completions, so r_0 > 1 + eps_high
    with A_0 > 0 (clipped: its term is the constant -(1 + eps_high) A_0) and r_1 > 1 with A_1 < 0 (not
    clipped: its term is -r_1 A_1). TRL's clip ratio counts sequences: region = 1/2."""
    eps_low, eps_high = 0.05, 0.08
    learner = learner_with(tmp_path, make_tiny_model, tokenizer, importance_sampling_level="sequence",
                           epsilon=eps_low, epsilon_high=eps_high)
    assert learner.trainer.importance_sampling_level == "sequence"
    model = learner.model
    group = make_group(model, tokenizer, "12+3=", ["51", "5"], [1.0, 0.0])
    inputs = learner.build_inputs([group])
    inputs["importance_sampling_ratio"] = inputs["completion_mask"].float()  # w = 1 exactly
    old = [own_logprobs(model, group.prompt_ids, ids) for ids in group.completion_ids]

    # move pi_theta away from pi_old: one plain gradient step up the mean token logprob of both
    logps = [torch.log_softmax(model(input_ids=torch.tensor([group.prompt_ids + ids])).logits[0], -1)
             for ids in group.completion_ids]
    start = len(group.prompt_ids)
    objective = sum(torch.stack([lp[start + t - 1, tok] for t, tok in enumerate(ids)]).mean()
                    for lp, ids in zip(logps, group.completion_ids))
    model.zero_grad(set_to_none=True)
    objective.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=0.01)
    model.zero_grad(set_to_none=True)
    new = [own_logprobs(model, group.prompt_ids, ids) for ids in group.completion_ids]

    a = inputs["advantages"].tolist()
    assert a[0] > 0 > a[1]
    s = [sum(n - o for n, o in zip(new_i, old_i)) / len(new_i) for new_i, old_i in zip(new, old)]
    r = [math.exp(v) for v in s]
    assert r[0] > 1 + eps_high and 1 < r[1]  # sample 0 clipped, sample 1 not (A < 0: only r < 1 - eps_low clips)
    clip = [min(max(v, 1 - eps_low), 1 + eps_high) for v in r]
    expected = sum(-min(ri * ai, ci * ai) for ri, ci, ai in zip(r, clip, a)) / 2
    assert expected == pytest.approx((-(1 + eps_high) * a[0] - r[1] * a[1]) / 2)

    learner.trainer._metrics["train"].clear()
    loss = float(learner.trainer.compute_loss(model, inputs))
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-7)
    metrics = learner.trainer._metrics["train"]
    assert metrics["clip_ratio/high_mean"] == [0.5] and metrics["clip_ratio/low_mean"] == [0.0]
    assert metrics["clip_ratio/region_mean"] == [0.5]

    # what it is not: per-token ratios, or the sum (not the mean) of the token log-ratios
    token_level = token_expectations(new, old, a, [[1.0] * len(x) for x in new], eps_low, eps_high)["loss"]
    summed = [math.exp(sum(n - o for n, o in zip(new_i, old_i))) for new_i, old_i in zip(new, old)]
    summed_loss = sum(-min(ri * ai, min(max(ri, 1 - eps_low), 1 + eps_high) * ai) for ri, ai in zip(summed, a)) / 2
    assert abs(loss - token_level) > 1e-3 and abs(loss - summed_loss) > 1e-3


# --- 5. mini-batches of whole groups ----------------------------------------------------------------------


def test_minibatches_keep_groups_whole_and_full_batch_advantages(tmp_path, make_tiny_model, tokenizer):
    """4 groups of 2, steps_per_generation = 2, loss_type "dapo": mini-batch k is groups 2k, 2k+1 with the
    advantages, pi_old and weights of the full batch; each is normalised by N / 2 (N: tokens of the whole
    batch), as TRL does; the second runs with the weights after the first step."""
    learner = learner_with(tmp_path, make_tiny_model, tokenizer, learning_rate=0.05, loss_type="dapo",
                           steps_per_generation=2)
    start = frozen_copy(copy.deepcopy(learner.model.state_dict()), make_tiny_model)
    groups = four_groups(learner.model, tokenizer)
    full = learner.build_inputs(groups)
    parts = split_by_groups(full, 2, 2)
    assert len(parts) == 2
    for k, part in enumerate(parts):
        for key, value in full.items():
            if key == "num_items_in_batch":
                assert torch.equal(part[key], value)
            else:
                assert torch.equal(part[key], value[4 * k:4 * (k + 1)]), key
        # whole groups: rows 2j, 2j+1 of the part are the two samples of group 2k + j
        for j in range(2):
            g = groups[2 * k + j]
            prompt = part["prompt_ids"][2 * j:2 * j + 2][:, -len(g.prompt_ids):]
            assert prompt.tolist() == [g.prompt_ids, g.prompt_ids]
    # the advantages are those of each group's own rewards, whichever mini-batch it is in
    rewards = torch.tensor([r for g in groups for r in g.rewards])
    assert torch.equal(full["advantages"], group_advantages(rewards, 2))
    for bad in (3, 8):
        with pytest.raises(ValueError, match="whole groups"):
            split_by_groups(full, 2, bad)

    recorder = Recorder(learner)
    metrics = learner.step(groups)
    assert metrics["train/optimizer_steps"] == 2 and len(recorder.calls) == 2
    n = float(full["num_items_in_batch"])
    for k, call in enumerate(recorder.calls):
        inputs = call["inputs"]
        assert torch.equal(inputs["advantages"], full["advantages"][4 * k:4 * (k + 1)])
        assert torch.allclose(inputs["old_per_token_logps"], full["old_per_token_logps"][4 * k:4 * (k + 1)])
        assert float(inputs["num_items_in_batch"]) == n
        step_rows = rows(groups[2 * k:2 * k + 2])
        old = [own_logprobs(start, p, c) for p, c in step_rows]
        theta = recorder.model_at(k, make_tiny_model)
        new = [own_logprobs(theta, p, c) for p, c in step_rows]
        a, w = inputs["advantages"].tolist(), row_weights(inputs)
        total = 0.0
        for new_i, old_i, a_i, w_i in zip(new, old, a, w):
            for nt, ot, wt in zip(new_i, old_i, w_i):
                ratio = math.exp(nt - ot)
                total += -min(ratio * a_i, min(max(ratio, 0.8), 1.2) * a_i) * wt
        assert call["loss"] == pytest.approx(total / (n / 2), rel=1e-4, abs=1e-6)


def test_a_batch_that_does_not_split_into_whole_groups_is_refused(tmp_path, make_tiny_model, tokenizer):
    learner = learner_with(tmp_path, make_tiny_model, tokenizer, steps_per_generation=2)
    groups = two_groups(learner.model, tokenizer)[:1] * 3
    with pytest.raises(ValueError, match="steps_per_generation = 2"):
        learner.step(groups)


def test_a_minibatch_without_trainable_samples_takes_no_step(tmp_path, make_tiny_model, tokenizer):
    learner = learner_with(tmp_path, make_tiny_model, tokenizer, steps_per_generation=2, num_iterations=2)
    m = learner.model
    groups = [make_group(m, tokenizer, "12+3=", ["51", "5"], [1.0, 0.0]),
              make_group(m, tokenizer, "7+8=", ["5", "511"], [None, 1.0])]
    metrics = learner.step(groups)
    assert metrics["train/optimizer_steps"] == 2  # group 2 (one valid sample) never gets its own step
    assert metrics["train/skipped_step"] == 0 and metrics["train/masked_groups"] == 1


# --- 6. the loss types and their TRL settings -------------------------------------------------------------


VALID = [(lt, "token") for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")] + \
        [(lt, "sequence") for lt in ("grpo", "sapo", "luspo")]


@pytest.mark.parametrize("loss_type, level", VALID)
def test_every_allowed_loss_type_trains_with_the_settings_passed_to_trl(tmp_path, make_tiny_model, tokenizer,
                                                                        loss_type, level):
    high = 5.0 if loss_type == "cispo" else 0.28
    learner = learner_with(tmp_path, make_tiny_model, tokenizer, learning_rate=0.05, loss_type=loss_type,
                           importance_sampling_level=level, epsilon_high=high, num_iterations=2)
    trainer = learner.trainer
    assert (trainer.loss_type, trainer.importance_sampling_level, trainer.epsilon_high) == (loss_type, level, high)
    assert trainer.args.num_iterations == 2 and trainer.args.steps_per_generation == 1
    before = [p.clone() for p in learner.model.parameters()]
    metrics = learner.step(two_groups(learner.model, tokenizer))
    assert metrics["train/optimizer_steps"] == 2 and math.isfinite(metrics["train/loss"])
    assert metrics["train/grad_norm"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(before, learner.model.parameters()))


def test_learner_refuses_what_trl_cannot_do_with_our_inputs(tmp_path, make_tiny_model, tokenizer):
    for settings, message in (
        (dict(loss_type="vespo"), "not supported"),
        (dict(loss_type="dapo", importance_sampling_level="sequence"), "per-sequence"),
        (dict(loss_type="luspo"), "needs importance_sampling_level 'sequence'"),
        (dict(loss_type="cispo"), "epsilon_high"),
        (dict(num_iterations=0), "must be >= 1"),
        (dict(importance_sampling_level="group"), "importance_sampling_level"),
    ):
        with pytest.raises(ValueError, match=message):
            learner_with(tmp_path, make_tiny_model, tokenizer, **settings)


# --- 7. recipe keys ------------------------------------------------------------------------------------


def recipe_error(overrides: list[str]) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(QUICKSTART, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_recipe_checks_the_new_keys_at_load_time():
    recipe = load_recipe(QUICKSTART)
    assert (recipe.grpo.num_iterations, recipe.grpo.steps_per_generation) == (1, 1)
    assert (recipe.grpo.importance_sampling_level, recipe.grpo.epsilon_high) == ("token", None)
    ok = load_recipe(QUICKSTART, ["grpo.num_iterations=2", "grpo.steps_per_generation=4", "grpo.epsilon_high=0.28",
                                  "grpo.importance_sampling_level=sequence"])
    assert (ok.grpo.num_iterations, ok.grpo.steps_per_generation, ok.grpo.epsilon_high) == (2, 4, 0.28)
    load_recipe(QUICKSTART, ["grpo.loss_type=luspo", "grpo.importance_sampling_level=sequence"])
    load_recipe(QUICKSTART, ["grpo.loss_type=cispo", "grpo.epsilon_high=5.0"])

    for key in ("num_iterations", "steps_per_generation"):
        assert f"'grpo.{key}' must be >= 1, got 0" in recipe_error([f"grpo.{key}=0"])
    message = recipe_error(["grpo.steps_per_generation=3"])  # quickstart: prompts_per_step 8
    assert "'grpo.steps_per_generation' (3) must divide 'grpo.prompts_per_step' (8)" in message
    assert message.startswith("override 'grpo.steps_per_generation=3'")
    message = recipe_error(["grpo.loss_type=dapo", "grpo.importance_sampling_level=sequence"])
    assert "'grpo.loss_type' ('dapo') and 'grpo.importance_sampling_level' ('sequence')" in message
    message = recipe_error(["grpo.loss_type=luspo"])
    assert "'grpo.loss_type' ('luspo') and 'grpo.importance_sampling_level' ('token')" in message
    assert "'grpo.epsilon_high'" in recipe_error(["grpo.loss_type=cispo"])
    assert "'grpo.epsilon_high' must be > 0" in recipe_error(["grpo.epsilon_high=-0.1"])
    assert "must be one of" in recipe_error(["grpo.importance_sampling_level=group"])
    assert "must be one of" in recipe_error(["grpo.loss_type=vespo"])


def test_recipe_rules_are_the_learners():
    """The stage's loss_type choices and loss_type x importance_sampling_level rule (kept free of torch
    imports) agree with the learner's, pair by pair."""
    from rlpost.stages.grpo import GRPOStage

    fields = {f.name: f for f in dataclasses.fields(GRPOStage)}
    assert fields["loss_type"].metadata["choices"] == LOSS_TYPES
    for loss_type in LOSS_TYPES:
        for level in fields["importance_sampling_level"].metadata["choices"]:
            overrides = [f"grpo.loss_type={loss_type}", f"grpo.importance_sampling_level={level}",
                         "grpo.epsilon_high=5.0"]
            if loss_level_conflict(loss_type, level):
                assert "'grpo.importance_sampling_level'" in recipe_error(overrides)
            else:
                load_recipe(QUICKSTART, overrides)


def test_run_grpo_passes_the_keys_to_the_learner(tmp_path, monkeypatch, tokenizer):
    import rlpost.loop
    from rlpost.stages.grpo import run_grpo

    class Captured(Exception):
        pass

    def run_rl(policy_dir, run_dir, tok, worker, settings, evaluate=None, progress=None, learner_factory=None,
               dist=None):
        raise Captured(settings)

    monkeypatch.setattr(rlpost.loop, "run_rl", run_rl)
    tokenizer.save_pretrained(tmp_path / "policy")
    recipe = load_recipe(QUICKSTART, ["grpo.num_iterations=2", "grpo.steps_per_generation=4",
                                      "grpo.epsilon_high=0.28", "grpo.importance_sampling_level=sequence"])
    ctx = SimpleNamespace(recipe=recipe, name="grpo", policy_in=tmp_path / "policy", out_dir=tmp_path / "out",
                          data=SimpleNamespace(prompts=lambda: None, format=None), engine_settings=None,
                          device="cpu", evaluate=None, dist=None)
    with pytest.raises(Captured) as info:
        run_grpo(recipe.grpo, ctx)
    learner = info.value.args[0].learner
    assert (learner.num_iterations, learner.steps_per_generation) == (2, 4)
    assert (learner.epsilon_high, learner.importance_sampling_level) == (0.28, "sequence")
    assert inspect.signature(LearnerSettings).parameters.keys() >= {"num_iterations", "steps_per_generation"}
