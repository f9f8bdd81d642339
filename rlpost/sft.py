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
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 512) -> list[str]:
    """Greedy-decode `prompts` with the learner's own (transformers) model, left-padded in batches."""
    model.eval()
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        texts += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


class EarlyStopping(TrainerCallback):
    """Evaluate every `every` epochs; keep the best weights; stop after `patience` evaluations without gain."""

    def __init__(self, evaluate, every: int, patience: int, min_epochs: int = 0, progress=None):
        self.evaluate, self.every, self.patience, self.progress = evaluate, every, patience, progress
        self.min_epochs = min_epochs
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
        if self._since_best >= self.patience and epoch >= self.min_epochs:
            control.should_training_stop = True
        return control


def run_sft(model, tokenizer, demos: list[tuple[str, str]], validate, *, out_dir: Path, cfg, seed: int = 0) -> SFTResult:
    """Train `model` in place on `(prompt, completion)` demos; leave it holding the best-validation weights.

    `validate(model) -> float` returns validation accuracy. `cfg` carries `learning_rate`,
    `batch_size`, `warmup_steps`, `max_epochs`, `eval_every_epochs`, `patience`, `min_epochs`.
    """
    from tqdm.auto import tqdm
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"prompt": p, "completion": c} for p, c in demos])
    args = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.max_epochs,
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        seed=seed,
        max_length=None,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast, which is ~10x slower on CPUs without AMX
        completion_only_loss=True,
    )
    start = time.perf_counter()
    with tqdm(total=cfg.max_epochs, desc="SFT epochs", unit="ep") as bar:
        stopper = EarlyStopping(validate, cfg.eval_every_epochs, cfg.patience, cfg.min_epochs, progress=bar)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[stopper])
        trainer.train()
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    return SFTResult(
        best_accuracy=stopper.best_accuracy,
        best_epoch=stopper.best_epoch,
        epochs_run=stopper.history[-1][0] if stopper.history else 0,
        history=stopper.history,
        wall_s=time.perf_counter() - start,
    )
