"""Pipeline stages: each a config dataclass (the recipe keys of `{type: NAME}`) and a `run` function.

The seam every stage implements:

    check(cfg, recipe, name) -> None       range/relation checks at load time (UserError, exit 2)
    run(cfg, ctx: StageContext) -> dict    train from ctx.policy_in, write ctx.out_dir / "policy",
                                           return the stage's record (stage.json)

A stage starts from the previous stage's output policy; the pipeline (`rlpost.pipeline`) decides
what runs, evaluates after every stage and writes the report. Add a learner by adding an entry here:
sft (SFTTrainer), grpo (async vLLM rollouts + TRL's GRPO loss; RLOO advantages as an option),
dpo (DPOTrainer on preference pairs), rejection (sample, keep the verified, SFT; repeat),
online_dpo (best vs worst sample of each rollout group, TRL's DPO loss, asynchronous like grpo),
ppo (a value head or separate value model, GAE, clipped policy and value losses, on TRL's loss),
prime (grpo's loss with per-token advantages from an implicit PRM trained online on outcome labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlpost.stages.dpo import DPOStage, check_dpo, run_dpo
from rlpost.stages.grpo import GRPOStage, check_grpo, run_grpo
from rlpost.stages.online_dpo import OnlineDPOStage, check_online_dpo, run_online_dpo
from rlpost.stages.ppo import PPOStage, check_ppo, run_ppo
from rlpost.stages.prime import PrimeStage, check_prime, run_prime
from rlpost.stages.rejection import RejectionStage, check_rejection, run_rejection
from rlpost.stages.sft import SFTStage, check_sft, run_sft_stage


@dataclass
class StageContext:
    """What a stage gets: the recipe, its own name, where to start from and where to write."""

    recipe: Any
    name: str
    policy_in: Path
    out_dir: Path
    data: Any  # rlpost.training_data.TrainingData
    device: str
    engine_settings: Any = None  # rollouts.engine.EngineSettings from the recipe's model section
    evaluate: Callable[..., dict] | None = None  # evaluate(engine, tag): the pipeline's in-stage evaluation
    dist: Any = None  # rlpost.distributed.Context: the learner ranks (None: one process)


@dataclass(frozen=True)
class StageType:
    config: type
    run: Callable[[Any, StageContext], dict]
    check: Callable[[Any, Any, str], None]


STAGES: dict[str, StageType] = {
    "sft": StageType(SFTStage, run_sft_stage, check_sft),
    "grpo": StageType(GRPOStage, run_grpo, check_grpo),
    "dpo": StageType(DPOStage, run_dpo, check_dpo),
    "rejection": StageType(RejectionStage, run_rejection, check_rejection),
    "online_dpo": StageType(OnlineDPOStage, run_online_dpo, check_online_dpo),
    "ppo": StageType(PPOStage, run_ppo, check_ppo),
    "prime": StageType(PrimeStage, run_prime, check_prime),
}
