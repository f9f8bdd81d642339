"""The one parameter update every rollout learner takes, with a guard against non-finite updates.

`apply_update(parameters, optimizer, loss, max_grad_norm, accelerator=None)` is

    zero_grad -> backward -> clip the gradient norm to `max_grad_norm` -> optimizer.step

as GRPO, PPO (policy and value together), online DPO and PRIME (the policy and its PRM) each used to
spell out, except that an update is SKIPPED when

    the loss is NaN or +-inf, or
    the gradient norm (before clipping; of the all-reduced gradient under DDP) is NaN or inf.

A skipped update takes no optimiser step (the AdamW moments and step counts are untouched, the
parameters too) and leaves the gradients zeroed (set to None); its `UpdateResult.applied` is False.
A single-process update whose loss is already non-finite does not even run backward.

Under an `accelerate.Accelerator` with several processes the decision is collective, so that every
rank takes the same branch (a rank that skipped a step its peers took would leave the replicas
apart, and one that skipped backward would leave DDP's all-reduce waiting): every rank always runs
`accelerator.backward(loss)` and `accelerator.clip_grad_norm_` (which acts on the all-reduced
gradient, so every rank sees the same norm), and one all-reduce of (loss, non-finite flag) tells
every rank whether any rank's loss was non-finite and gives the mean loss over ranks.

Under DeepSpeed (not run here: it is not installed) the optimiser steps inside
`accelerator.backward` and clips by the DeepSpeed config's `gradient_clipping`, so only a non-finite
loss can be caught (collectively, before backward); the gradient norm is reported, not guarded.

Learners count the skipped updates of a step as `train/nonfinite_updates` and report
`train/nonfinite_step` = 1.0 when every update the step attempted was skipped (0.0 otherwise, and
when it attempted none). `NonFiniteStreak` turns a run of such steps into an error for the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from rlpost.errors import UserError


@dataclass(frozen=True)
class UpdateResult:
    """What one `apply_update` did. `grad_norm`: the total gradient norm before clipping (NaN when a
    non-finite loss skipped backward); `applied`: whether the optimiser stepped; `loss`: the loss
    value (its mean over ranks under a multi-process accelerator); `nonfinite_loss`: whether the loss
    (on any rank) was NaN or inf."""

    grad_norm: float
    applied: bool
    loss: float
    nonfinite_loss: bool = False

    @property
    def nonfinite(self) -> bool:
        """Skipped because the loss or the gradient norm was not finite (the only reason to skip)."""
        return not self.applied


def _is_distributed(accelerator) -> bool:
    return accelerator is not None and getattr(accelerator, "num_processes", 1) > 1


def _is_deepspeed(accelerator) -> bool:
    return accelerator is not None and str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")


def _reduce_loss(accelerator, detached: torch.Tensor, local_bad: bool) -> tuple[bool, float]:
    """(whether any rank's loss is non-finite, the mean loss over ranks), in one all-reduce."""
    if not _is_distributed(accelerator):
        return local_bad, float(detached)
    summary = torch.stack([torch.nan_to_num(detached, nan=0.0, posinf=0.0, neginf=0.0),
                           torch.tensor(float(local_bad), device=detached.device)])
    summary = accelerator.reduce(summary, reduction="sum")
    bad = float(summary[1]) > 0
    return bad, (float("nan") if bad else float(summary[0]) / accelerator.num_processes)


def apply_update(parameters: torch.nn.Module | Iterable[torch.nn.Parameter], optimizer, loss: torch.Tensor,
                 max_grad_norm: float, accelerator: Any = None) -> UpdateResult:
    """One guarded update of `parameters` (a module, or the parameters `optimizer` steps, all clipped
    together) on the scalar `loss` (module docstring). With `accelerator`, backward and clipping go
    through it (`accelerator.backward`, `accelerator.clip_grad_norm_`: DDP's all-reduced gradient,
    FSDP's sharded one); the model behind `loss` must then be the prepared one."""
    params = list(parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters)
    optimizer.zero_grad(set_to_none=True)
    detached = loss.detach().float()
    local_bad = not bool(torch.isfinite(detached).all())
    if _is_deepspeed(accelerator):
        # DeepSpeed steps inside `accelerator.backward` and clips by its own `gradient_clipping`: the
        # loss is checked (collectively) before it, the gradient norm only reported after it
        bad_loss, value = _reduce_loss(accelerator, detached, local_bad)
        if bad_loss:
            return UpdateResult(grad_norm=float("nan"), applied=False, loss=value, nonfinite_loss=True)
        accelerator.backward(loss)
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)
        return UpdateResult(grad_norm=float("nan") if norm is None else float(norm), applied=True, loss=value)
    if _is_distributed(accelerator):
        # everyone runs backward and clipping (collectives), then everyone skips or everyone steps
        accelerator.backward(loss)
        grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
        bad_loss, value = _reduce_loss(accelerator, detached, local_bad)
    else:
        bad_loss = local_bad
        value = float(detached)
        if bad_loss:
            optimizer.zero_grad(set_to_none=True)
            return UpdateResult(grad_norm=float("nan"), applied=False, loss=value, nonfinite_loss=True)
        if accelerator is not None:
            accelerator.backward(loss)
            grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
        else:
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if bad_loss or not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return UpdateResult(grad_norm=grad_norm, applied=False, loss=value, nonfinite_loss=bad_loss)
    optimizer.step()
    return UpdateResult(grad_norm=grad_norm, applied=True, loss=value)


def nonfinite_scalars(results: list[UpdateResult]) -> dict[str, float]:
    """`train/nonfinite_updates` (updates of the step skipped as non-finite) and `train/nonfinite_step`
    (1.0 when the step attempted updates and skipped them all, else 0.0) for a step's updates."""
    skipped = sum(1 for r in results if not r.applied)
    return {"train/nonfinite_updates": float(skipped),
            "train/nonfinite_step": float(bool(results) and skipped == len(results))}


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced only non-finite updates for several steps in a row (`NonFiniteStreak`)."""


class NonFiniteStreak:
    """Stops a run whose updates keep going non-finite.

    Contract for the loop: after every learner step call `streak.update(step, scalars)` with the
    step's number and the scalars `learner.step` returned (under several processes the main rank's,
    or every rank's: the scalars agree). The step counts as non-finite when
    `scalars["train/nonfinite_step"]` is 1 (every update it attempted was skipped because its loss or
    gradient norm was NaN/inf; `apply_update`). `update` raises `NonFiniteLossError` at the
    `max_in_a_row`-th non-finite step in a row, naming those steps. The streak is broken by a step that
    applied an update (`train/nonfinite_step` 0 and `train/optimizer_steps` > 0; a learner that does
    not report `train/optimizer_steps` breaks it with any step that is not non-finite). A step that
    attempted no update at all (no trainable sample: `train/optimizer_steps` 0 and no non-finite
    update) neither extends nor breaks it. Skipped updates left the weights and the optimiser state
    as they were, so the last checkpoint is consistent with the weights the run holds.

    Raise it before the step's weights are published or checkpointed, or after: either is safe, as
    a non-finite step changed nothing. `max_in_a_row` >= 1."""

    def __init__(self, max_in_a_row: int = 3):
        if max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.steps: list[int] = []  # the current run of non-finite steps

    def update(self, step: int, scalars: dict) -> None:
        if float(scalars.get("train/nonfinite_step", 0.0)) >= 0.5:
            self.steps.append(step)
            if len(self.steps) >= self.max_in_a_row:
                steps = ", ".join(map(str, self.steps))
                raise NonFiniteLossError(
                    f"{len(self.steps)} steps in a row ({steps}) had only non-finite updates (NaN/inf loss or "
                    f"gradient norm; every one was skipped, so the weights and optimiser state are those from "
                    f"before step {self.steps[0]}). Lower the learning rate (or max_grad_norm), check the rewards "
                    f"and inputs of those steps for NaN/inf or extreme values, and resume from the last checkpoint.")
        elif float(scalars.get("train/optimizer_steps", 1.0)) > 0:
            self.steps.clear()
