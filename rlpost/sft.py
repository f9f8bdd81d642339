"""SFT warm-up: TRL's SFTTrainer on a fixed demonstration set, trained until validation stops improving.

Validation is greedy exact-match accuracy on prompts the demonstrations do not contain, measured every
`eval_every_epochs` epochs; training stops after `patience` evaluations without improvement and the
best checkpoint is kept. This is what makes the later RL gain RL's own: the SFT stage has extracted
what its demonstrations can teach before RL starts.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback

from rlpost.checkpoint import last_trainer_checkpoint

log = logging.getLogger("rlpost.sft")
_STOPPING_STATE = "early_stopping.json"
_BEST_WEIGHTS = "best_model.safetensors"


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
    """Evaluate every `every` epochs; keep the best weights; stop after `patience` evaluations without gain.

    Its state (history, best, the best weights) is written into every trainer checkpoint (`on_save`)
    and read back by `restore`, so an SFT stage killed mid-way resumes with the same stopping
    decision it would have made uninterrupted."""

    def __init__(self, evaluate, every: int, patience: int, progress=None, writer=None):
        self.evaluate, self.every, self.patience, self.progress = evaluate, every, patience, progress
        self.writer = writer  # a TensorBoard SummaryWriter for `val/accuracy`, or None
        self.best_accuracy, self.best_epoch, self.best_state = -1.0, 0, None
        self.history: list[tuple[int, float]] = []
        self._since_best = 0

    @property
    def done(self) -> bool:
        return self._since_best >= self.patience

    def on_save(self, args, state, control, **kwargs):
        from safetensors.torch import save_file

        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        record = {"best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch,
                  "history": self.history, "since_best": self._since_best}
        (directory / _STOPPING_STATE).write_text(json.dumps(record))
        if self.best_state is not None:  # cloned one by one: tied weights must not share storage on disk
            save_file({k: v.detach().clone().contiguous() for k, v in self.best_state.items()},
                      str(directory / _BEST_WEIGHTS))
        return control

    def restore(self, checkpoint: Path, model) -> None:
        """Continue from the state `on_save` wrote into `checkpoint` (missing file: nothing to restore)."""
        from safetensors.torch import load_file

        path = Path(checkpoint) / _STOPPING_STATE
        if not path.exists():
            return
        record = json.loads(path.read_text())
        self.best_accuracy, self.best_epoch = record["best_accuracy"], record["best_epoch"]
        self.history = [tuple(h) for h in record["history"]]
        self._since_best = record["since_best"]
        if (Path(checkpoint) / _BEST_WEIGHTS).exists():
            best = load_file(str(Path(checkpoint) / _BEST_WEIGHTS))
            self.best_state = {k: best.get(k, v) for k, v in model.state_dict().items()}
        if self.progress is not None:
            self.progress.update(self.history[-1][0] if self.history else 0)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch)
        if epoch % self.every:
            return control
        accuracy = self.evaluate(model)
        model.train()
        self.history.append((epoch, accuracy))
        if self.writer is not None:
            self.writer.add_scalar("val/accuracy", accuracy, state.global_step)
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
    A checkpoint in `out_dir` from a killed run is resumed (TRL/transformers' own resume).

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
        logging_steps=25,  # training loss to TensorBoard (RUN/<stage>/tensorboard)
        report_to=[],  # TensorBoard through our own writer, shared with the validation curve
        save_strategy="epoch",  # a killed stage resumes from its last epoch (see EarlyStopping.on_save)
        save_total_limit=1,
        seed=seed,
        max_length=None,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=use_cpu,
        bf16=False,  # TRL defaults to bf16 autocast, which is ~10x slower on CPUs without AMX
        completion_only_loss=True,
        gradient_checkpointing=False,  # TRL's default recomputes activations: ~20% slower, and these models fit
    )
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    start = time.perf_counter()
    writer = SummaryWriter(str(Path(out_dir).parent / "tensorboard"))
    callbacks = [TensorBoardCallback(writer)]
    with tqdm(total=cfg.num_train_epochs, desc="SFT epochs", unit="ep") as bar:
        stopper = None
        if validate is not None:
            stopper = EarlyStopping(validate, cfg.eval_every_epochs, cfg.patience, progress=bar, writer=writer)
            callbacks.append(stopper)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # the final metrics dict; the progress bar and stage report say it
        last = last_trainer_checkpoint(out_dir)
        if last is not None:
            log.info("resuming SFT from %s", last)
            if stopper is not None:
                stopper.restore(Path(last), model)
        if stopper is None or not stopper.done:
            trainer.train(resume_from_checkpoint=last)
    writer.close()
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
