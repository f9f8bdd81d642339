"""LoRA (peft) for every stage: the recipe section, wrapping a policy, and the two ways vLLM gets it.

A stage with a `lora:` section trains low-rank adapters instead of all weights (Hu et al. 2021):
each targeted linear layer W (d_out x d_in) computes

    h = W x + (alpha / r) * B A x,     A: r x d_in (random init), B: d_out x r (zeros at init)

so the policy starts exactly at the stage's input and only A, B train. Everything else in the stage
is unchanged: the learners get a peft `PeftModel` (TRL's losses run on it as on any causal LM), the
reference is still a separate frozen copy of the stage's input.

How the rollout engine follows the learner (`sync`):
- `adapter`: the learner publishes only the adapter (peft's adapter_model.safetensors + its config);
  the vLLM engine runs with `enable_lora` and switches to the new adapter by `LLMEngine.add_lora`
  (`rollouts.engine.RolloutEngine.load_adapter`). Bytes per sync: the adapter's, not the model's.
- `merged`: the learner publishes full weights W + (alpha / r) B A (`rollouts.weight_sync.merged_state_dict`,
  computed without touching the trained model) and the engine reloads them as for full fine-tuning.
- `auto` (default): `adapter` when the engine starts with LoRA enabled, `merged` when it cannot
  (vLLM has no LoRA support for the architecture or backend). The run logs which it used and the
  stage record says so (`lora_sync`).

Outputs: RUN/<stage>/policy holds the merged model (so the next stage, evaluation and `rlpost eval`
read an ordinary model directory) and RUN/<stage>/adapter the adapter alone. Checkpoints hold the
adapter; a resume wraps the stage's input again and loads it (`rlpost.checkpoint.load_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlpost.config import setting

SYNC_MODES = ("auto", "adapter", "merged")


@dataclass
class LoraSection:
    r: int = setting(8, "peft LoraConfig.r: adapter rank")
    alpha: float = setting(16.0, "peft LoraConfig.lora_alpha: the update is scaled by alpha / r")
    dropout: float = setting(0.0, "peft LoraConfig.lora_dropout (RL stages switch dropout off regardless)")
    target_modules: list = setting(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                   "peft LoraConfig.target_modules: names of the linear layers to adapt")
    sync: str = setting("auto", "how vLLM follows the learner: 'adapter' (vLLM LoRA, adapter-only sync), 'merged' "
                                "(full merged weights), 'auto' (adapter when the engine supports LoRA); rollout stages only",
                        choices=SYNC_MODES)


def check_lora(lora: LoraSection | None, fail) -> None:
    """Load-time checks; `fail(key, message)` builds the UserError naming the key."""
    if lora is None:
        return
    if lora.r < 1:
        fail("lora.r", f"must be >= 1, got {lora.r}")
    if lora.alpha <= 0:
        fail("lora.alpha", f"must be > 0, got {lora.alpha}")
    if not 0 <= lora.dropout < 1:
        fail("lora.dropout", f"must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        fail("lora.target_modules", "must name at least one linear layer, e.g. [q_proj, v_proj]")


def peft_config(lora: LoraSection):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")


def wrap(model, lora: LoraSection):
    """`model` with fresh adapters (B = 0: the same function as `model`); only adapters train."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(lora))


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def load_adapter_weights(model, adapter_dir: Path) -> None:
    """Set `model`'s adapter weights to those saved in `adapter_dir` (peft's file), checking they match."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise RuntimeError(f"{adapter_dir} holds adapter weights this model has no place for: "
                           f"{result.unexpected_keys[:5]}")


def save_policy(model, tokenizer, policy_dir: Path) -> None:
    """A stage's output policy: an ordinary model directory. For a LoRA model, the merged weights there
    and the adapter alone beside it (`policy_dir/../adapter`); the model is merged in place."""
    policy_dir = Path(policy_dir)
    if is_peft(model):
        model.save_pretrained(str(policy_dir.parent / "adapter"), safe_serialization=True)  # peft: the adapter
        model = model.merge_and_unload()
    model.save_pretrained(str(policy_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(policy_dir))


def maybe_wrap(model, lora: LoraSection | None):
    """`wrap(model, lora)`, or `model` itself for full fine-tuning (lora None)."""
    return model if lora is None else wrap(model, lora)
