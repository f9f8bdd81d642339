"""Reward models: a sequence classifier that maps `prompt + completion` to one scalar score.

A reward model here is any local Hugging Face directory that `AutoModelForSequenceClassification`
loads with `num_labels == 1` (e.g. one trained by `recipes/train_reward_model.py` with TRL's
`RewardTrainer`). Its score for a text is the classification head applied to the hidden state of
the last non-pad token:

    score(x, y) = w . h_T(x + y + eos),   T = index of the last token that is not padding

Scoring mirrors how `RewardTrainer` trains: the text is `prompt + completion` with the
tokenizer's EOS appended (TRL appends it to every chosen/rejected text), batches are padded on
the right (the side TRL's preference collator pads), and `config.pad_token_id` is set so the
model picks the last non-pad token. With right padding and causal attention the pads come after
that token, so a text scores the same alone or in a batch with longer texts. Texts longer than
`max_length` tokens are truncated from the left, keeping the end of the completion.

`reward_model_reward` is the reward function in TRL's convention (registered as `reward_model`);
it loads the model once per process, which matters because it runs inside the reward pool's
worker processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rewards.errors import UserError

ENV_VAR = "RLPOST_REWARD_MODEL"
THREADS_ENV_VAR = "RLPOST_REWARD_MODEL_THREADS"

_SCORERS: dict[tuple[str, int, int | None], "RewardModelScorer"] = {}


def build_reward_model(tokenizer, *, hidden_size: int = 192, num_layers: int = 4, num_heads: int = 6,
                       num_kv_heads: int = 2, intermediate_size: int = 512, max_positions: int = 64,
                       seed: int = 0):
    """A freshly initialised float32 `Qwen2ForSequenceClassification` (`num_labels=1`) of the given size.

    The sizes are those of `rlpost.modeling.ModelShape` (pass `**dataclasses.asdict(shape)`); the
    vocabulary, pad and EOS ids come from `tokenizer`, with EOS doubling as BOS. `pad_token_id` is
    set so the model scores the last non-pad token of each row; the head is not tied to the embeddings.
    """
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        dtype="float32",
        tie_word_embeddings=False,
        num_labels=1,
    )
    torch.manual_seed(seed)
    return Qwen2ForSequenceClassification(config)


def _load(model_dir: Path):
    """Tokenizer and eval-mode float32 model from `model_dir`; UserError if it is not a reward model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise UserError(f"reward model directory {model_dir} has no config.json; train one with "
                        f"'python -m recipes.train_reward_model' or fix the path")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    if model.config.num_labels != 1:
        raise UserError(f"{model_dir}: a reward model needs num_labels=1, this one has "
                        f"{model.config.num_labels}; point to a reward model directory")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model.eval()


class RewardModelScorer:
    """Scores `prompt + completion` texts with a local sequence-classification reward model.

    `batch_size` texts go through the model at a time (no grad, eval mode); `max_length` caps
    tokens per text (default: the model's `max_position_embeddings`); `append_eos` adds the
    tokenizer's EOS as `RewardTrainer` does in training; `threads`, if given, sets torch's CPU
    threads for this process.
    """

    def __init__(self, model_dir: str | Path, batch_size: int = 64, max_length: int | None = None,
                 append_eos: bool = True, threads: int | None = None):
        if batch_size < 1:
            raise UserError(f"reward model batch_size must be >= 1, got {batch_size}")
        if threads is not None:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir).expanduser()
        if not self.model_dir.is_dir():
            raise UserError(f"reward model directory {self.model_dir} does not exist; "
                            f"set {ENV_VAR} or reward_model_dir to a trained reward model")
        self.tokenizer, self.model = _load(self.model_dir)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.batch_size = batch_size
        self.max_length = max_length or self.model.config.max_position_embeddings
        self.append_eos = append_eos

    def text(self, prompt: Any, completion: Any) -> str:
        """The string that is scored: `prompt + completion` + EOS, or chat messages via the chat template.

        Both are what `RewardTrainer` trains on (it tokenises with the tokenizer's default special tokens).
        """
        if isinstance(prompt, list) or isinstance(completion, list):
            return self._chat_text(prompt, completion)  # the template ends the turn; TRL adds no EOS
        if isinstance(prompt, str) and isinstance(completion, str):
            text = prompt + completion
        else:
            raise UserError(f"reward model scores strings or chat messages, got prompt of type "
                            f"{type(prompt).__name__} and completion of type {type(completion).__name__}")
        eos = self.tokenizer.eos_token
        if self.append_eos and eos and not text.endswith(eos):
            text += eos
        return text

    def _chat_text(self, prompt: Any, completion: Any) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"{self.model_dir}: the tokenizer has no chat template, so chat messages "
                            f"cannot be scored; pass plain-text prompts and completions")
        messages = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
        messages = messages + (completion if isinstance(completion, list)
                               else [{"role": "assistant", "content": completion}])
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[float]:
        """One float per text: the head's output at the last non-pad token.

        `add_special_tokens=False` for texts rendered by a chat template (it already holds them).
        """
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt",
                                   padding=True, truncation=True, max_length=self.max_length,
                                   add_special_tokens=add_special_tokens)
            logits = self.model(**batch).logits
            scores += logits[:, 0].float().tolist()
        return scores

    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        """Scores of `prompt_i + completion_i` for each i (all plain text, or all chat messages)."""
        if len(prompts) != len(completions):
            raise UserError(f"got {len(prompts)} prompts for {len(completions)} completions; "
                            f"give one prompt per completion")
        chat = {isinstance(p, list) or isinstance(c, list) for p, c in zip(prompts, completions)}
        if len(chat) > 1:
            raise UserError("a batch mixes chat messages and plain text; score them separately")
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        return self.score_texts(texts, add_special_tokens=chat != {True})


def get_scorer(model_dir: str | Path, batch_size: int = 64, threads: int | None = None) -> RewardModelScorer:
    """The process-wide cached scorer for `model_dir` (loaded on first use)."""
    key = (str(Path(model_dir).expanduser().resolve()), batch_size, threads)
    if key not in _SCORERS:
        _SCORERS[key] = RewardModelScorer(key[0], batch_size=batch_size, threads=threads)
    return _SCORERS[key]


def _model_dir_from(reward_model_dir: Any) -> str:
    """The directory from the kwarg (a string, or a dataset column of one repeated string) or the env var."""
    if isinstance(reward_model_dir, (list, tuple)):
        distinct = set(reward_model_dir)
        if len(distinct) != 1:
            raise UserError(f"column 'reward_model_dir' must name one directory for the whole batch, "
                            f"got {len(distinct)} different values")
        reward_model_dir = distinct.pop()
    if reward_model_dir:
        return str(reward_model_dir)
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    raise UserError(f"reward 'reward_model' needs a model directory: set the environment variable "
                    f"{ENV_VAR} or pass reward_model_dir")


def reward_model_reward(prompts, completions, completion_ids=None, reward_model_dir=None, path=None,
                        **kwargs) -> list[float | None]:
    """Score of a trained reward model (directory: the recipe's `args: {path: DIR}`, else a
    `reward_model_dir` column, else RLPOST_REWARD_MODEL).

    `completion_ids` is ignored: the reward model re-tokenises the text with its own tokenizer,
    which need not be the policy's. The scorer is cached per process; it uses
    `RLPOST_REWARD_MODEL_THREADS` torch threads (default 1: pool workers run side by side).
    """
    threads = int(os.environ.get(THREADS_ENV_VAR, "1"))
    return get_scorer(str(path) if path else _model_dir_from(reward_model_dir), threads=threads).score(prompts, completions)


def make_reward_model_reward(model_dir: str | Path, batch_size: int = 64,
                             threads: int | None = None) -> Callable[..., list[float | None]]:
    """A reward function in TRL's convention bound to `model_dir` (for recipes that pass functions)."""
    model_dir = str(model_dir)

    def reward(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        return get_scorer(model_dir, batch_size=batch_size, threads=threads).score(prompts, completions)

    reward.__name__ = f"reward_model[{Path(model_dir).name}]"
    reward.__doc__ = f"Score of the reward model in {model_dir}."
    return reward
