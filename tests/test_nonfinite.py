"""Non-finite updates are skipped and counted (`rlpost.learners.update`), and a run of them stops the run.

Each learner test first takes a finite step (so the AdamW moments exist), then a step whose loss is
made NaN/inf: the parameters and every optimiser-state tensor must be exactly as before, the
gradients cleared, `train/nonfinite_updates` the number of updates attempted and
`train/nonfinite_step` 1; a finite step after it must update again.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rlpost.learners.grpo import GRPOLearner, LearnerSettings
from rlpost.learners.ppo import PPOLearner, PPOSettings
from rlpost.learners.update import NonFiniteLossError, NonFiniteStreak, apply_update, nonfinite_scalars
from tests.test_grpo_learner import make_group


def snapshot(learner, *modules) -> dict:
    params = {f"{i}.{k}": p.detach().clone() for i, m in enumerate((learner.model, *modules))
              for k, p in m.named_parameters()}
    return {"params": params, "optimizer": copy.deepcopy(learner.optimizer.state_dict())}


def assert_same_state(before: dict, after: dict) -> None:
    assert before["params"].keys() == after["params"].keys()
    for key, value in before["params"].items():
        assert torch.equal(value, after["params"][key]), key
    a, b = before["optimizer"]["state"], after["optimizer"]["state"]
    assert a.keys() == b.keys() and a  # moments exist (a finite step came first) and are untouched
    for index in a:
        for name, value in a[index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[index][name])), (index, name)


def changed(before: dict, learner) -> bool:
    return any(not torch.equal(before["params"][f"0.{k}"], p.detach()) for k, p in learner.model.named_parameters())


def groups_for(model, tokenizer):
    return [make_group(model, tokenizer, "12+3=", ["15", "51", "5"], [1.0, 0.0, 0.5]),
            make_group(model, tokenizer, "7+8=", ["15", "511", "1"], [1.0, 0.0, 0.0])]


# ----------------------------------------------------------------------------- apply_update itself


def linear_case():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    return layer, optimizer, x


def test_apply_update_steps_on_a_finite_loss_and_reports_the_unclipped_norm():
    layer, optimizer, x = linear_case()
    before = [p.detach().clone() for p in layer.parameters()]
    loss = layer(x).pow(2).sum()
    result = apply_update(layer, optimizer, loss, max_grad_norm=1e-3)
    assert result.applied and not result.nonfinite and result.loss == pytest.approx(float(loss))
    assert result.grad_norm > 1e-3  # before clipping
    assert all(not torch.equal(a, p) for a, p in zip(before, layer.parameters()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_apply_update_skips_a_non_finite_loss_without_backward(bad):
    layer, optimizer, x = linear_case()
    apply_update(layer, optimizer, layer(x).sum(), 1.0)  # moments exist
    state = copy.deepcopy(optimizer.state_dict())
    before = [p.detach().clone() for p in layer.parameters()]
    result = apply_update(layer, optimizer, layer(x).sum() * bad, 1.0)
    assert not result.applied and result.nonfinite and result.nonfinite_loss and math.isnan(result.grad_norm)
    assert all(torch.equal(a, p) for a, p in zip(before, layer.parameters()))
    assert all(p.grad is None for p in layer.parameters())
    assert str(optimizer.state_dict()) == str(state)


def test_apply_update_skips_a_non_finite_gradient_with_a_finite_loss():
    layer, optimizer, x = linear_case()
    apply_update(layer, optimizer, layer(x).sum(), 1.0)
    state = copy.deepcopy(optimizer.state_dict())
    before = [p.detach().clone() for p in layer.parameters()]
    handle = layer.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    result = apply_update(layer, optimizer, layer(x).sum(), 1.0)
    handle.remove()
    assert not result.applied and not result.nonfinite_loss and not math.isfinite(result.grad_norm)
    assert all(torch.equal(a, p) for a, p in zip(before, layer.parameters()))
    assert all(p.grad is None for p in layer.parameters())
    assert str(optimizer.state_dict()) == str(state)


def test_nonfinite_scalars():
    ok = type("R", (), {"applied": True})()
    bad = type("R", (), {"applied": False})()
    assert nonfinite_scalars([]) == {"train/nonfinite_updates": 0.0, "train/nonfinite_step": 0.0}
    assert nonfinite_scalars([ok, bad]) == {"train/nonfinite_updates": 1.0, "train/nonfinite_step": 0.0}
    assert nonfinite_scalars([bad, bad]) == {"train/nonfinite_updates": 2.0, "train/nonfinite_step": 1.0}


# ----------------------------------------------------------------------------- GRPO


@pytest.fixture
def grpo(tmp_path, make_tiny_model, tokenizer):
    def make(**settings):
        return GRPOLearner(make_tiny_model(seed=1), tokenizer, LearnerSettings(learning_rate=1e-2, **settings),
                           str(tmp_path / "trl"), group_size=3)

    return make


def nan_loss(monkeypatch, trainer):
    original = trainer.compute_loss
    monkeypatch.setattr(trainer, "compute_loss", lambda model, inputs: original(model, inputs) * float("nan"))


def test_grpo_nan_loss_skips_the_update_then_a_finite_step_updates(grpo, tokenizer, monkeypatch):
    learner = grpo()
    groups = groups_for(learner.model, tokenizer)
    first = learner.step(groups)
    assert first["train/nonfinite_updates"] == 0.0 and first["train/nonfinite_step"] == 0.0
    assert first["train/optimizer_steps"] == 1.0
    before = snapshot(learner)

    with monkeypatch.context() as patch:
        nan_loss(patch, learner.trainer)
        scalars = learner.step(groups)
    assert scalars["train/nonfinite_updates"] == 1.0 and scalars["train/nonfinite_step"] == 1.0
    assert scalars["train/optimizer_steps"] == 0.0 and scalars["train/skipped_step"] == 0.0
    assert math.isnan(scalars["train/loss"]) and math.isnan(scalars["train/grad_norm"])
    assert_same_state(before, snapshot(learner))
    assert all(p.grad is None for p in learner.model.parameters())

    after = learner.step(groups)  # finite again: updates
    assert after["train/nonfinite_updates"] == 0.0 and after["train/optimizer_steps"] == 1.0
    assert changed(before, learner)
    assert learner.optimizer.state_dict()["state"][0]["step"] == before["optimizer"]["state"][0]["step"] + 1


def test_grpo_infinite_advantage_is_skipped(grpo, tokenizer, monkeypatch):
    """An inf reward is masked by design (a missing reward); an inf advantage reaching the loss is not."""
    learner = grpo()
    groups = groups_for(learner.model, tokenizer)
    learner.step(groups)
    before = snapshot(learner)
    original = learner.build_inputs

    def poisoned(batch, **kwargs):
        inputs = original(batch, **kwargs)
        inputs["advantages"] = inputs["advantages"].clone()
        inputs["advantages"][0] = float("inf")
        return inputs

    monkeypatch.setattr(learner, "build_inputs", poisoned)
    scalars = learner.step(groups)
    assert scalars["train/nonfinite_updates"] == 1.0 and scalars["train/nonfinite_step"] == 1.0
    assert_same_state(before, snapshot(learner))


def test_grpo_counts_each_skipped_update_of_a_batch(grpo, tokenizer, monkeypatch):
    """num_iterations 2 x steps_per_generation 2: the third update alone goes NaN."""
    learner = grpo(num_iterations=2, steps_per_generation=2)
    groups = groups_for(learner.model, tokenizer)
    original, calls = learner.trainer.compute_loss, []

    def third_is_nan(model, inputs):
        calls.append(1)
        loss = original(model, inputs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(learner.trainer, "compute_loss", third_is_nan)
    scalars = learner.step(groups)
    assert scalars["train/nonfinite_updates"] == 1.0 and scalars["train/nonfinite_step"] == 0.0
    assert scalars["train/optimizer_steps"] == 3.0 and math.isfinite(scalars["train/loss"])


# ----------------------------------------------------------------------------- PPO


def test_ppo_nan_loss_skips_policy_and_value_updates_then_recovers(tmp_path, make_tiny_model, tokenizer,
                                                                   monkeypatch):
    learner = PPOLearner(make_tiny_model(1), tokenizer, PPOSettings(learning_rate=1e-2, num_ppo_epochs=2),
                         str(tmp_path / "trl"))
    groups = groups_for(learner.model, tokenizer)
    first = learner.step(groups)
    assert first["train/nonfinite_updates"] == 0.0 and first["train/optimizer_steps"] == 2.0
    before = snapshot(learner, learner.value_head)
    original = learner.loss_terms

    def nan_terms(batch):
        terms = original(batch)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    with monkeypatch.context() as patch:
        patch.setattr(learner, "loss_terms", nan_terms)
        scalars = learner.step(groups)
    assert scalars["train/nonfinite_updates"] == 2.0 and scalars["train/nonfinite_step"] == 1.0
    assert scalars["train/optimizer_steps"] == 0.0 and scalars["train/skipped_step"] == 0.0
    assert math.isnan(scalars["train/loss"])
    assert_same_state(before, snapshot(learner, learner.value_head))  # value head included

    after = learner.step(groups)
    assert after["train/nonfinite_updates"] == 0.0 and after["train/optimizer_steps"] == 2.0
    assert changed(before, learner)


# ----------------------------------------------------------------------------- online DPO and PRIME


def test_online_dpo_nan_loss_is_skipped(tmp_path, make_tiny_model, tokenizer, monkeypatch):
    from rlpost.learners.online_dpo import OnlineDPOLearner, OnlineDPOSettings

    learner = OnlineDPOLearner(make_tiny_model(0), tokenizer, make_tiny_model(1), OnlineDPOSettings(),
                               output_dir=str(tmp_path / "trl"))
    groups = groups_for(learner.model, tokenizer)
    assert learner.step(groups)["train/optimizer_steps"] == 1.0
    before = snapshot(learner)
    nan_loss(monkeypatch, learner.trainer)
    scalars = learner.step(groups)
    assert scalars["train/nonfinite_updates"] == 1.0 and scalars["train/nonfinite_step"] == 1.0
    assert scalars["train/optimizer_steps"] == 0.0
    assert_same_state(before, snapshot(learner))


def test_prime_counts_the_prm_and_the_policy(tmp_path, make_tiny_model, tokenizer, monkeypatch):
    import rlpost.learners.prime as prime_module
    from rlpost.learners.prime import PrimeLearner, PrimeSettings

    start = make_tiny_model(1)
    learner = PrimeLearner(copy.deepcopy(start), tokenizer, LearnerSettings(learning_rate=1e-2), PrimeSettings(),
                           str(tmp_path / "trl"), 3, prm_model=copy.deepcopy(start),
                           prm_reference=copy.deepcopy(start))
    groups = groups_for(learner.model, tokenizer)
    learner.step(groups)
    prm_before = {k: p.detach().clone() for k, p in learner.prm.named_parameters()}
    prm_state = copy.deepcopy(learner.prm_optimizer.state_dict())
    original = prime_module.outcome_loss_from_log_ratios
    monkeypatch.setattr(prime_module, "outcome_loss_from_log_ratios",
                        lambda *a, **k: original(*a, **k) * float("nan"))
    scalars = learner.step(groups)  # the PRM goes NaN, the policy stays finite
    assert scalars["train/prm_nonfinite_updates"] == 1.0 and scalars["train/nonfinite_updates"] == 1.0
    assert scalars["train/nonfinite_step"] == 0.0 and scalars["train/optimizer_steps"] == 1.0
    assert all(torch.equal(prm_before[k], p) for k, p in learner.prm.named_parameters())
    assert str(learner.prm_optimizer.state_dict()) == str(prm_state)
    nan_loss(monkeypatch, learner.trainer)  # now both
    scalars = learner.step(groups)
    assert scalars["train/nonfinite_updates"] == 2.0 and scalars["train/nonfinite_step"] == 1.0


# ----------------------------------------------------------------------------- NonFiniteStreak

BAD = {"train/nonfinite_step": 1.0, "train/nonfinite_updates": 1.0, "train/optimizer_steps": 0.0}
GOOD = {"train/nonfinite_step": 0.0, "train/nonfinite_updates": 0.0, "train/optimizer_steps": 1.0}
NOTHING = {"train/nonfinite_step": 0.0, "train/nonfinite_updates": 0.0, "train/optimizer_steps": 0.0,
           "train/skipped_step": 1.0}


def test_streak_raises_on_the_third_non_finite_step_in_a_row():
    streak = NonFiniteStreak(max_in_a_row=3)
    streak.update(7, BAD)
    streak.update(8, BAD)
    with pytest.raises(NonFiniteLossError) as raised:
        streak.update(9, BAD)
    message = str(raised.value)
    assert isinstance(raised.value, RuntimeError)
    assert "(7, 8, 9)" in message and "before step 7" in message
    for advice in ("learning rate", "rewards", "checkpoint"):
        assert advice in message


def test_streak_is_broken_by_a_finite_step_and_not_by_a_step_without_updates():
    streak = NonFiniteStreak()
    for step, scalars in enumerate([BAD, BAD, GOOD, BAD, BAD, GOOD, BAD], start=1):
        streak.update(step, scalars)  # never three in a row
    assert streak.steps == [7]
    streak = NonFiniteStreak()
    streak.update(1, BAD)
    streak.update(2, NOTHING)  # no trainable sample: neither extends nor breaks the run
    streak.update(3, BAD)
    with pytest.raises(NonFiniteLossError, match=r"\(1, 3, 4\)"):
        streak.update(4, BAD)


def test_streak_of_one_and_a_bad_setting():
    with pytest.raises(NonFiniteLossError):
        NonFiniteStreak(max_in_a_row=1).update(1, BAD)
    with pytest.raises(ValueError):
        NonFiniteStreak(max_in_a_row=0)
    NonFiniteStreak().update(1, {})  # a learner reporting neither key: finite
