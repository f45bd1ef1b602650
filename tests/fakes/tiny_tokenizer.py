"""Small tokenizers built in-process (no downloads) for tests of the tokenizer service.

- byte-level BPE (GPT-2 / SmolLM2 style: leading-space tokens, emoji/CJK split into bytes)
- byte-fallback BPE with a Metaspace-style decoder (Llama-2 / SentencePiece style)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "smollm2-135m-instruct"
TRAINING_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a small test of streaming text generation",
    "Tokens with leading spaces: the cat sat on the mat. Numbers 12345!",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def byte_level_bpe(vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE trained on a few sentences; ids 0..2 are the special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    return tokenizer


def byte_fallback_bpe() -> Tokenizer:
    """Llama-2-like: '▁' word marker, <0xNN> byte tokens for everything not in the vocab."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ["▁", "▁the", "▁a", "e", "t", "h", "o", "l", "r", "d", "w", "▁he", "llo"]:
        vocab.setdefault(piece, len(vocab))
    for char in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?":
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "a"), ("▁", "h"), ("▁h", "e"),
              ("l", "l"), ("ll", "o")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                     byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return tokenizer


def tiny_hf_tokenizer():
    """The byte-level BPE as a transformers fast tokenizer with a ChatML chat template."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe(), eos_token="<|im_end|>",
                                 bos_token="<|im_start|>", unk_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_tiny_model_dir(path: Path) -> Path:
    """Write the tiny tokenizer as a model directory (tokenizer files only, no transformers)."""
    path.mkdir(parents=True, exist_ok=True)
    byte_level_bpe().save(str(path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def has_default_model() -> bool:
    """True when `make model` has finished (set LLMSERVE_TEST_TINY_TOKENIZER=1 to ignore it)."""
    if os.environ.get("LLMSERVE_TEST_TINY_TOKENIZER") == "1":
        return False
    return (DEFAULT_MODEL_DIR / ".complete").is_file()


def service_tokenizer_dir(tmp_dir: Path) -> Path:
    """The default model's directory when converted, else a tiny tokenizer saved in tmp_dir."""
    if has_default_model():
        return DEFAULT_MODEL_DIR
    return save_tiny_model_dir(tmp_dir / "tiny-tokenizer")
