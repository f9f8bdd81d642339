"""GRPOLearner: KL to a frozen reference (beta > 0), dropout switched off, and masked (failed) rewards.

KL check by hand. With d_t = log pi_ref(y_t) - log pi_theta(y_t) from unpadded forward passes of the
reference and of the policy (independent of TRL), TRL's per-token KL is k3_t = exp(d_t) - d_t - 1, so
  - TRL's logged `kl` is the token mean  sum_t k3_t / #tokens over the batch, and
  - loss(beta) - loss(0) = beta * KL aggregated like the loss: for loss_type "grpo" the mean over
    completions of each completion's token mean, for "bnpo" the token mean over the batch
(the policy term is the same in both losses: same weights, same batch).

Masked rewards by hand. Group [1, None, 0, 0]: the valid subgroup [1, 0, 0] has mean 1/3, centred
[2/3, -1/3, -1/3], unbiased variance (4/9 + 1/9 + 1/9) / 2 = 1/3, std 0.57735, so
A = [1.15450, 0, -0.57725, -0.57725] (eps = 1e-4); read as 0 the None would give [1, 0, 0, 0]: mean 1/4,
centred [3/4, -1/4, -1/4, -1/4], variance (9/16 + 3/16) / 3 = 1/4, std 1/2 -> A = [1.4997, -0.4999 x 3].
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

from rlpost.learners.grpo import GRPOLearner, LearnerSettings, disable_dropout
from tests.test_grpo_learner import make_group, own_logprobs

BETA = 0.1


def k3(ref: list[float], pol: list[float]) -> list[float]:
    return [math.exp(r - p) - (r - p) - 1 for r, p in zip(ref, pol)]


def on_policy_groups(model, tokenizer):
    return [
        make_group(model, tokenizer, "12+3=", ["51", "5"], [1.0, 0.0]),
        make_group(model, tokenizer, "7+8=", ["5", "511"], [0.0, 1.0]),
    ]


# --- 1. KL to the reference -------------------------------------------------------------------------


def test_beta_without_reference_model_is_a_clear_error(tmp_path, make_tiny_model, tokenizer):
    with pytest.raises(ValueError, match="reference_model"):
        GRPOLearner(make_tiny_model(1), tokenizer, LearnerSettings(beta=BETA), str(tmp_path), 2)
    model = make_tiny_model(1)
    with pytest.raises(ValueError, match="separate"):
        GRPOLearner(model, tokenizer, LearnerSettings(beta=BETA), str(tmp_path), 2, reference_model=model)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_kl_term_equals_hand_computed_k3_against_a_frozen_reference(tmp_path, make_tiny_model, tokenizer, loss_type):
    policy = make_tiny_model(1)
    reference = copy.deepcopy(policy)  # the stage's starting policy
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    learner = GRPOLearner(policy, tokenizer, LearnerSettings(beta=BETA, learning_rate=1e-2, loss_type=loss_type),
                          str(tmp_path / "kl"), 2, reference_model=reference)
    assert not any(p.requires_grad for p in reference.parameters())

    first = learner.step(on_policy_groups(policy, tokenizer))
    assert first["train/kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference before the first update
    learner.step(on_policy_groups(policy, tokenizer))
    for key, value in reference.state_dict().items():  # the reference never moves
        assert torch.equal(value, ref_before[key]), key

    groups = on_policy_groups(policy, tokenizer)
    per_completion = [
        k3(own_logprobs(reference, g.prompt_ids, ids), own_logprobs(policy, g.prompt_ids, ids))
        for g in groups for ids in g.completion_ids
    ]
    tokens = [v for row in per_completion for v in row]
    token_mean = sum(tokens) / len(tokens)
    completion_mean = sum(sum(row) / len(row) for row in per_completion) / len(per_completion)
    assert token_mean > 1e-4  # the policy has moved away from the reference: a real test

    # the same weights without the KL term
    twin = make_tiny_model(1)
    twin.load_state_dict(policy.state_dict())
    plain = GRPOLearner(twin, tokenizer, LearnerSettings(beta=0.0, learning_rate=1e-2, loss_type=loss_type),
                        str(tmp_path / "plain"), 2)
    without = plain.step(groups)
    with_kl = learner.step(groups)

    assert with_kl["train/kl"] == pytest.approx(token_mean, rel=1e-4, abs=1e-8)
    aggregated = completion_mean if loss_type == "grpo" else token_mean
    assert with_kl["train/loss"] - without["train/loss"] == pytest.approx(BETA * aggregated, rel=1e-3, abs=1e-8)
    assert "train/kl" not in without


def test_build_inputs_carries_reference_logprobs(tmp_path, make_tiny_model, tokenizer):
    policy, reference = make_tiny_model(1), make_tiny_model(2)  # a different reference: KL > 0 at once
    learner = GRPOLearner(policy, tokenizer, LearnerSettings(beta=BETA), str(tmp_path), 2, reference_model=reference)
    groups = on_policy_groups(policy, tokenizer)
    inputs = learner.build_inputs(groups)
    mask = inputs["completion_mask"].bool()
    expected = [own_logprobs(reference, g.prompt_ids, ids) for g in groups for ids in g.completion_ids]
    for row, values in enumerate(expected):
        assert inputs["ref_per_token_logps"][row][mask[row]].tolist() == pytest.approx(values, abs=1e-5)
    assert not inputs["ref_per_token_logps"].requires_grad


def test_trl_surface_the_learner_relies_on_is_still_there():
    """Pins the TRL internals used by rlpost/learners/grpo.py; a TRL upgrade that moves them fails here."""
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model  # noqa: F401

    assert callable(GRPOTrainer._get_per_token_logps_and_entropies)
    # the learner's forward (GRPOLearner._per_token_logps) replaces this method on the trainer instance
    assert "self._get_per_token_logps_and_entropies(" in inspect.getsource(GRPOTrainer._compute_loss)
    loss_source = inspect.getsource(GRPOTrainer._compute_loss)
    assert "self.beta" in loss_source, "TRL's loss no longer reads trainer.beta (the learner sets it after init)"
    assert 'inputs["ref_per_token_logps"]' in loss_source
    assert 'self._metrics[mode]["kl"]' in loss_source
    init_source = inspect.getsource(GRPOTrainer.__init__)
    assert "self._metrics = " in init_source
    assert "add_fused_lm_head" in init_source and "self.ref_model" in init_source

    # several steps per batch, GSPO, asymmetric clip, loss types (tests/test_grpo_family.py)
    from rlpost.learners.grpo import LOSS_TYPES

    assert 'inputs["old_per_token_logps"]' in loss_source or 'inputs.get("old_per_token_logps")' in loss_source
    assert 'per_token_loss * inputs["importance_sampling_ratio"]' in loss_source  # the sampler weights
    assert "self.use_vllm and self.vllm_importance_sampling_correction" in loss_source  # set after __init__
    assert "self.importance_sampling_level" in loss_source and "self.epsilon_high" in loss_source
    assert "self.args.steps_per_generation" in loss_source  # the "dapo"/"cispo" per-mini-batch normaliser
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert f'self._metrics[mode]["{key}"]' in loss_source
    for loss_type in LOSS_TYPES:
        assert f'"{loss_type}"' in loss_source, f"TRL's loss no longer implements {loss_type!r}"
    # TRL's loss_type x importance_sampling_level rules, which rlpost enforces at recipe load time
    assert ('args.importance_sampling_level == "sequence" and args.loss_type in ["bnpo", "dr_grpo", "dapo", '
            '"cispo"]') in init_source
    assert 'args.loss_type == "luspo" and args.importance_sampling_level != "sequence"' in init_source


@pytest.mark.parametrize("settings", [dict(loss_type="grpo"), dict(loss_type="dapo", beta=BETA),
                                      dict(loss_type="grpo", importance_sampling_level="sequence")],
                         ids=["grpo", "dapo+kl", "gspo"])
def test_one_step_per_batch_takes_pi_old_from_the_loss_forward_with_the_same_update(
        tmp_path, make_tiny_model, tokenizer, settings):
    """With one optimiser step per batch the learner skips the separate pi_old forward and fills
    `old_per_token_logps` and the sampler weights in from TRL's own forward
    (`GRPOLearner._single_forward_loss`, leaning on the order of TRL's `_compute_loss`): the update,
    loss and weight statistics equal the two-forward path's (forced here by calling `build_inputs`
    with pi_old and TRL's loss directly). Sampling logprobs are perturbed so the weights vary and
    some are capped."""
    from rlpost.learners.grpo import split_by_groups
    from rlpost.learners.update import apply_update

    def make():
        policy = make_tiny_model(1)
        reference = copy.deepcopy(policy) if settings.get("beta") else None
        return GRPOLearner(policy, tokenizer, LearnerSettings(learning_rate=1e-2, importance_cap=1.5, **settings),
                           str(tmp_path / "trl"), 2, reference_model=reference)

    single, double = make(), make()
    groups = on_policy_groups(single.model, tokenizer)
    for g in groups:
        g.sampling_logprobs = [[lp + (0.7 if t % 2 else -0.6) for t, lp in enumerate(row)] for row in g.sampling_logprobs]
    forwards = []
    original = single.trainer._get_per_token_logps_and_entropies  # the learner's hook (GRPOLearner._per_token_logps)

    def counting(*args, **kwargs):
        forwards.append(args[0])
        return original(*args, **kwargs)

    single.trainer._get_per_token_logps_and_entropies = counting
    scalars = single.step(groups)
    # the loss's forward of the policy (+ the reference's, with a KL term); no separate pi_old forward
    assert sorted(m is single.model for m in forwards) == [False] * bool(settings.get("beta")) + [True]

    inputs = double.build_inputs(groups)
    loss = double.trainer.compute_loss(double.model, split_by_groups(inputs, 2, 1)[0])
    result = apply_update(double.model, double.optimizer, loss, double.settings.max_grad_norm)
    assert scalars["train/loss"] == pytest.approx(result.loss, rel=1e-6, abs=1e-7)
    assert scalars["train/grad_norm"] == pytest.approx(result.grad_norm, rel=1e-6)
    for (name, a), b in zip(single.model.named_parameters(), double.model.parameters()):
        assert torch.allclose(a, b, atol=1e-7), name
    weights = inputs["importance_sampling_ratio"][inputs["completion_mask"].bool()]
    assert weights.max() == pytest.approx(1.5) and weights.min() < 1  # the weights varied and the cap bound
    assert scalars["rollout/importance_weight_mean"] == pytest.approx(float(weights.mean()), rel=1e-6)


# --- 2. dropout -------------------------------------------------------------------------------------


def dropout_model(tokenizer, seed=3):
    from transformers import Qwen2ForCausalLM

    from rlpost.modeling import ModelShape, qwen2_config
    from tests.conftest import TINY_SHAPE_KW

    config = qwen2_config(tokenizer, ModelShape(**TINY_SHAPE_KW), tie_word_embeddings=True)
    config.attention_dropout = 0.5  # read by Qwen2Attention when it is built
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def test_dropout_is_disabled_so_train_mode_logprobs_are_deterministic(tmp_path, make_tiny_model, tokenizer):
    ids = torch.tensor([tokenizer("12+34=5")["input_ids"]])
    model = dropout_model(tokenizer)
    model.train()
    with torch.no_grad():  # the check can fail: with attention dropout 0.5 two passes differ
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)

    reference = dropout_model(tokenizer)
    learner = GRPOLearner(model, tokenizer, LearnerSettings(beta=BETA), str(tmp_path), 2, reference_model=reference)
    assert model.config.attention_dropout == 0.0 and reference.config.attention_dropout == 0.0
    model.train()
    reference.train()
    prompt, completion = ids[:, :6], ids[:, 6:]
    full = torch.cat([prompt, completion], 1)
    ones = torch.ones_like(full)
    runs = [learner.trainer._get_per_token_logps_and_entropies(m, full, ones, 1)[0] for m in (model, model)]
    assert torch.equal(runs[0], runs[1])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        assert torch.equal(reference(input_ids=ids).logits, reference(input_ids=ids).logits)
    # and the learner's batch logprobs equal the (deterministic) unpadded ones
    group = make_group(model, tokenizer, "12+3=", ["51", "5"], [1.0, 0.0])
    inputs = learner.build_inputs([group])
    mask = inputs["completion_mask"].bool()
    assert float((inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]).abs()[mask].max()) < 1e-5


def test_disable_dropout_covers_modules_attributes_and_configs():
    from transformers import PretrainedConfig

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.3)
            self.attention_dropout = 0.2
            self.resid_pdrop = 0.1
            self.use_dropout = True  # a flag, not a rate: left alone
            self.config = PretrainedConfig(hidden_dropout=0.4, classifier_dropout=None, hidden_size=8)

    net = Net()
    disable_dropout(net)
    assert net.drop.p == 0 and net.attention_dropout == 0.0 and net.resid_pdrop == 0.0
    assert net.use_dropout is True
    assert net.config.hidden_dropout == 0.0 and net.config.classifier_dropout is None
    assert net.config.hidden_size == 8


# --- 3. masked rewards ------------------------------------------------------------------------------


@pytest.fixture
def learner(tmp_path, make_tiny_model, tokenizer):
    return GRPOLearner(make_tiny_model(1), tokenizer, LearnerSettings(learning_rate=1e-2), str(tmp_path), 4)


def gradient(learner, groups) -> torch.Tensor:
    inputs = learner.build_inputs(groups)
    learner.model.zero_grad(set_to_none=True)
    learner.trainer.compute_loss(learner.model, inputs).backward()
    grad = torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None])
    learner.model.zero_grad(set_to_none=True)
    return grad


def test_none_reward_is_masked_not_zero(learner, tokenizer):
    m = learner.model
    masked = make_group(m, tokenizer, "12+3=", ["15", "99", "14", "51"], [1.0, None, 0.0, 0.0])
    inputs = learner.build_inputs([masked])

    a_hi, a_lo = (2 / 3) / (math.sqrt(1 / 3) + 1e-4), (1 / 3) / (math.sqrt(1 / 3) + 1e-4)
    assert (a_hi, a_lo) == pytest.approx((1.15450, 0.57725), abs=1e-5)
    assert inputs["advantages"].tolist() == pytest.approx([a_hi, 0.0, -a_lo, -a_lo], abs=1e-6)
    as_zero = learner.build_inputs([make_group(m, tokenizer, "12+3=", ["15", "99", "14", "51"], [1.0, 0.0, 0.0, 0.0])])
    assert as_zero["advantages"].tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])
    assert inputs["completion_mask"][1].sum() == 0 and inputs["completion_mask"][[0, 2, 3]].all()
    assert inputs["trainable"].tolist() == [True, False, True, True]
    assert float(inputs["num_items_in_batch"]) == 9  # 3 + 3 + 3 tokens; the masked one's 3 are not counted

    # its gradient contribution is zero: its tokens do not matter at all ...
    other = make_group(m, tokenizer, "12+3=", ["15", "7*", "14", "51"], [1.0, None, 0.0, 0.0])
    g_masked, g_other = gradient(learner, [masked]), gradient(learner, [other])
    assert torch.allclose(g_masked, g_other, atol=1e-8, rtol=1e-6)
    # ... the update is that of the valid subgroup [1, 0, 0] alone (the "grpo" loss averages over the 4 rows) ...
    sub = GRPOLearner(copy.deepcopy(learner.model), tokenizer, LearnerSettings(), "unused", 3)
    valid_only = make_group(m, tokenizer, "12+3=", ["15", "14", "51"], [1.0, 0.0, 0.0])
    assert torch.allclose(g_masked, 0.75 * gradient(sub, [valid_only]), atol=1e-7, rtol=1e-4)
    # ... and differs from training on the None as a 0
    assert not torch.allclose(g_masked, gradient(learner, [make_group(m, tokenizer, "12+3=",
                                                                      ["15", "99", "14", "51"], [1.0, 0.0, 0.0, 0.0])]))

    metrics = learner.step([masked])
    assert metrics["train/masked_samples"] == 1 and metrics["train/skipped_step"] == 0
    assert metrics["train/trained_samples"] == 3 and metrics["train/completion_tokens"] == 9
    assert metrics["train/grad_norm"] > 0 and math.isfinite(metrics["train/loss"])


def test_group_with_fewer_than_two_valid_samples_contributes_nothing(learner, tokenizer):
    m = learner.model
    lonely = make_group(m, tokenizer, "7+8=", ["15", "9", "1", "51"], [1.0, None, None, None])
    fine = make_group(m, tokenizer, "12+3=", ["15", "99", "14", "51"], [1.0, 0.0, 0.0, 1.0])
    inputs = learner.build_inputs([fine, lonely])
    assert inputs["advantages"][4:].tolist() == [0.0] * 4
    assert inputs["completion_mask"][4:].sum() == 0  # not even its valid sample (no KL, no token count)
    lonely_changed = make_group(m, tokenizer, "7+8=", ["12", "9", "1", "5"], [0.0, None, None, None])
    assert torch.allclose(gradient(learner, [fine, lonely]), gradient(learner, [fine, lonely_changed]),
                          atol=1e-8, rtol=1e-6)
    metrics = learner.step([fine, lonely])
    assert metrics["train/masked_samples"] == 3 and metrics["train/masked_groups"] == 1
    assert metrics["train/trained_samples"] == 4 and metrics["train/skipped_step"] == 0


def test_batch_without_a_trainable_sample_skips_the_step(learner, tokenizer):
    m = learner.model
    groups = [
        make_group(m, tokenizer, "7+8=", ["15", "9", "1", "51"], [None, None, None, None]),
        make_group(m, tokenizer, "12+3=", ["15", "99", "14", "51"], [None, 0.5, None, None]),
    ]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    metrics = learner.step(groups)
    assert metrics["train/skipped_step"] == 1
    assert metrics["train/masked_samples"] == 7 and metrics["train/trained_samples"] == 0
    assert metrics["train/completion_tokens"] == 0 and metrics["train/samples"] == 8
    assert metrics["train/loss"] == 0.0 and metrics["train/grad_norm"] == 0.0
    assert not learner.optimizer.state  # no optimiser step: no moments either
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), key
    # a later normal step still trains
    after = learner.step([make_group(m, tokenizer, "12+3=", ["15", "99", "14", "51"], [1.0, 0.0, 0.0, 1.0])])
    assert after["train/skipped_step"] == 0 and after["train/grad_norm"] > 0


def test_non_finite_reward_is_masked_too(learner, tokenizer):
    group = make_group(learner.model, tokenizer, "12+3=", ["15", "99", "14", "51"], [1.0, float("nan"), 0.0, 0.0])
    assert learner.build_inputs([group])["trainable"].tolist() == [True, False, True, True]


def test_worker_reward_metrics_ignore_masked_samples():
    """A batch's reward metrics: mean over the samples that have a reward, and the count of those that
    have none; the worker passes the pool's None through to the groups (rollouts/fleet.py merges
    every chunk's groups into these metrics)."""
    from types import SimpleNamespace

    from rollouts.engine import Generation
    from rollouts.worker import _generate_chunk, reward_metrics

    assert reward_metrics([1.0, None, 0.0, 0.5]) == {"rollout/reward_mean": 0.5, "rollout/masked_samples": 1.0}
    empty = reward_metrics([None, None])
    assert math.isnan(empty["rollout/reward_mean"]) and empty["rollout/masked_samples"] == 2.0

    class Prompts:
        def get(self, i):
            return f"{i}+1=", {"answer": str(i + 1)}

    class Engine:
        def generate(self, prompt_ids, n, temperature, max_tokens):
            return [[Generation((5, 6), (-0.1, -0.2), "ab", "stop") for _ in range(n)] for _ in prompt_ids]

    class Pool:
        def score(self, prompts, texts, token_ids, columns):
            return SimpleNamespace(total=[1.0, None, None, 0.0])

        def stats(self):
            return {"reward/samples": 4.0}

    class Format:
        def token_ids(self, tokenizer, row):
            return [1, 2]

    spec = SimpleNamespace(prompts=Prompts(), prompt_format=Format(), rewards=[], group_size=2, groups_per_batch=2,
                           temperature=1.0, max_tokens=4, max_staleness=0)
    groups, metrics = _generate_chunk(spec, Engine(), lambda text, **kw: {"input_ids": [1, 2]}, Pool(), 0, 0, 2)
    assert [g.rewards for g in groups] == [[1.0, None], [None, 0.0]]
    assert reward_metrics([r for g in groups for r in g.rewards]) == {"rollout/reward_mean": 0.5,
                                                                     "rollout/masked_samples": 2.0}
    assert metrics["reward/samples"] == 4.0
