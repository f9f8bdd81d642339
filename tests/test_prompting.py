"""PromptFormat: template filling, chat-template choice, system turns, special tokens, and errors."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import pytest

from rlpost.config import config_help, load_config, setting
from rlpost.errors import UserError
from rlpost.prompting import PromptFormat

CHAT = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")


def _bos_tokenizer(chat_template: str | None):
    """A character tokenizer that adds `<s>` to raw text (like Llama's), with an optional template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 []:?\n")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def chat_tokenizer():
    return _bos_tokenizer(CHAT)


@pytest.fixture(scope="module")
def raw_tokenizer():
    return _bos_tokenizer(None)


def test_default_is_the_prompt_column_and_raw_text_gets_special_tokens(raw_tokenizer):
    fmt = PromptFormat()
    row = {"prompt": "what is 2?", "answer": "2"}
    assert fmt.columns == ("prompt",)
    assert not fmt.applies_chat_template(raw_tokenizer)
    assert fmt.text(raw_tokenizer, row) == "what is 2?"
    ids = fmt.token_ids(raw_tokenizer, row)
    assert ids == raw_tokenizer("what is 2?")["input_ids"] and ids[0] == raw_tokenizer.bos_token_id


def test_character_tokenizer_adds_no_special_tokens(tokenizer):
    ids = PromptFormat().token_ids(tokenizer, {"prompt": "12+7="})
    assert ids == tokenizer("12+7=", add_special_tokens=False)["input_ids"] and len(ids) == 5


def test_template_fills_named_columns_and_ignores_the_rest(raw_tokenizer):
    fmt = PromptFormat(template="question: {question}\nanswer:")
    row = {"prompt": "unused", "question": "a b", "answer": "{x}"}
    assert fmt.columns == ("question",)
    assert fmt.text(raw_tokenizer, row) == "question: a b\nanswer:"
    braces = PromptFormat(template="{prompt} {{literal}}")
    assert braces.fill({"prompt": "{not a field}"}) == "{not a field} {literal}"


def test_chat_template_wraps_one_user_turn_and_ids_match_apply_chat_template(chat_tokenizer):
    fmt = PromptFormat()
    row = {"prompt": "hi"}
    assert fmt.applies_chat_template(chat_tokenizer)
    assert fmt.text(chat_tokenizer, row) == "<s>[user]hi[assistant]"
    expected = chat_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=False)
    ids = fmt.token_ids(chat_tokenizer, row)
    assert ids == list(expected)
    assert ids.count(chat_tokenizer.bos_token_id) == 1  # the template's BOS, not a second one


def test_system_prompt_is_a_system_turn_before_the_user_turn(chat_tokenizer):
    fmt = PromptFormat(template="q: {q}", system_prompt="be brief")
    assert fmt.text(chat_tokenizer, {"q": "hi"}) == "<s>[system]be brief[user]q: hi[assistant]"


def test_chat_template_false_and_true(chat_tokenizer, raw_tokenizer):
    off = PromptFormat(chat_template=False)
    assert not off.applies_chat_template(chat_tokenizer)
    assert off.text(chat_tokenizer, {"prompt": "hi"}) == "hi"
    assert off.token_ids(chat_tokenizer, {"prompt": "hi"})[0] == chat_tokenizer.bos_token_id
    on = PromptFormat(chat_template=True)
    assert on.text(chat_tokenizer, {"prompt": "hi"}) == "<s>[user]hi[assistant]"
    with pytest.raises(UserError, match="tokenizer has no chat template; set chat_template to false"):
        on.text(raw_tokenizer, {"prompt": "hi"})


def test_system_prompt_without_a_chat_template_is_an_error(raw_tokenizer):
    with pytest.raises(UserError, match="system_prompt is set but no chat template is applied"):
        PromptFormat(system_prompt="be brief").text(raw_tokenizer, {"prompt": "hi"})
    with pytest.raises(UserError, match="system_prompt needs a chat template but chat_template is false"):
        PromptFormat(chat_template=False, system_prompt="be brief")


def test_missing_column_names_the_column_and_the_row_columns(raw_tokenizer):
    fmt = PromptFormat(template="Question: {question}")
    with pytest.raises(UserError) as err:
        fmt.text(raw_tokenizer, {"prompt": "x", "answer": "1"})
    message = str(err.value)
    assert "'question'" in message and "prompt, answer" in message and "\n" not in message


@pytest.mark.parametrize("template, named", [
    ("{prompt", "not a valid format string"),
    ("{} and {0}", "positional field"),
])
def test_bad_templates_fail_when_the_format_is_made(template, named):
    with pytest.raises(UserError, match=named):
        PromptFormat(template=template)


def test_a_format_is_a_recipe_section_and_pickles(tmp_path):
    @dataclass
    class Recipe:
        prompt: PromptFormat = setting(PromptFormat, "how rows become prompts")

    path = tmp_path / "recipe.yaml"
    path.write_text("prompt:\n  template: 'Q: {question}'\n  system_prompt: be brief\n", encoding="utf-8")
    recipe = load_config(Recipe, path, ["prompt.chat_template=true"])
    assert recipe.prompt == PromptFormat("Q: {question}", True, "be brief")
    assert "prompt.chat_template" in config_help(Recipe)
    with pytest.raises(UserError, match="prompt.chat_template"):
        load_config(Recipe, path, ["prompt.chat_template=maybe"])
    assert pickle.loads(pickle.dumps(recipe.prompt)) == recipe.prompt
