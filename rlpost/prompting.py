"""Turn a dataset row into model input: the one prompt formatter used by rollouts, SFT and evaluation.

`PromptFormat.text(tokenizer, row)` is the string the model sees and `token_ids(tokenizer, row)` its
token ids. Both go through the same two steps:

1. Fill `template` with `str.format` over the row's columns (`"{prompt}"` by default; e.g.
   `"Question: {question}\\nAnswer:"`). A column the template names but the row lacks is a
   `UserError` naming the column and the columns the row has.
2. Apply the tokenizer's chat template, or not (`chat_template`: None uses it when the tokenizer
   has one, True requires one, False never uses it). With a chat template the filled text is one
   user turn, after a system turn holding `system_prompt` when that is given, rendered with
   `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`.

Token ids: a rendered chat template already writes every special token the model expects (BOS,
role markers), so its text is tokenized with `add_special_tokens=False`, which gives exactly the
ids of `apply_chat_template(..., tokenize=True)`. Raw text is tokenized with
`add_special_tokens=True`, as vLLM does for text prompts (a BOS for Llama-style tokenizers; the
repo's character tokenizer and Qwen2's add none). Feeding vLLM these ids, or this text, gives the
same input; feeding it ids keeps trainer and sampler on identical tokens.

A `system_prompt` needs a chat template to go in: giving one while no chat template is applied is a
`UserError` rather than a silently dropped instruction.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from rlpost.config import setting
from rlpost.errors import UserError


@dataclass(frozen=True)
class PromptFormat:
    """How a dataset row becomes the model's prompt (see the module docstring)."""

    template: str = setting(
        "{prompt}", "str.format template over the row's columns, e.g. 'Question: {question}\\nAnswer:'")
    chat_template: bool | None = setting(
        None, "apply the tokenizer's chat template: null when it has one, true to require one, false never")
    system_prompt: str | None = setting(
        None, "text of a system turn before the prompt (needs a chat template to be applied)")

    def __post_init__(self) -> None:
        template_columns(self.template)  # a bad template fails here, not at the first row
        if self.chat_template is False and self.system_prompt is not None:
            raise UserError("system_prompt needs a chat template but chat_template is false; "
                            "drop system_prompt or put its text in the template")

    @property
    def columns(self) -> tuple[str, ...]:
        """The row columns the template reads, in order of first use."""
        return template_columns(self.template)

    def applies_chat_template(self, tokenizer: Any) -> bool:
        """Whether `tokenizer`'s chat template is applied (UserError if required but missing)."""
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template is True and not has_template:
            raise UserError("chat_template is true but the tokenizer has no chat template; "
                            "set chat_template to false or null, or use a model that has one")
        return has_template if self.chat_template is None else self.chat_template

    def fill(self, row: dict[str, Any]) -> str:
        """The template filled from the row's columns (before any chat template)."""
        try:
            return self.template.format(**row)
        except KeyError as err:
            columns = ", ".join(map(str, row)) or "none"
            raise UserError(f"prompt template {self.template!r} needs column {err.args[0]!r} but the "
                            f"row has only: {columns}; fix the template or map a column to it") from None
        except (AttributeError, IndexError, TypeError, ValueError) as err:
            raise UserError(f"prompt template {self.template!r} cannot be filled from the row ({err}); "
                            "use plain {column} fields") from None

    def text(self, tokenizer: Any, row: dict[str, Any]) -> str:
        """The string fed to the model for `row`."""
        filled = self.fill(row)
        if not self.applies_chat_template(tokenizer):
            if self.system_prompt is not None:
                raise UserError("system_prompt is set but no chat template is applied (the tokenizer "
                                "has none); drop system_prompt or use a model with a chat template")
            return filled
        messages = [{"role": "user", "content": filled}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def token_ids(self, tokenizer: Any, row: dict[str, Any]) -> list[int]:
        """Token ids of `text(tokenizer, row)`; special tokens added only to raw (untemplated) text."""
        text = self.text(tokenizer, row)
        add_special = not self.applies_chat_template(tokenizer)
        return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def template_columns(template: str) -> tuple[str, ...]:
    """The columns a str.format template reads; UserError for a malformed or positional template."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise UserError(f"prompt template {template!r} is not a valid format string ({err}); "
                        "write literal braces as {{ and }}") from None
    names = [_column_of(name) for name in fields]
    if any(not name or name.isdigit() for name in names):
        raise UserError(f"prompt template {template!r} has a positional field ({{}} or {{0}}); "
                        "name a column instead, e.g. {prompt}")
    return tuple(dict.fromkeys(names))


def _column_of(field_name: str) -> str:
    """The column a format field reads: 'answer' for '{answer}', '{answer.x}' or '{answer[0]}'."""
    return field_name.split(".", 1)[0].split("[", 1)[0]
