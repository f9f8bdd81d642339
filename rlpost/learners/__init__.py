"""Learners: turn batches of scored rollouts into parameter updates with TRL's losses.

The seam between the RL loop (`rlpost.loop.run_rl`) and an update rule is `Learner`: the loop owns
rollouts, staleness, weight sync, checkpoints and the ledger; a learner owns the policy's
optimiser and whatever else its algorithm trains (a value head, say), and turns one batch of
`RolloutGroup`s into updates. A stage picks its learner by passing a `LearnerFactory` to `run_rl`.

Every optimiser step of a learner goes through `rlpost.learners.update.apply_update` (zero_grad,
backward, clip, step), which skips an update whose loss or gradient norm is NaN/inf; `step` reports
`train/nonfinite_updates` and `train/nonfinite_step`, and `NonFiniteStreak` there stops a run after
several non-finite steps in a row.

Several processes (`rlpost.distributed`): `GRPOLearner(..., accelerator=)` trains across the
processes of an `accelerate launch`; every rank calls `step` with the same whole batch (broadcast by
the main rank) and trains on its shard. The other learners refuse a multi-process launch.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol


class Learner(Protocol):
    model: Any       # the policy (a transformers causal LM); the loop publishes its weights
    optimizer: Any   # checkpointed by the loop

    def step(self, groups: list, fresh: list[bool] | None = None) -> dict[str, float]:
        """Update on one batch of groups; return scalars for the metrics log (needs `train/step_s`,
        `train/samples`)."""

    def logprob_mismatch(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                         sampling_logprobs: list[list[float]]) -> float:
        """Max |sampler logprob - learner logprob| on the given tokens with the current weights."""

    def extra_state(self) -> dict[str, Any]:
        """Tensors besides the policy that a checkpoint must keep (e.g. a value head); {} if none."""

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned."""


# factory(model, tokenizer, load_reference) -> Learner; load_reference() loads a frozen copy of the
# stage's starting policy (never the resumed checkpoint) for algorithms that need one.
LearnerFactory = Callable[[Any, Any, Callable[[], Any]], Learner]
