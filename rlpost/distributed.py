"""Several learner processes under `accelerate launch` (or torchrun): who does what, and the batch they share.

Data parallel training of the policy: every process holds the whole model (DDP: gloo on CPU, NCCL
on GPU; FSDP2 / DeepSpeed ZeRO shard it, see recipes/accelerate/), the main process (rank 0) owns the
rollouts, and every process trains on its shard of the same batch of `RolloutGroup`s:

    dist = Context.from_env()                       # every rank, before building the learner
    learner = factory(model, tokenizer, load_reference, accelerator=dist.accelerator)
    each step, on every rank:
        groups = dist.broadcast_groups(groups if dist.is_main else None)   # main's batch everywhere
        if groups is None: break                                            # main said stop
        scalars = learner.step(groups, fresh=[...])  # the learner takes its own shard (`shard_groups`)
    only the main rank publishes weights, writes metrics and checkpoints (of `learner.model`, which
    is the unwrapped policy); see recipes/accelerate/README.md.

The learner shards the whole batch itself, rather than being handed a shard, because making the
sharded update equal the single-process one needs facts about the whole batch (the token count
that normalises "dapo"/"cispo"/"bnpo", which mini-batches have a trainable token) and the learner's
settings (`steps_per_generation`), and every rank already has the whole batch after the broadcast.

`shard_groups(groups, rank, world, parts)` gives rank r, for each of the `parts` mini-batches of
whole groups the single process would take (`split_by_groups`), its 1/world slice of them: so rank
r's k-th mini-batch is a slice of the single process's k-th, and averaging the ranks' gradients
(DDP) reproduces the single-process gradient (rlpost.learners.grpo, "Several processes").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from rollouts.buffer import RolloutGroup


def shard_groups(groups: list, rank: int, world: int, parts: int = 1) -> list:
    """Rank `rank`'s groups of `groups` out of `world`: for each of the `parts` consecutive
    mini-batches (of len(groups) / parts whole groups), the rank's consecutive 1/world of it.
    Raises ValueError unless len(groups) divides by parts x world: unequal shards would weight the
    ranks' samples unequally in DDP's gradient average, which the single-process update does not."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world size {world}")
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if len(groups) % (parts * world):
        raise ValueError(
            f"{len(groups)} groups per step do not split evenly over {world} processes x {parts} mini-batches "
            f"(steps_per_generation): unequal shards would make the multi-process update differ from the "
            f"single-process one; use a number of groups per step (prompts_per_step) divisible by {parts * world}")
    per_part = len(groups) // parts
    n = per_part // world
    return [g for k in range(parts) for g in groups[k * per_part + rank * n: k * per_part + (rank + 1) * n]]


def launched_world_size() -> int:
    """The number of processes this one was launched among (WORLD_SIZE from accelerate launch/torchrun; 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


# How long a rank waits in a collective for the others. `rlpost run` on several ranks: the followers
# wait in a broadcast while the main rank evaluates between stages, which can take long on a large
# benchmark (torch's default, 30 min, would end the run there).
RUN_COLLECTIVE_TIMEOUT = timedelta(hours=6)


@dataclass
class Context:
    """This process's place among the learner processes. `accelerator` is None for a plain
    single-process run (the learners then behave exactly as without this module)."""

    accelerator: Any = None

    @classmethod
    def from_env(cls, cpu: bool | None = None, force: bool = False, **accelerator_kwargs) -> "Context":
        """Under a multi-process launch (WORLD_SIZE > 1), or with `force`: an `accelerate.Accelerator`
        (it joins the process group: gloo on CPU, NCCL on GPU; FSDP/DeepSpeed as the launch config
        says); otherwise no accelerator. `cpu` None: CPU when no GPU is available."""
        if launched_world_size() <= 1 and not force:
            return cls(None)
        import torch
        from accelerate import Accelerator

        if cpu is None:
            cpu = not torch.cuda.is_available()
        return cls(Accelerator(cpu=cpu, **accelerator_kwargs))

    @classmethod
    def for_run(cls, device: str) -> "Context":
        """The learner processes of `rlpost run` (`rlpost.pipeline`): `from_env` on the recipe's device,
        with the collective timeout `RUN_COLLECTIVE_TIMEOUT`."""
        if launched_world_size() <= 1:
            return cls(None)
        from accelerate.utils import InitProcessGroupKwargs

        return cls.from_env(cpu=device == "cpu", kwargs_handlers=[InitProcessGroupKwargs(timeout=RUN_COLLECTIVE_TIMEOUT)])

    @property
    def world_size(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self):
        import torch

        return torch.device("cpu") if self.accelerator is None else self.accelerator.device

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (any picklable value) on every rank; what the other ranks pass is ignored.
        A collective: every rank must call it, in the same order."""
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def broadcast_groups(self, groups: list[RolloutGroup] | None) -> list[RolloutGroup] | None:
        """The main rank's batch of groups on every rank (followers pass None). The main rank passes
        None to tell the followers to stop (they get None and leave their loop)."""
        groups = self.broadcast_object(None if groups is None else list(groups))
        if groups is not None and not all(isinstance(g, RolloutGroup) for g in groups):
            raise TypeError("broadcast_groups expects a list of RolloutGroup")
        return groups

    def shard(self, groups: list, parts: int = 1) -> list:
        """This rank's share of `groups` (`shard_groups`); the learners call it themselves."""
        return shard_groups(groups, self.rank, self.world_size, parts)

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
