"""SFT warm-up: TRL's SFTTrainer on a fixed demonstration set, trained until validation stops improving.

Validation is greedy exact-match accuracy on prompts the demonstrations do not contain, measured every
`eval_every_epochs` epochs; training stops after `patience` evaluations without improvement and the
best checkpoint is kept. This is what makes the later RL gain RL's own: the SFT stage has extracted
what its demonstrations can teach before RL starts.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

log = logging.getLogger("rlpost.sft")


@dataclass
class SFTResult:
    best_accuracy: float
    best_epoch: int
    epochs_run: int
    history: list[tuple[int, float]] = field(default_factory=list)
    wall_s: float = 0.0


@torch.no_grad()
def greedy_completions(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                       batch_size: int = 512) -> list[str]:
    """Greedy-decode token-id prompts with the learner's own (transformers) model, left-padded in batches."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = prompt_ids[start : start + batch_size]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


class EarlyStopping(TrainerCallback):
    """Evaluate every `every` epochs; keep the best weights; stop after `patience` evaluations without gain."""

    def __init__(self, evaluate, every: int, patience: int, progress=None):
        self.evaluate, self.every, self.patience, self.progress = evaluate, every, patience, progress
        self.best_accuracy, self.best_epoch, self.best_state = -1.0, 0, None
        self.history: list[tuple[int, float]] = []
        self._since_best = 0

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch)
        if epoch % self.every:
            return control
        accuracy = self.evaluate(model)
        model.train()
        self.history.append((epoch, accuracy))
        if accuracy > self.best_accuracy:
            self.best_accuracy, self.best_epoch, self._since_best = accuracy, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self._since_best += 1
        if self.progress is not None:
            self.progress.set_postfix(epoch=epoch, val_acc=f"{accuracy:.3f}", best=f"{self.best_accuracy:.3f}")
            self.progress.update(self.every)
        if self._since_best >= self.patience:
            control.should_training_stop = True
        return control


def run_sft(model, tokenizer, rows: list[dict], validate, *, out_dir: Path, cfg, seed: int = 0,
            use_cpu: bool = True) -> SFTResult:
    """Train `model` in place on tokenized rows `{input_ids, completion_mask}` (loss on completion
    tokens only); with `validate(model) -> accuracy`, keep the best-validation weights and stop on the
    plateau (`cfg.patience` validations without a new best); without it, train `num_train_epochs`.

    `cfg` carries TRL SFTConfig's `learning_rate`, `per_device_train_batch_size`, `num_train_epochs`,
    `warmup_steps`, `lr_scheduler_type`, plus `eval_every_epochs` and `patience`.
    """
    from tqdm.auto import tqdm
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list(rows)
    args = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.num_train_epochs,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        seed=seed,
        max_length=None,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=use_cpu,
        bf16=False,  # TRL defaults to bf16 autocast, which is ~10x slower on CPUs without AMX
        completion_only_loss=True,
        gradient_checkpointing=False,  # TRL's default recomputes activations: ~20% slower, and these models fit
    )
    start = time.perf_counter()
    callbacks = []
    with tqdm(total=cfg.num_train_epochs, desc="SFT epochs", unit="ep") as bar:
        stopper = None
        if validate is not None:
            stopper = EarlyStopping(validate, cfg.eval_every_epochs, cfg.patience, progress=bar)
            callbacks.append(stopper)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=callbacks)
        trainer.train()
    if stopper is None:
        return SFTResult(best_accuracy=float("nan"), best_epoch=cfg.num_train_epochs,
                         epochs_run=cfg.num_train_epochs, wall_s=time.perf_counter() - start)
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    return SFTResult(
        best_accuracy=stopper.best_accuracy,
        best_epoch=stopper.best_epoch,
        epochs_run=stopper.history[-1][0] if stopper.history else 0,
        history=stopper.history,
        wall_s=time.perf_counter() - start,
    )
