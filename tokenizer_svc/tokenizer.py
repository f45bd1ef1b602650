"""The model's tokenizer: prompt/chat -> token ids, token ids -> text (no protobuf, no torch).

Loads the model directory's `tokenizer.json` with Hugging Face `tokenizers` and its chat
template with Jinja, matching `transformers.AutoTokenizer` (tests check the parity) without
importing transformers, which imports torch and costs seconds of startup.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from tokenizer_svc.chat_template import ChatTemplate, find_chat_template
from tokenizer_svc.schema import ChatTurn

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _byte_level_chars() -> dict[str, int]:
    """Byte-level BPE spells every byte as one printable character: bytes that are printable
    Latin-1 stand for themselves, the others (controls, space, ...) for chr(256 + k) in order.
    Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {chr(b): b for b in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            chars[chr(256 + shifted)] = byte
            shifted += 1
    return chars


_BYTE_LEVEL_CHARS = _byte_level_chars()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """Special tokens are stored as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_special_tokens(model_dir: Path, config: dict[str, Any]) -> dict[str, str]:
    """bos/eos/unk/pad token strings from special_tokens_map.json and tokenizer_config.json."""
    found: dict[str, str] = {}
    for source in (_read_json(model_dir / "special_tokens_map.json"), config):
        for key in SPECIAL_TOKEN_KEYS:
            text = _token_text(source.get(key))
            if text:
                found[key] = text
    return found


class ModelTokenizer:
    """A fast tokenizer plus the model's chat template and special tokens."""

    def __init__(self, backend: Tokenizer, name: str, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None,
                 clean_up_tokenization_spaces: bool = False) -> None:
        self._backend = backend
        self.name = name
        self.special_tokens = dict(special_tokens or {})
        self._chat_template = (ChatTemplate(chat_template, self.special_tokens)
                               if chat_template else None)
        self._clean_up = clean_up_tokenization_spaces
        self._byte_level = type(backend.decoder).__name__ == "ByteLevel"

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelTokenizer":
        """Load tokenizer.json, tokenizer_config.json and the chat template of a local directory."""
        path = Path(model_dir)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"--model {path}: no tokenizer.json there (a Hugging Face fast "
                             f"tokenizer is required)")
        config = _read_json(path / "tokenizer_config.json")
        return cls(Tokenizer.from_file(str(tokenizer_file)), path.name,
                   chat_template=find_chat_template(path, config),
                   special_tokens=read_special_tokens(path, config),
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces",
                                                                False)))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (base vocabulary plus added tokens)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.special_tokens.get("eos_token")
        token_id = None if eos is None else self._backend.token_to_id(eos)
        return [] if token_id is None else [token_id]

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Text -> ids; add_special_tokens None means the tokenizer's default (True, like HF)."""
        add = True if add_special_tokens is None else add_special_tokens
        return self._backend.encode(text, add_special_tokens=add).ids

    def render_chat(self, turns: Sequence[ChatTurn]) -> str:
        """Chat -> prompt text with the model's chat template and the generation prompt."""
        if self._chat_template is None:
            raise ValueError(f"chat: model {self.name} has no chat template; send a prompt")
        return self._chat_template.render(
            [{"role": turn.role, "content": turn.content} for turn in turns])

    def chat_ids(self, turns: Sequence[ChatTurn]) -> list[int]:
        """Chat -> ids: the template already holds the special tokens, so add none again."""
        return self.encode(self.render_chat(turns), add_special_tokens=False)

    def decode_stream_piece(self, token_ids: Sequence[int]) -> str:
        """Fast decode of a window of ids (special tokens skipped, no cleanup): the reference
        the streaming detokenizer's deltas are tested against."""
        return self._backend.decode(list(token_ids), skip_special_tokens=True)

    @property
    def stream_decoder(self) -> Tokenizer:
        """What the streaming detokenizer decodes with: the Rust tokenizer itself, so its steps
        run in `decoders.DecodeStream` (special tokens skipped there, as decode_stream_piece)."""
        return self._backend

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Full decode as Hugging Face does it, incl. clean_up_tokenization_spaces if configured."""
        text = self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for before, after in _CLEANUP:
                text = text.replace(before, after)
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a token may hold part of a UTF-8 character)."""
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and all(char in _BYTE_LEVEL_CHARS for char in piece):
            return bytes(_BYTE_LEVEL_CHARS[char] for char in piece)
        return self._backend.decode([token_id], skip_special_tokens=False).encode("utf-8")
