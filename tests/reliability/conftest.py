"""Fixtures of the reliability suite: one shared engine + tokenizer stack on loopback."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.harness import Proc, start_stack

SHARED_MAX_MESSAGE_BYTES = 65536


@dataclass
class Stack:
    """A running engine and the tokenizer service in front of it."""

    engine: Proc
    tokenizer: Proc
    model_dir: Path


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability-logs")


@pytest.fixture(scope="session")
def stack(default_model_dir: Path, log_dir: Path):
    """Engine + tokenizer service: 512-token context, 2048-token pool, 64 KiB messages, and
    4 new tokens when a request leaves max_new_tokens unset."""
    limit = str(SHARED_MAX_MESSAGE_BYTES)
    engine, tokenizer = start_stack(
        default_model_dir, log_dir, engine_extra=("--max-message-bytes", limit),
        tokenizer_extra=("--max-message-bytes", limit, "--default-max-new-tokens", "4"))
    try:
        yield Stack(engine, tokenizer, default_model_dir)
    finally:
        tokenizer.stop()
        engine.stop()
