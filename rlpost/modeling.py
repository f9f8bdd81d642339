"""Build a small causal LM and a character-level tokenizer locally: no model hub is needed.

The tokenizer maps every character of a fixed alphabet to one token (a `tokenizers` WordLevel model
behind a per-character pre-tokenizer), so `"12+7="` is six tokens. The model is a Qwen2-architecture
config (RoPE, grouped-query attention, tied embeddings), saved as an ordinary Hugging Face model
directory that transformers, TRL and vLLM all load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
ALPHABET = "0123456789+-*=()., :?abcdefghijklmnopqrstuvwxyz#"


@dataclass(frozen=True)
class ModelShape:
    """Size of the locally built Qwen2 model."""

    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 64
    attention_dropout: float = 0.0


def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with `<pad>`, `<eos>` and `<unk>` specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *ALPHABET])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def qwen2_config(tokenizer, shape: ModelShape, **extra):
    """A float32 Qwen2 config sized by `shape` for the character tokenizer (head_dim must be >= 32 for
    vLLM's CPU attention)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_positions,
        attention_dropout=shape.attention_dropout,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        dtype="float32",
        **extra,
    )


def build_model(tokenizer, shape: ModelShape = ModelShape(), seed: int = 0):
    """A freshly initialised float32 Qwen2 causal LM sized by `shape`, with tied embeddings."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(tokenizer, shape, tie_word_embeddings=True))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_pretrained(model, tokenizer, directory: str | Path) -> Path:
    """Save model (safetensors) and tokenizer as a directory vLLM and transformers both load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
