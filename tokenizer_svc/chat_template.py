"""Chat templates: find a model's Jinja chat template and render it the way Hugging Face does.

Rendering matches `transformers`' `apply_chat_template(..., tokenize=False)` (sandboxed Jinja,
trim_blocks + lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that
keeps non-ASCII text) without importing transformers, which would pull in torch.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def find_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja, chat_template.json or tokenizer_config."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    json_file = model_dir / "chat_template.json"
    if json_file.is_file():
        return _pick_default(json.loads(json_file.read_text(encoding="utf-8")).get("chat_template"))
    return _pick_default(tokenizer_config.get("chat_template"))


def _pick_default(template: Any) -> str | None:
    """A template is a string, or a list of {name, template} where 'default' is the one."""
    if template is None or isinstance(template, str):
        return template or None
    named = {entry["name"]: entry["template"] for entry in template}
    return named.get("default")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


class ChatTemplate:
    """A compiled chat template; render(messages) gives the prompt text."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        self._template = environment.from_string(source)
        self._special_tokens = dict(special_tokens)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render; ValueError when the template rejects the messages (e.g. role order)."""
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **self._special_tokens)
        except jinja2.exceptions.TemplateError as error:
            raise ValueError(f"chat: the chat template rejected the messages: {error}") from error
