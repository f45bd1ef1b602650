"""engine_svc/grammar.py: masks equal xgrammar's reference, the compiled-grammar LRU, parser
errors naming the field, choice escaping, matcher states (tiny byte-level tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine_svc.grammar import (GrammarCache, GrammarState, ResponseFormat, TokenMask, TokenMasks,
                                apply_token_mask, blocked_tokens_numpy, blocked_tokens_torch,
                                choice_grammar)
from tests.fakes.tiny_tokenizer import byte_level_bpe

xgr = pytest.importorskip("xgrammar")
VOCAB = 320
EOS = 2  # <|im_end|> in the tiny tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("grammar-tokenizer")
    byte_level_bpe(vocab_size=VOCAB).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def cache(tokenizer_dir) -> GrammarCache:
    return GrammarCache(tokenizer_dir, VOCAB, [EOS], max_entries=3)


def _random_bitmask(rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31 - 1, (rows, (VOCAB + 31) // 32), dtype=torch.int32,
                         generator=generator)


def test_both_unpackings_match_xgrammars_apply_on_all_and_some_rows() -> None:
    bitmask = _random_bitmask(5, seed=1)
    logits = torch.randn(5, VOCAB)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=VOCAB)
    for unpack in (blocked_tokens_numpy, blocked_tokens_torch):
        assert torch.equal(logits.masked_fill(unpack(bitmask, VOCAB), float("-inf")), expected)
    masked = logits.clone()
    apply_token_mask(masked, TokenMask([0, 1, 2, 3, 4], torch.arange(5), bitmask, all_rows=True))
    assert torch.equal(masked, expected)
    # rows 1 and 3 only: the others keep every logit
    some = logits.clone()
    apply_token_mask(some, TokenMask([1, 3], torch.tensor([1, 3]), bitmask[:2], all_rows=False))
    reference = logits.clone()
    xgr.apply_token_bitmask_inplace(reference, torch.cat([bitmask[:1], bitmask[:1],
                                                          bitmask[1:2], bitmask[1:2],
                                                          bitmask[:1]]),
                                    vocab_size=VOCAB, indices=[1, 3])
    assert torch.equal(some, reference)
    assert torch.equal(some[[0, 2, 4]], logits[[0, 2, 4]])


def test_mask_applies_to_a_view_of_wider_padded_logits() -> None:
    bitmask = _random_bitmask(2, seed=2)
    padded = torch.randn(2, VOCAB + 64)
    view = padded[:, :VOCAB]
    before = padded.clone()
    apply_token_mask(view, TokenMask([0, 1], torch.arange(2), bitmask, all_rows=True))
    assert torch.equal(padded[:, VOCAB:], before[:, VOCAB:])  # padding untouched
    assert torch.equal(view.isinf(), blocked_tokens_numpy(bitmask, VOCAB))


def test_cache_is_a_bounded_lru_keyed_by_kind_and_text(cache: GrammarCache) -> None:
    first = cache.compile(ResponseFormat("regex", "[ab]+"))
    hits, misses = cache.hits, cache.misses
    assert cache.compile(ResponseFormat("regex", "[ab]+")) is first
    assert (cache.hits, cache.misses) == (hits + 1, misses)
    cache.compile(ResponseFormat("grammar", "root ::= \"[ab]+\""))  # same text, other kind
    assert cache.misses == misses + 1
    cache.compile(ResponseFormat("choice", choices=("x", "y")))
    cache.compile(ResponseFormat("json_object"))  # 4 entries > 3: the oldest goes
    assert len(cache) == 3
    cache.compile(ResponseFormat("regex", "[ab]+"))
    assert cache.misses == misses + 4  # compiled again after its eviction


@pytest.mark.parametrize("fmt, parser_words", [
    (ResponseFormat("json_schema", '{"type": "objectx"}'), 'Unsupported type "objectx"'),
    (ResponseFormat("json_schema", "{not json"), "Failed to parse JSON"),
    (ResponseFormat("regex", "[a-"), "Unclosed '['"),
    (ResponseFormat("grammar", "root ::= foo"), 'Rule "foo" is not defined'),
    (ResponseFormat("grammar", "start ::= \"a\""), "root"),
])
def test_compile_errors_name_the_field_and_carry_the_parsers_message(
        cache: GrammarCache, fmt: ResponseFormat, parser_words: str) -> None:
    with pytest.raises(ValueError) as error:
        cache.compile(fmt)
    message = str(error.value)
    assert message.startswith(f"response_format.{fmt.kind}: "), message
    assert parser_words in message
    assert ".cc:" not in message and "Check failed" not in message  # xgrammar's prefix is gone


def test_shape_errors_before_compiling(cache: GrammarCache) -> None:
    for fmt, words in [(ResponseFormat("xml", "x"), "response_format must be one of"),
                       (ResponseFormat("regex", ""), "response_format.regex must not be empty"),
                       (ResponseFormat("choice"), "response_format.choice must hold"),
                       (ResponseFormat("choice", choices=("a", "")), "response_format.choice")]:
        with pytest.raises(ValueError, match=words.replace(".", r"\.")):
            cache.compile(fmt)


def _accepts(cache: GrammarCache, fmt: ResponseFormat, text: str) -> GrammarState:
    state = GrammarState(cache.compile(fmt))
    assert state.matcher.accept_string(text), text
    return state


def test_choice_matches_exactly_its_strings_with_quotes_backslashes_and_unicode(
        cache: GrammarCache) -> None:
    choices = ('say "hi"', "back\\slash", "two\nlines", "caf\u00e9 \U0001F600", "yes", "yes!")
    assert choice_grammar(choices).startswith('root ::= "say \\"hi\\"" | ')
    fmt = ResponseFormat("choice", choices=choices)
    for choice in choices:
        state = _accepts(cache, fmt, choice)
        assert state.completed and not state.terminated
        assert state.accept(EOS) and state.terminated  # the grammar's end takes the eos
    assert not GrammarState(cache.compile(fmt)).matcher.accept_string("say hi")
    prefix = _accepts(cache, fmt, "yes")  # "yes" is complete, yet "!" may still follow
    assert prefix.completed and prefix.accept(_token(cache, "!"))


def _tokenizer(cache: GrammarCache):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(cache.model_dir / "tokenizer.json"))


def _token(cache: GrammarCache, text: str) -> int:
    ids = _tokenizer(cache).encode(text).ids
    assert len(ids) == 1
    return ids[0]


def test_json_object_means_any_object_and_compact_json(cache: GrammarCache) -> None:
    fmt = ResponseFormat("json_object")
    assert _accepts(cache, fmt, '{"a": [1, 2], "b": {"c": null}}').completed
    assert not GrammarState(cache.compile(fmt)).matcher.accept_string("[1, 2]")
    schema = ResponseFormat("json_schema", json.dumps({"type": "object", "properties": {
        "n": {"type": "integer"}}, "required": ["n"]}))
    assert _accepts(cache, schema, '{"n": 5}').completed
    assert not GrammarState(cache.compile(schema)).matcher.accept_string('{\n  "n": 5}')


def test_token_masks_fill_only_constrained_rows_and_create_matchers(cache: GrammarCache) -> None:
    class Seq:  # what TokenMasks reads of a Sequence
        def __init__(self, fmt):
            self.sampling = type("S", (), {"response_format": fmt})()
            self.grammar = None

        def generated_ids(self) -> list[int]:
            return []

    fmt = cache.prepare(ResponseFormat("choice", choices=("ab", "ba")))
    seqs = [Seq(None), Seq(fmt), Seq(None), Seq(fmt)]
    masks = TokenMasks(VOCAB, max_rows=2, device=torch.device("cpu"))
    mask = masks.build(seqs, [1, 3])
    assert mask.rows == [1, 3] and not mask.all_rows and mask.bitmask.shape[0] == 2
    assert seqs[0].grammar is None and seqs[1].grammar is not seqs[3].grammar
    allowed = (~blocked_tokens_numpy(mask.bitmask, VOCAB)).nonzero()  # [k, 2]: (row, token)
    for row in (0, 1):
        tokens = allowed[allowed[:, 0] == row, 1].tolist()
        assert {_token(cache, "a"), _token(cache, "b")} <= set(tokens)
        texts = [_tokenizer(cache).decode([t]) for t in tokens]
        assert all(text and ("ab".startswith(text) or "ba".startswith(text)) for text in texts)
    more = [Seq(fmt) for _ in range(3)]  # more rows than max_rows: the buffer grows
    assert masks.build(more, [0, 1, 2]).all_rows
