"""RLOO advantages (`rloo_advantages`) against hand-computed values, TRL's RLOOTrainer, and the GRPO stage seam.

Hand-computed (A_i = r_i - mean of the group's other valid rewards = k/(k-1) * (r_i - mean)):
  [1, 0, 0, 1]:        baselines [1/3, 2/3, 2/3, 1/3]      -> A = [2/3, -2/3, -2/3, 2/3]
  [3, 1]:              baselines [1, 3]                    -> A = [2, -2]
  [2, 0, 1]:           baselines [1/2, 3/2, 1]             -> A = [3/2, -3/2, 0]
  [1, masked, 0, 0]:   k = 3, baselines [0, -, 1/2, 1/2]   -> A = [1, 0, -1/2, -1/2]
  [masked, 5, masked]: k = 1, no baseline                  -> A = [0, 0, 0]
  [4, 4, 4]:           all equal                           -> A = [0, 0, 0]
"""

from __future__ import annotations

import math

import pytest
import torch

from rlpost.learners.advantages import group_advantages, rloo_advantages

NAN = float("nan")


def test_hand_computed_groups():
    a = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    assert torch.allclose(a, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]), atol=1e-7)
    assert torch.allclose(rloo_advantages(torch.tensor([3.0, 1.0]), 2), torch.tensor([2.0, -2.0]))
    assert torch.allclose(rloo_advantages(torch.tensor([2.0, 0.0, 1.0]), 3), torch.tensor([1.5, -1.5, 0.0]))
    assert torch.equal(rloo_advantages(torch.tensor([4.0, 4.0, 4.0]), 3), torch.zeros(3))


def test_several_groups_are_independent():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0, 3.0, 3.0])
    # group 2 [3, 1, 3, 3]: mean 2.5, A = 4/3 * [0.5, -1.5, 0.5, 0.5]
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 2 / 3, -2.0, 2 / 3, 2 / 3])
    assert torch.allclose(rloo_advantages(rewards, 4), expected, atol=1e-6)


def test_masked_samples_are_left_out_and_get_zero():
    rewards = torch.tensor([1.0, NAN, 0.0, 0.0, 123.0, 5.0, NAN, -7.0, 1.0, 1.0])
    valid = torch.tensor([True, False, True, True, False, True, False, False, False, False])
    a = rloo_advantages(rewards, 5, valid=valid)
    # group 1 [1, -, 0, 0, -]: k = 3; group 2 [5, -, -, -, -]: k = 1 -> all zero; NaN never leaks out
    assert torch.allclose(a, torch.tensor([1.0, 0.0, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    assert not torch.isnan(a).any()
    nothing = rloo_advantages(torch.tensor([NAN, NAN]), 2, valid=torch.tensor([False, False]))
    assert torch.equal(nothing, torch.zeros(2))


def test_leave_one_out_equals_rescaled_centring():
    """A = k/(k-1) (r - mean): the unscaled GRPO advantage times k/(k-1), with and without masking."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(6 * 5, generator=gen)
    assert torch.allclose(rloo_advantages(rewards, 5), group_advantages(rewards, 5, scale="none") * 5 / 4, atol=1e-6)
    valid = torch.rand(30, generator=gen) > 0.3
    k = valid.view(-1, 5).sum(dim=1, keepdim=True).float()
    factor = torch.where(k >= 2, k / (k - 1).clamp(min=1), torch.zeros_like(k)).expand(-1, 5).flatten()
    expected = group_advantages(rewards, 5, scale="none", valid=valid) * factor
    assert torch.allclose(rloo_advantages(rewards, 5, valid=valid), expected, atol=1e-6)


def test_integer_rewards_and_bad_shapes():
    assert torch.allclose(rloo_advantages(torch.tensor([1, 0]), 2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        rloo_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="validity mask has 3 entries for 4 rewards"):
        rloo_advantages(torch.zeros(4), 2, valid=torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------------------------- TRL RLOOTrainer

def preset_reward(prompts, completions, preset=None, **kwargs):
    """Returns the dataset column `preset` as the reward (None stays None: TRL's 'not scorable')."""
    return list(preset)


def test_same_advantages_as_trl_rloo_trainer(tmp_path, make_tiny_model, tokenizer):
    """TRL 1.16 exposes no public function for RLOO advantages: they are computed inline in the
    private `RLOOTrainer._generate_and_score_completions`. That method is driven here directly with
    TRL's defaults (`normalize_advantages=False`) except beta = 0 (TRL's default 0.05 folds a KL
    penalty into the rewards); the rewards come from a dataset column, None where not scorable."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    groups = [[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 3.0, 3.0], [1.0, None, 0.0, 0.0], [None, 5.0, None, None],
              [0.5, 0.5, 0.5, 0.5], [2.0, -1.0, None, 4.0]]
    args = RLOOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=4,
                      max_completion_length=2, beta=0.0, use_cpu=True, bf16=False, report_to=[],
                      disable_tqdm=True, logging_steps=1000)
    assert args.normalize_advantages is False  # TRL's default, which rloo_advantages follows
    trainer = RLOOTrainer(model=make_tiny_model(seed=0), reward_funcs=[preset_reward], args=args,
                          train_dataset=Dataset.from_list([{"prompt": "1+2=", "preset": 0.0}]),
                          processing_class=tokenizer)
    inputs = [{"prompt": f"{g}+{i}=", "preset": r} for g, group in enumerate(groups) for i, r in enumerate(group)]
    trl_advantages = trainer._generate_and_score_completions(inputs)["advantages"].cpu()

    flat = [r for group in groups for r in group]
    valid = torch.tensor([r is not None for r in flat])
    ours = rloo_advantages(torch.tensor([NAN if r is None else r for r in flat]), 4, valid=valid)
    assert torch.allclose(trl_advantages, ours, atol=1e-6), (trl_advantages, ours)
    assert torch.allclose(ours[8:12], torch.tensor([1.0, 0.0, -0.5, -0.5]))  # and hand-computed


# ---------------------------------------------------------------------------------- the GRPO seam

def test_learner_uses_rloo_when_selected(tmp_path, make_tiny_model, tokenizer):
    from rlpost.learners.grpo import GRPOLearner, LearnerSettings
    from rollouts.buffer import RolloutGroup

    def group(prompt, completions, rewards):
        ids = [tokenizer(c)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
        return RolloutGroup(prompt_index=0, prompt=prompt, prompt_ids=tokenizer(prompt)["input_ids"],
                            completion_ids=ids, sampling_logprobs=[[0.0] * len(i) for i in ids],
                            completions=completions, rewards=rewards, policy_version=0)

    groups = [group("12+3=", ["51", "5", "15"], [1.0, 0.0, 0.0]),
              group("7+8=", ["5", "511", "1"], [3.0, None, 1.0])]
    expected = {"rloo": [1.0, -0.5, -0.5, 2.0, 0.0, -2.0],
                "grpo": group_advantages(torch.tensor([1.0, 0, 0, 3, 0, 1]), 3,
                                         valid=torch.tensor([True] * 4 + [False, True])).tolist()}
    for estimator, values in expected.items():
        learner = GRPOLearner(make_tiny_model(seed=1), tokenizer, LearnerSettings(advantage_estimator=estimator),
                              str(tmp_path / estimator), 3)
        got = learner.build_inputs(groups)["advantages"]
        assert torch.allclose(got, torch.tensor(values), atol=1e-5), (estimator, got)


def test_stage_key_reaches_the_learner(tmp_path, monkeypatch, tokenizer):
    """`grpo.advantage_estimator=rloo` in a recipe ends up in the learner's settings; other values are refused."""
    import rlpost.loop
    import rlpost.report
    from rlpost.errors import UserError
    from rlpost.modeling import ModelShape, build_model, save_pretrained
    from rlpost.recipe import load_recipe
    from rlpost.stages import StageContext
    from rlpost.stages.grpo import run_grpo
    from rlpost.training_data import TrainingData

    with pytest.raises(UserError, match="advantage_estimator"):
        load_recipe("recipes/quickstart.yaml", ["grpo.advantage_estimator=ppo"])
    recipe = load_recipe("recipes/quickstart.yaml", ["grpo.advantage_estimator=rloo"])
    assert recipe.grpo.advantage_estimator == "rloo"
    assert load_recipe("recipes/quickstart.yaml").grpo.advantage_estimator == "grpo"
    policy = save_pretrained(build_model(tokenizer, ModelShape(32, 1, 2, 1, 64)), tokenizer, tmp_path / "policy")
    seen = {}

    def fake_run_rl(policy_in, out_dir, tok, worker, settings, evaluate, progress=None, learner_factory=None,
                    dist=None):
        seen["learner"] = settings.learner
        return {}

    monkeypatch.setattr(rlpost.loop, "run_rl", fake_run_rl)
    monkeypatch.setattr(rlpost.report, "rl_stage_figures", lambda out_dir, figures: {})
    ctx = StageContext(recipe, "grpo", policy, tmp_path / "out", TrainingData(recipe.data, recipe.seed), "cpu")
    run_grpo(recipe.grpo, ctx)
    assert seen["learner"].advantage_estimator == "rloo"
    assert not math.isnan(seen["learner"].learning_rate)
