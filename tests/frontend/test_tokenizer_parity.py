"""ModelTokenizer (tokenizers + Jinja, no transformers) matches transformers.AutoTokenizer."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.fakes.tiny_tokenizer import DEFAULT_MODEL_DIR, has_default_model, save_tiny_model_dir
from tokenizer_svc.schema import ChatTurn
from tokenizer_svc.tokenizer import ModelTokenizer

CHATS = [
    [ChatTurn("user", "hi")],
    [ChatTurn("system", "Be brief."), ChatTurn("user", "What is 6×7? 你好 😀"),
     ChatTurn("assistant", "42"), ChatTurn("user", "Thanks!")],
]
TEXTS = ["Hello world", " leading space, émigré 😀 你好\n\nnew lines", "<|im_end|> literal"]


def model_dirs(tmp_path: Path) -> list[Path]:
    dirs = [save_tiny_model_dir(tmp_path / "tiny")]
    if has_default_model():
        dirs.append(DEFAULT_MODEL_DIR)
    return dirs


def test_matches_auto_tokenizer(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    for model_dir in model_dirs(tmp_path):
        ours = ModelTokenizer.from_pretrained(model_dir)
        theirs = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        assert ours.vocab_size == len(theirs)
        assert ours.eos_token_ids == [theirs.eos_token_id]
        assert ours.has_chat_template == bool(theirs.chat_template)
        for text in TEXTS:
            assert ours.encode(text) == theirs.encode(text)
            assert ours.encode(text, False) == theirs.encode(text, add_special_tokens=False)
            ids = theirs.encode(text) + [theirs.eos_token_id]
            for skip in (False, True):
                assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)
        for chat in CHATS:
            messages = [{"role": t.role, "content": t.content} for t in chat]
            rendered = theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
            assert ours.render_chat(chat) == rendered
            assert ours.chat_ids(chat) == theirs.encode(rendered, add_special_tokens=False)


def test_service_tokenizer_does_not_import_torch(tmp_path: Path) -> None:
    import subprocess
    code = ("import sys; from tokenizer_svc.tokenizer import ModelTokenizer; "
            "from tokenizer_svc.schema import ChatTurn; import tokenizer_svc.app; "
            f"t = ModelTokenizer.from_pretrained({str(model_dirs(tmp_path)[-1])!r}); "
            "t.chat_ids([ChatTurn('user', 'hi')]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert result.returncode == 0, result.stderr


def test_missing_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no tokenizer.json"):
        ModelTokenizer.from_pretrained(tmp_path)


def test_template_errors_are_value_errors(tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir(tmp_path / "strict")
    (model_dir / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tokenizer = ModelTokenizer.from_pretrained(model_dir)
    assert tokenizer.render_chat([ChatTurn("user", "a"), ChatTurn("assistant", "b")]) == "ab"
    with pytest.raises(ValueError, match="chat template rejected the messages: first must be"):
        tokenizer.render_chat([ChatTurn("system", "x")])
