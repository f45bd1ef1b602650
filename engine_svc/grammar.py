"""Structured output: response_format -> compiled grammar -> per-request matcher -> token mask.

The grammar engine is xgrammar. It is imported on first use (the first constrained request),
so an engine that never sees one pays nothing, not even the import. Pieces:

- `ResponseFormat`: the request's constraint (json_schema, json_object, regex, grammar, choice).
- `GrammarCache`: one xgrammar compiler per engine, built from the model's tokenizer, and a
  bounded LRU of compiled grammars keyed by (kind, text). Compile errors become ValueError
  naming the field (`response_format.json_schema: <the parser's message>`).
- `GrammarState`: one request's matcher; the engine advances it with each accepted token.
- `TokenMasks.build`: fills the allowed-token bitmask of the step's constrained rows only;
  `apply_token_mask` sets every forbidden logit of those rows to -inf before sampling.

Ending: xgrammar allows only the stop tokens (the model's eos ids) once the grammar is
complete, so a constrained request ends with finish reason EOS, its eos token included.
json_object is the schema {"type": "object"} without strict mode (any object; xgrammar's builtin
JSON grammar would also admit a top-level array). JSON output is compact (no free whitespace:
a small model could otherwise emit whitespace until max_new_tokens).
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import xgrammar

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
DEFAULT_CACHE_ENTRIES = 64
MAX_ERROR_CHARS = 400
_ANY_OBJECT_SCHEMA = '{"type": "object"}'
# xgrammar prefixes its errors with "[hh:mm:ss] /path/file.cc:123: " and often "Check failed: ..."
_ERROR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


@dataclass(slots=True)
class ResponseFormat:
    """A structured-output constraint: `kind` is one of KINDS; `text` holds the JSON schema,
    regex or EBNF grammar (root rule `root`), `choices` the strings of a choice."""

    kind: str
    text: str = ""
    choices: tuple[str, ...] = ()
    compiled: Any = field(default=None, compare=False, repr=False)  # set by GrammarCache.prepare

    @property
    def field_name(self) -> str:
        """The request field an error names, e.g. response_format.json_schema."""
        return f"response_format.{self.kind}"

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar depends on: (kind, text)."""
        if self.kind == "choice":
            return self.kind, json.dumps(list(self.choices))
        return self.kind, self.text

    def validate(self) -> None:
        """Shape checks that need no parser; ValueError naming the field."""
        if self.kind not in KINDS:
            raise ValueError(f"response_format must be one of {', '.join(KINDS)}, "
                             f"got {self.kind!r}")
        if self.kind == "choice":
            if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                raise ValueError("response_format.choice must hold at least 1 value, "
                                 "each a non-empty string")
        elif self.kind != "json_object" and not self.text:
            raise ValueError(f"{self.field_name} must not be empty")


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar whose strings are exactly `choices` (JSON's string escapes are EBNF's;
    non-ASCII stays UTF-8: EBNF has no surrogate pairs)."""
    literals = (json.dumps(choice, ensure_ascii=False) for choice in choices)
    return "root ::= " + " | ".join(literals)


def _parser_message(error: Exception) -> str:
    message = _ERROR_PREFIX.sub("", str(error).strip())
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "..."


class GrammarCache:
    """Compiles response formats against the model's tokenizer and keeps the most recent
    `max_entries` compiled grammars (LRU). Thread-safe: the gRPC edge compiles in worker
    threads, the engine thread looks up."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: list[int],
                 max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._compiler: Any = None
        self._lock = threading.Lock()           # guards the LRU and the counters
        self._build_lock = threading.Lock()     # one compiler build

    def __len__(self) -> int:
        return len(self._compiled)

    def prepare(self, fmt: ResponseFormat) -> ResponseFormat:
        """A copy of `fmt` carrying its compiled grammar (ValueError naming the field)."""
        return replace(fmt, compiled=self.compile(fmt))

    def compile(self, fmt: ResponseFormat) -> Any:
        """The compiled grammar of `fmt`, from the cache or compiled now."""
        fmt.validate()
        key = fmt.key
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                self.hits += 1
                return compiled
            self.misses += 1
        compiled = self._compile(fmt)   # outside the lock: compiles may run side by side
        with self._lock:
            self._compiled[key] = compiled
            self._compiled.move_to_end(key)
            while len(self._compiled) > self.max_entries:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, fmt: ResponseFormat) -> Any:
        compiler = self._get_compiler()
        try:
            if fmt.kind == "json_schema":
                return compiler.compile_json_schema(fmt.text, any_whitespace=False)
            if fmt.kind == "json_object":
                return compiler.compile_json_schema(_ANY_OBJECT_SCHEMA, any_whitespace=False,
                                                    strict_mode=False)
            if fmt.kind == "regex":
                return compiler.compile_regex(fmt.text)
            text = choice_grammar(fmt.choices) if fmt.kind == "choice" else fmt.text
            return compiler.compile_grammar(text, root_rule_name="root")
        except Exception as error:  # noqa: BLE001  (xgrammar raises RuntimeError and others)
            raise ValueError(f"{fmt.field_name}: {_parser_message(error)}") from None

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            with self._build_lock:
                if self._compiler is None:
                    self._compiler = self._build_compiler()
        return self._compiler

    def _build_compiler(self) -> Any:
        tokenizer_file = self.model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"response_format needs the model's tokenizer: no tokenizer.json "
                             f"in {self.model_dir}")
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                  stop_token_ids=self.eos_token_ids)
        return xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                   cache_enabled=False)   # our LRU is the cache


class GrammarState:
    """One request's grammar matcher: what it may generate next, advanced token by token."""

    __slots__ = ("matcher",)

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self.matcher: xgrammar.GrammarMatcher = xgr.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False (state unchanged) when the grammar forbids it."""
        return self.matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return self.matcher.is_terminated()

    @property
    def completed(self) -> bool:
        """What was accepted so far is a complete match (only a stop token may follow)."""
        return self.matcher.is_completed()

    def fork(self) -> GrammarState:
        """An independent copy in the same state (a forked sequence's own matcher)."""
        state = GrammarState.__new__(GrammarState)
        state.matcher = self.matcher.fork()
        return state


@dataclass(slots=True)
class TokenMask:
    """Allowed tokens of the constrained rows of one step."""

    rows: list[int]             # logits rows the mask applies to, ascending
    row_index: torch.Tensor     # [n] int64 on the logits' device
    bitmask: torch.Tensor       # [n, ceil(vocab / 32)] int32 (bit j of word w: token 32w + j)
    all_rows: bool              # rows == every row of the batch


class TokenMasks:
    """Per-runner mask builder: one reusable host bitmask, allocated at the first constrained
    step (an unconstrained engine never allocates it)."""

    def __init__(self, vocab_size: int, max_rows: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.max_rows = max_rows
        self.device = torch.device(device)
        self._bitmask: torch.Tensor | None = None
        self._batch: Any = None

    def build(self, seqs: list, rows: list[int]) -> TokenMask:
        """Fill the bitmask of `rows` (indices into seqs whose sampling has a response_format),
        creating a row's matcher on its first step."""
        import xgrammar as xgr

        if self._bitmask is None or len(rows) > self._bitmask.shape[0]:
            self._bitmask = xgr.allocate_token_bitmask(max(self.max_rows, len(rows)),
                                                       self.vocab_size)
            if self.device.type == "cuda":
                self._bitmask = self._bitmask.pin_memory()
            self._batch = xgr.BatchGrammarMatcher(max_threads=max(1, (os.cpu_count() or 2) // 2))
        matchers = []
        for row in rows:
            seq = seqs[row]
            if seq.grammar is None:
                seq.grammar = GrammarState(seq.sampling.response_format.compiled)
                for token in seq.generated_ids():   # resumed after failover: replay its tokens
                    seq.grammar.accept(token)
            matchers.append(seq.grammar.matcher)
        bitmask = self._bitmask[:len(rows)]  # [n, words]
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask)
        row_index = torch.tensor(rows, dtype=torch.int64)
        if self.device.type == "cuda":
            bitmask = bitmask.to(self.device, non_blocking=True)
            row_index = row_index.pin_memory().to(self.device, non_blocking=True)
        return TokenMask(rows, row_index, bitmask, all_rows=len(rows) == len(seqs))


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> None:
    """Set to -inf, in place, every logit of the mask's rows that the grammar forbids.

    logits: [batch, vocab] (a view of wider logits is fine); mask.bitmask covers >= vocab.
    """
    vocab = logits.shape[1]
    blocked = _blocked(mask.bitmask, vocab)  # [n, vocab] bool
    with torch.inference_mode():  # the model's logits are inference tensors
        if mask.all_rows:
            logits.masked_fill_(blocked, float("-inf"))
            return
        rows = logits.index_select(0, mask.row_index).masked_fill_(blocked, float("-inf"))
        logits.index_copy_(0, mask.row_index, rows)


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _blocked(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n, words] int32 bitmask -> [n, vocab] bool, True where the token is forbidden."""
    if bitmask.device.type == "cpu":
        return blocked_tokens_numpy(bitmask, vocab)
    return blocked_tokens_torch(bitmask, vocab)


def blocked_tokens_numpy(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The CPU unpacking: numpy unpacks the inverted bits in C (about 10x torch shifts on a
    CPU), and its 0/1 bytes are the bool tensor as they stand (no compare pass)."""
    inverted = np.invert(bitmask.numpy().view(np.uint8))  # int32 words are little-endian here
    bits = np.unpackbits(inverted, axis=1, bitorder="little")  # [n, 32 * words] 0/1
    return torch.from_numpy(bits).view(torch.bool)[:, :vocab]


def blocked_tokens_torch(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The device unpacking: shifts on the bitmask's own device (no host round trip)."""
    shifts = _BIT_SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32,
                                                            device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [n, words, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab] == 0
