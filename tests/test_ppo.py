"""PPOLearner and the ppo stage on a tiny local model: TRL's loss fed per-token advantages, the
clipped value loss, the value model's gradients and checkpoints, masked samples, recipe keys, and
(slow) the quickstart recipe with a ppo stage instead of grpo.

Hand computations (module docstring of rlpost/learners/ppo.py). On a batch whose tensors the test
sets itself: pi_theta's logprobs come from unpadded forward passes (`own_logprobs`), and pi_old is
set to log pi_theta - log rho for chosen ratios rho, so TRL sees exactly those ratios. With m the
completion mask, A the per-token advantages, w the sampler weights, eps = 0.2:

    policy loss (TRL "bnpo") = sum m * (-min(rho A, clip(rho, 0.8, 1.2) A)) * w / sum m
    value loss               = 0.5 * sum m * max((V - R)^2, (clip(V, V_old - 0.2, V_old + 0.2) - R)^2) / sum m

The value head is set to w = 0, b = 0.5, so V = 0.5 on every token whatever the network computes.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import rlpost.stages
from rlpost.errors import UserError
from rlpost.learners.ppo import PPOLearner, PPOSettings
from rlpost.stages.ppo import PPOStage, check_ppo, run_ppo
from tests.test_grpo_learner import make_group, own_logprobs

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

# 11 completion tokens: "51"+eos (3), "5"+eos (2) | "5"+eos (2), "511"+eos (4); T = 4
MASK = [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
RATIOS = [[1.5, 0.7, 1.1, 1.0], [0.5, 1.3, 1.0, 1.0], [1.25, 0.9, 1.0, 1.0], [0.95, 1.05, 2.0, 0.6]]
ADVANTAGES = [[1.0, -1.0, 0.5, 0.0], [-2.0, 0.3, 0.0, 0.0], [1.0, -0.5, 0.0, 0.0], [-1.0, 1.0, 1.0, -1.0]]
WEIGHTS = [[1.0, 0.8, 1.0, 0.0], [1.2, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.5, 1.0, 1.0, 2.0]]
VALUES_OLD = [[0.0, 0.4, 0.5, 0.0], [0.0, 0.9, 0.0, 0.0], [1.0, 0.45, 0.0, 0.0], [0.2, 0.2, 0.8, 0.6]]
RETURNS = [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 2.0, 0.0, 0.0], [0.3, 1.0, 0.5, 0.5]]


@pytest.fixture
def learner_for(tmp_path, make_tiny_model, tokenizer):
    def make(seed: int = 1, reference=None, separate: bool = False, **settings) -> PPOLearner:
        backbone = None
        if separate:
            settings["value_model"] = "separate"
            backbone = starting_backbone(tmp_path, make_tiny_model, tokenizer, seed)
        return PPOLearner(make_tiny_model(seed), tokenizer, PPOSettings(**settings), str(tmp_path / "trl"),
                          reference_model=reference, value_backbone=backbone)

    return make


def starting_backbone(tmp_path, make_tiny_model, tokenizer, seed):
    """As run_ppo loads it: `AutoModel` (no LM head) from the starting policy's directory."""
    from transformers import AutoModel

    from rlpost.modeling import save_pretrained

    directory = tmp_path / f"start-{seed}"
    if not (directory / "config.json").exists():
        save_pretrained(make_tiny_model(seed), tokenizer, directory)
    return AutoModel.from_pretrained(directory)


def groups_of(model, tokenizer, second=(0.0, 1.0)):
    return [make_group(model, tokenizer, "12+3=", ["51", "5"], [1.0, 0.0]),
            make_group(model, tokenizer, "7+8=", ["5", "511"], list(second))]


def rows(groups):
    return [(g.prompt_ids, ids) for g in groups for ids in g.completion_ids]


def padded_logps(model, groups, width=4) -> torch.Tensor:
    out = torch.zeros(sum(g.size for g in groups), width)
    for i, (prompt, completion) in enumerate(rows(groups)):
        lp = own_logprobs(model, prompt, completion)
        out[i, : len(lp)] = torch.tensor(lp)
    return out


def hand_batch(learner, tokenizer):
    """build_inputs' batch with the ratios, advantages, weights, old values and returns above."""
    groups = groups_of(learner.model, tokenizer)
    batch = learner.build_inputs(groups)
    assert batch["completion_mask"].tolist() == MASK
    theta = padded_logps(learner.model, groups)
    batch["old_per_token_logps"] = theta - torch.log(torch.tensor(RATIOS))
    batch["advantages"] = torch.tensor(ADVANTAGES)
    batch["importance_sampling_ratio"] = torch.tensor(WEIGHTS)
    batch["values_old"] = torch.tensor(VALUES_OLD)
    batch["returns"] = torch.tensor(RETURNS)
    with torch.no_grad():
        learner.value_head.weight.zero_()
        learner.value_head.bias.fill_(0.5)
    return batch


def hand_policy_loss(eps=0.2):
    total, count = 0.0, 0
    for m_row, r_row, a_row, w_row in zip(MASK, RATIOS, ADVANTAGES, WEIGHTS):
        for m, r, a, w in zip(m_row, r_row, a_row, w_row):
            if m:
                total += -min(r * a, min(max(r, 1 - eps), 1 + eps) * a) * w
                count += 1
    return total / count


def hand_value_loss(v=0.5, c=0.2):
    total, clipped, count = 0.0, 0, 0
    for m_row, o_row, r_row in zip(MASK, VALUES_OLD, RETURNS):
        for m, old, ret in zip(m_row, o_row, r_row):
            if m:
                v_clip = min(max(v, old - c), old + c)
                total += max((v - ret) ** 2, (v_clip - ret) ** 2)
                clipped += (v_clip - ret) ** 2 > (v - ret) ** 2
                count += 1
    return 0.5 * total / count, clipped / count


# --------------------------------------------------------------------------- TRL's loss, pinned

def test_trl_compute_loss_takes_per_token_advantages():
    """The private behaviour this learner relies on: TRL 1.16's `_compute_loss` unsqueezes only 1-D
    advantages, so (B, T) advantages are used per token."""
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._compute_loss)
    assert "if advantages.dim() == 1:" in source and "advantages = advantages.unsqueeze(1)" in source
    for private in ("_get_per_token_logps_and_entropies", "_metrics"):
        assert private in inspect.getsource(GRPOTrainer)


def test_per_sequence_advantages_equal_their_per_token_broadcast(learner_for, tokenizer):
    learner = learner_for()
    batch = learner.build_inputs(groups_of(learner.model, tokenizer))
    seq = torch.tensor([1.0, -0.5, 0.25, -2.0])
    one = dict(batch, advantages=seq)
    two = dict(batch, advantages=seq[:, None].expand(-1, 4).contiguous())
    a, b = learner.trainer.compute_loss(learner.model, one), learner.trainer.compute_loss(learner.model, two)
    assert float(a) == pytest.approx(float(b), abs=1e-7)


def test_clipped_policy_and_value_losses_match_hand_computation(learner_for, tokenizer):
    learner = learner_for(vf_coef=0.3)
    batch = hand_batch(learner, tokenizer)
    learner.trainer._metrics["train"].clear()
    terms = learner.loss_terms(batch)
    policy, (value, clipfrac) = hand_policy_loss(), hand_value_loss()
    assert float(terms["policy_loss"]) == pytest.approx(policy, abs=1e-5)
    assert float(terms["value_loss"]) == pytest.approx(value, abs=1e-6)
    assert float(terms["value_clipfrac"]) == pytest.approx(clipfrac, abs=1e-6)
    assert 0 < clipfrac < 1  # both branches of the max occur
    assert float(terms["loss"]) == pytest.approx(policy + 0.3 * value, abs=1e-5)
    assert torch.allclose(terms["values"], torch.full((4, 4), 0.5))
    logr2 = [math.log(r) ** 2 for mr, rr in zip(MASK, RATIOS) for m, r in zip(mr, rr) if m]
    assert float(terms["approx_kl"]) == pytest.approx(0.5 * sum(logr2) / 11, abs=1e-5)
    # TRL's clip counts: low = rho < 0.8 and A < 0 (0.7, 0.5, 0.6), high = rho > 1.2 and A > 0 (1.5, 1.3, 1.25, 2.0)
    metrics = learner.trainer._metrics["train"]
    assert metrics["clip_ratio/low_mean"][-1] == pytest.approx(3 / 11, abs=1e-6)
    assert metrics["clip_ratio/high_mean"][-1] == pytest.approx(4 / 11, abs=1e-6)
    assert metrics["clip_ratio/region_mean"][-1] == pytest.approx(7 / 11, abs=1e-6)


# --------------------------------------------------------------------------- the value model

@pytest.mark.parametrize("separate", [False, True])
def test_values_are_read_where_each_token_is_predicted(learner_for, tokenizer, separate):
    """V_t = w . h_{p + t - 1} + b with h the backbone's last hidden state of the unpadded sequence,
    p the prompt length: the state before token t."""
    learner = learner_for(separate=separate)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        learner.value_head.weight.copy_(torch.randn(learner.value_head.weight.shape, generator=gen))
        learner.value_head.bias.fill_(0.25)
    groups = groups_of(learner.model, tokenizer)
    values = learner.build_inputs(groups)["values_old"]
    backbone = learner.value_backbone if separate else learner.model.base_model
    for i, (prompt, completion) in enumerate(rows(groups)):
        with torch.no_grad():
            hidden = backbone(input_ids=torch.tensor([prompt + completion])).last_hidden_state[0]
            expected = learner.value_head(hidden[len(prompt) - 1: len(prompt) + len(completion) - 1]).squeeze(-1)
        assert torch.allclose(values[i, : len(completion)], expected, atol=1e-5)
        assert torch.all(values[i, len(completion):] == 0)


def test_value_head_starts_at_zero_and_its_loss_reaches_the_shared_backbone(learner_for, tokenizer):
    learner = learner_for()
    assert torch.all(learner.value_head.weight == 0) and torch.all(learner.value_head.bias == 0)
    batch = hand_batch(learner, tokenizer)
    with torch.no_grad():
        learner.value_head.weight.fill_(0.1)
    learner.loss_terms(batch)["value_loss"].backward()
    grads = [p.grad for p in learner.model.base_model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    groups = learner.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["params"] == list(learner.value_head.parameters())


def test_separate_value_model_shares_nothing_with_the_policy(learner_for, tokenizer):
    learner = learner_for(separate=True, learning_rate=1e-4, vf_lr=3e-3)
    policy = {p.data_ptr() for p in learner.model.parameters()}
    assert not any(p.data_ptr() in policy for p in learner.value_backbone.parameters())
    batch = hand_batch(learner, tokenizer)
    with torch.no_grad():
        learner.value_head.weight.fill_(0.1)
    learner.loss_terms(batch)["value_loss"].backward()
    assert all(p.grad is None for p in learner.model.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in learner.value_backbone.parameters())
    lr = [g["lr"] for g in learner.optimizer.param_groups]
    assert lr == [1e-4, 3e-3] and len(learner.optimizer.param_groups[1]["params"]) == 2 + len(
        list(learner.value_backbone.parameters()))


@pytest.mark.parametrize("separate", [False, True])
def test_value_loss_decreases_on_a_fixed_batch(learner_for, tokenizer, separate):
    """gamma = lam = 1, no KL: the returns are the outcome rewards whatever V is, a fixed target. One
    completion per prompt, so no two tokens share a state with different targets and V can fit them
    (PPO needs no groups). V starts at 0: the first loss is 0.5 * (3 * 1^2 + 4 * 0.5^2) / 7 = 0.2857
    before the update (the reported value is the mean over the batch's 2 steps)."""
    learner = learner_for(separate=separate, gamma=1.0, lam=1.0, learning_rate=1e-5, vf_lr=1e-2,
                          num_ppo_epochs=2)
    model = learner.model
    groups = [make_group(model, tokenizer, "12+3=", ["51"], [1.0]), make_group(model, tokenizer, "7+8=", ["511"], [0.5])]
    assert float(learner.loss_terms(learner.build_inputs(groups))["value_loss"]) == pytest.approx(2 / 7, abs=1e-6)
    losses = [learner.step(groups)["train/value_loss"] for _ in range(6)]
    assert losses[-1] < 0.3 * losses[0], losses
    metrics = learner.step(groups)
    assert metrics["train/optimizer_steps"] == 2 and metrics["train/explained_variance"] > 0
    assert all(math.isfinite(v) for k, v in metrics.items() if k != "rollout/logprob_mismatch_max")


@pytest.mark.parametrize("separate", [False, True])
def test_extra_state_round_trip_through_a_checkpoint(learner_for, tokenizer, tmp_path, separate):
    """As run_rl does: save_checkpoint(extra=...), then a fresh learner loads the checkpoint and
    load_extra_state; the value model and the mini-batch counter come back exactly."""
    from safetensors.torch import load_file

    from rlpost.checkpoint import RLState, load_checkpoint, save_checkpoint
    from rlpost.loop import EXTRA_STATE

    trained = learner_for(separate=separate, vf_lr=1e-2, num_mini_batches=2)
    groups = groups_of(trained.model, tokenizer)
    for _ in range(2):
        trained.step(groups)
    state = trained.extra_state()
    assert float(state["value_head.weight"].abs().sum()) > 0
    assert any(k.startswith("value_model.") for k in state) == separate
    ckpt = save_checkpoint(tmp_path / "run", trained.model, tokenizer, trained.optimizer, RLState(step=2),
                           extra={EXTRA_STATE: state})
    assert (ckpt / EXTRA_STATE).exists()

    fresh = learner_for(separate=separate, vf_lr=1e-2, num_mini_batches=2)
    load_checkpoint(ckpt, fresh.model, fresh.optimizer)
    fresh.load_extra_state(load_file(str(ckpt / EXTRA_STATE)))
    restored = fresh.extra_state()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], state[k]) for k in state)
    assert fresh.batches == trained.batches == 2
    # in place: the optimiser still updates the restored parameters
    assert fresh.optimizer.param_groups[1]["params"][0] is fresh.value_head.weight
    a, b = trained.build_inputs(groups), fresh.build_inputs(groups)
    assert torch.allclose(a["values_old"], b["values_old"], atol=1e-6)
    # and both continue identically (same weights, optimiser moments and shuffle seed)
    ma, mb = trained.step(groups), fresh.step(groups)
    assert ma["train/value_loss"] == pytest.approx(mb["train/value_loss"], abs=1e-6)
    other = learner_for(separate=not separate)
    with pytest.raises(RuntimeError, match="value model"):
        other.load_extra_state(state)


# --------------------------------------------------------------------------- masked samples

def test_a_masked_sample_gets_no_gradient(learner_for, tokenizer):
    """With "5" of the first prompt unscored (None), the loss and every gradient equal those of the
    batch without that sample: its row reaches neither loss nor their token counts; its group's other
    sample still trains (PPO needs no group baseline)."""
    learner = learner_for(kl_coef=0.0)
    with torch.no_grad():
        learner.value_head.weight.fill_(0.05)
    model = learner.model
    with_masked = [make_group(model, tokenizer, "12+3=", ["51", "5"], [1.0, None]),
                   make_group(model, tokenizer, "7+8=", ["5", "511"], [0.0, 1.0])]
    without = [make_group(model, tokenizer, "12+3=", ["51"], [1.0]),
               make_group(model, tokenizer, "7+8=", ["5", "511"], [0.0, 1.0])]

    def grads(groups):
        batch = learner.build_inputs(groups)
        learner.optimizer.zero_grad(set_to_none=True)
        terms = learner.loss_terms(batch)
        terms["loss"].backward()
        params = list(learner._parameters())
        return batch, float(terms["loss"]), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    batch, loss_a, grads_a = grads(with_masked)
    assert batch["completion_mask"][1].sum() == 0 and batch["reward_valid"].tolist() == [True, False, True, True]
    for key in ("advantages", "returns", "values_old", "rewards", "importance_sampling_ratio"):
        assert torch.all(batch[key][1] == 0), key
    _, loss_b, grads_b = grads(without)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))
    assert any(float(g.abs().sum()) > 0 for g in grads_a)


def test_an_all_masked_batch_takes_no_step(learner_for, tokenizer):
    learner = learner_for()
    before = copy.deepcopy(learner.model.state_dict())
    groups = [make_group(learner.model, tokenizer, "12+3=", ["51", "5"], [None, float("nan")])]
    metrics = learner.step(groups)
    assert metrics["train/skipped_step"] == 1 and metrics["train/optimizer_steps"] == 0
    assert metrics["train/masked_samples"] == 2
    assert all(torch.equal(v, learner.model.state_dict()[k]) for k, v in before.items())
    assert not learner.optimizer.state


# --------------------------------------------------------------------------- KL terms

def test_kl_in_the_reward_and_in_the_loss(learner_for, make_tiny_model, tokenizer):
    """kl_coef: r_t = -kl_coef (log pi_old - log pi_ref) + outcome on the last token; beta: TRL's k3 term
    (its `kl` metric) with `ref_per_token_logps` from the reference."""
    reference = make_tiny_model(2)
    learner = learner_for(reference=copy.deepcopy(reference), kl_coef=0.1, beta=0.05, whiten_advantages=False)
    groups = groups_of(learner.model, tokenizer)
    batch = learner.build_inputs(groups)
    mask = torch.tensor(MASK, dtype=torch.float32)
    kl = (padded_logps(learner.model, groups) - padded_logps(reference, groups)) * mask
    expected = -0.1 * kl
    for i, n in enumerate(mask.sum(1).long().tolist()):
        expected[i, n - 1] += [1.0, 0.0, 0.0, 1.0][i]
    assert torch.allclose(batch["rewards"], expected, atol=1e-5)
    assert torch.allclose(batch["ref_per_token_logps"] * mask, padded_logps(reference, groups) * mask, atol=1e-5)
    metrics = learner.step(groups)
    assert metrics["train/kl"] >= 0 and math.isfinite(metrics["train/kl_reward"])
    with pytest.raises(ValueError, match="reference_model"):
        learner_for(kl_coef=0.1)


# --------------------------------------------------------------------------- the stage

@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(rlpost.stages.STAGES, "ppo", rlpost.stages.StageType(PPOStage, run_ppo, check_ppo))


def write_recipe(directory: Path, sft: dict | None = None, ppo: dict | None = None, **top) -> Path:
    """recipes/quickstart.yaml's seed, model, data and eval, with stages [sft (if given), ppo]."""
    full = yaml.safe_load(QUICKSTART.read_text())
    recipe = {k: full[k] for k in ("seed", "model", "data", "eval")}
    recipe.update(top)
    stages = [] if sft is None else [{"type": "sft", **sft}]
    recipe["stages"] = stages + [{"type": "ppo", **(ppo or {})}]
    path = Path(directory) / "ppo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_recipe_with_the_stage_loads_with_its_defaults(tmp_path, registered):
    from rlpost.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, ppo={"kl_coef": 0.05}), ["ppo.value_model=separate"])
    cfg = recipe.ppo
    assert (cfg.gamma, cfg.lam, cfg.kl_coef, cfg.vf_coef, cfg.cliprange_value) == (1.0, 0.95, 0.05, 0.1, 0.2)
    assert (cfg.num_ppo_epochs, cfg.num_mini_batches, cfg.whiten_advantages, cfg.value_model) == (4, 1, True, "separate")
    assert (cfg.num_generations, cfg.vf_lr, cfg.beta) == (4, None, 0.0)


@pytest.mark.parametrize("override, message", [
    ("ppo.num_ppo_epochs=0", "'ppo.num_ppo_epochs' must be >= 1"),
    ("ppo.num_mini_batches=33", "'ppo.num_mini_batches' (33) must be at most the completions per step"),
    ("ppo.gamma=1.5", "'ppo.gamma' must be in [0, 1]"),
    ("ppo.lam=-0.1", "'ppo.lam' must be in [0, 1]"),
    ("ppo.kl_coef=-1", "'ppo.kl_coef' must be >= 0"),
    ("ppo.vf_coef=0", "'ppo.vf_coef' must be a number > 0"),
    ("ppo.cliprange_value=0", "'ppo.cliprange_value' must be a number > 0"),
    ("ppo.vf_lr=0", "'ppo.vf_lr' must be a number > 0"),
    ("ppo.temperature=0", "'ppo.temperature' must be a number > 0"),
    ("ppo.max_staleness=-1", "'ppo.max_staleness' must be >= 0"),
    ("ppo.value_model=shared", "value_model"),
    ("ppo.rewards=[no_such_reward]", "key 'ppo.rewards'"),
    ("ppo.max_completion_length=64", "leaves no room for a prompt within max_model_len 64"),
])
def test_bad_settings_are_refused_naming_the_override(tmp_path, registered, override, message):
    from rlpost.recipe import load_recipe

    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(tmp_path), [override])
    assert f"override '{override}'" in str(err.value) and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_run_ppo_passes_the_keys_to_the_learner(tmp_path, registered, monkeypatch, make_tiny_model, tokenizer):
    import rlpost.loop
    from rlpost.modeling import save_pretrained
    from rlpost.recipe import load_recipe

    class Captured(Exception):
        pass

    def run_rl(policy_dir, run_dir, tok, worker, settings, evaluate=None, progress=None, learner_factory=None,
               dist=None):
        raise Captured(worker, settings, learner_factory)

    monkeypatch.setattr(rlpost.loop, "run_rl", run_rl)
    save_pretrained(make_tiny_model(0), tokenizer, tmp_path / "policy")
    recipe = load_recipe(write_recipe(tmp_path), ["ppo.num_ppo_epochs=2", "ppo.num_mini_batches=4", "ppo.gamma=0.9",
                                                  "ppo.lam=0.8", "ppo.kl_coef=0.02", "ppo.value_model=separate",
                                                  "ppo.vf_lr=1e-3", "ppo.num_generations=1"])
    ctx = SimpleNamespace(recipe=recipe, name="ppo", policy_in=tmp_path / "policy", out_dir=tmp_path / "out",
                          data=SimpleNamespace(prompts=lambda: None, format=None), engine_settings=None,
                          device="cpu", evaluate=None, dist=None)
    with pytest.raises(Captured) as info:
        run_ppo(recipe.ppo, ctx)
    worker, settings, factory = info.value.args
    assert (worker.group_size, settings.groups_per_step) == (1, 8)
    loaded = []

    def load_reference():
        loaded.append(True)
        return make_tiny_model(0)

    learner = factory(make_tiny_model(0), tokenizer, load_reference)
    s = learner.settings
    assert isinstance(learner, PPOLearner) and loaded == [True] and learner.reference_model is not None
    assert (s.num_ppo_epochs, s.num_mini_batches, s.gamma, s.lam, s.kl_coef, s.vf_lr) == (2, 4, 0.9, 0.8, 0.02, 1e-3)
    assert learner.value_backbone is not None and learner.value_backbone.config.model_type == "qwen2"


# --------------------------------------------------------------------------- end to end

TINY_MODEL = {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
              "max_positions": 64}


@pytest.mark.slow
def test_quickstart_with_a_ppo_stage(tmp_path, registered):
    """The quickstart's model (tiny), task and held-out eval; a 1-epoch SFT on 200 demonstrations, then
    3 PPO steps (4 prompts x 4 samples, vLLM rollouts, the isolated reward pool; a length reward so
    that the rewards vary). Checkpoints keep the trained value head beside the policy, and the stage's
    record has the RL figures. ~45 s on 2 cores."""
    from safetensors.torch import load_file

    from rlpost.loop import EXTRA_STATE
    from rlpost.pipeline import run_recipe
    from rlpost.recipe import load_recipe

    run_dir = tmp_path / "run"
    full = yaml.safe_load(QUICKSTART.read_text())
    sft = {k: v for k, v in next(s for s in full["stages"] if s["type"] == "sft").items() if k != "type"}
    sft.update({"demonstrations": 200, "num_train_epochs": 1, "validation_prompts": 20})
    ppo = {"max_steps": 3, "prompts_per_step": 4, "num_generations": 4, "save_steps": 2, "eval_steps": 4,
           "reward_workers": 1, "num_ppo_epochs": 2, "num_mini_batches": 2, "max_completion_length": 6,
           # the 1-epoch SFT policy is never right; 0.1 x the length gives the value model something to fit
           "rewards": ["arithmetic_exact", {"name": "tests.reward_fixtures:length_reward", "weight": 0.1}]}
    path = write_recipe(tmp_path, sft, ppo, eval=[{"benchmark": "held_out", "limit": 40}])
    raw = yaml.safe_load(path.read_text())
    raw["model"]["build"] = TINY_MODEL
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    summary = run_recipe(load_recipe(path, [f"run_dir={run_dir}"]))

    assert summary["points"] == ["initial", "sft", "ppo"]
    record = json.loads((run_dir / "ppo" / "stage.json").read_text())
    assert record["type"] == "ppo" and record["steps"] == 3 and record["samples_trained"] == 3 * 16
    for key in ("staleness", "rl_loop_s", "engine_startup_s", "learner_samples_per_s", "logprob_mismatch_max"):
        assert record[key] is not None, key
    assert record["logprob_mismatch_max"] <= 1e-3
    checkpoints = sorted((run_dir / "ppo" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-000002", "step-000003"]
    for ckpt in checkpoints:
        extra = load_file(str(ckpt / EXTRA_STATE))
        assert extra["value_head.weight"].shape == (1, TINY_MODEL["hidden_size"])
        assert int(extra["ppo.batches"]) == int(ckpt.name.split("-")[1])
        assert float(extra["value_head.weight"].abs().sum()) > 0  # trained away from its zero start
    rows = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train/value_loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3]
    assert all(r["train/optimizer_steps"] == 4 for r in trained)
    assert all(math.isfinite(r["train/policy_loss"]) and r["train/value_loss"] > 0 for r in trained)
    assert all(r["train/reward_mean"] > 0 for r in trained)
    assert (run_dir / "ppo" / "policy" / "model.safetensors").exists()
