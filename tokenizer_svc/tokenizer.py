"""The model's tokenizer: prompt/chat -> token ids, token ids -> text (no protobuf, no torch)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizer_svc.schema import ChatTurn


class ModelTokenizer:
    """Wraps a Hugging Face fast tokenizer with the operations the service needs."""

    def __init__(self, hf_tokenizer: Any, name: str) -> None:
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"tokenizer of {name} is not a fast (Rust `tokenizers`) tokenizer")
        self._hf = hf_tokenizer
        self._backend = backend  # tokenizers.Tokenizer: decode without Python-side cleanup
        self.name = name

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelTokenizer":
        """Load the tokenizer files of a local Hugging Face model directory (never a hub)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer  # slow import, only when a model is loaded

        path = Path(model_dir)
        if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
            raise ValueError(f"--model {path}: no tokenizer.json / tokenizer_config.json there")
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(hf_tokenizer, path.name)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (base vocabulary plus added tokens)."""
        return len(self._hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self._hf.eos_token_id
        return [] if eos is None else [int(eos)]

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Text -> ids; add_special_tokens None means the tokenizer's own default."""
        if add_special_tokens is None:
            return list(self._hf.encode(text))
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, turns: Sequence[ChatTurn]) -> str:
        """Chat -> prompt text with the model's chat template and the generation prompt."""
        if not self.has_chat_template:
            raise ValueError(f"chat: model {self.name} has no chat template; send a prompt")
        messages = [{"role": turn.role, "content": turn.content} for turn in turns]
        try:
            rendered = self._hf.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # jinja raises for e.g. unsupported role orders
            raise ValueError(f"chat: the chat template rejected the messages: {error}") from error
        return str(rendered)

    def chat_ids(self, turns: Sequence[ChatTurn]) -> list[int]:
        """Chat -> ids: the template already holds the special tokens, so add none again."""
        return self.encode(self.render_chat(turns), add_special_tokens=False)

    def decode_stream_piece(self, token_ids: Sequence[int]) -> str:
        """Fast decode used by the incremental detokenizer (special tokens skipped, no cleanup)."""
        return self._backend.decode(list(token_ids), skip_special_tokens=True)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Full decode as the Hugging Face tokenizer does it (Detokenize rpc)."""
        return str(self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens))
