"""Next-token sampling for a batch of rows, each with its own SamplingParams.

Order of operations per row (greedy rows stop after step 1):
  0. grammar mask: -inf on tokens the row's response_format forbids (constrained rows only;
     engine_svc/grammar.py), so penalties, sampling and logprobs see allowed tokens only
  0b. logit bias (after the mask): the request's logit_bias plus -inf on eos/stop ids before
     min_tokens (only rows that have one; a batch without any skips it)
  1. penalties (repetition over prompt+output, presence/frequency over output) -> greedy argmax
  2. temperature scaling
  3. top-k and top-p (one sort; one topk if every row has a top_k), then min-p (vs the top token)
  4. exponential race: token = argmax(p_i / E_i), E_i ~ Exp(1) drawn as -log U,
     i.e. argmax(score_i - log E_i)

Seeded rows draw their noise ([vocab] per step) from their own generator, so a seeded row yields
the same tokens whatever batch it sits in; unseeded rows share the sampler's generator. The
runner seeds that generator anew for every token (`seeded_generator`: a mix of the request's
seed and the token's position), so a token's noise depends on (seed, position) alone, not on
the generator's history: a request resumed elsewhere with its tokens so far continues exactly. The
returned logprobs describe the model's distribution after steps 0 and 0b (log-softmax of the
masked logits plus the logit bias: a banned token has logprob -inf), before penalties and
temperature.
Rows' params are assumed already validated (SamplingParams.validate at admission).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine_svc.grammar import TokenMask, apply_token_mask
from engine_svc.params import SamplingParams
from kernels import reference

_NEG_INF = float("-inf")
_NEUTRAL = SamplingParams()  # stands in for greedy rows while sampling; never mutated
_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def position_seed(seed: int, position: int) -> int:
    """Seed of the noise for the token at `position` (0-based, prompt included) of a request
    seeded with `seed`: splitmix64 of both, so nearby seeds and positions are unrelated; < 2^63."""
    return _splitmix64(_splitmix64(seed) ^ position) >> 1


def seeded_generator(generator: torch.Generator | None, seed: int, position: int,
                     device: torch.device) -> torch.Generator:
    """`generator` (a new one when None) seeded for the token at `position`."""
    if generator is None:
        generator = torch.Generator(device=device)
    return generator.manual_seed(position_seed(seed, position))


@dataclass(slots=True)
class SamplerOutput:
    """Per-row results of one sampling step."""

    token_ids: torch.Tensor  # [batch] int64
    logprobs: torch.Tensor | None  # [batch] float32, raw-logit log-softmax at the chosen token
    top_ids: torch.Tensor | None  # [batch, k] int64, k = max top_logprobs in the batch
    top_logprobs: torch.Tensor | None  # [batch, k] float32, raw-logit log-softmax, descending


class Sampler:
    """Turns a batch of logits into next tokens, one SamplingParams per row."""

    def __init__(self, vocab_size: int, device: torch.device, seed: int | None = None,
                 argmax: Callable[[torch.Tensor], torch.Tensor] = reference.argmax_rows) -> None:
        """`argmax`: the backend's row argmax for all-greedy batches (KernelOps.argmax_rows;
        the CPU one is a C loop), torch's by default."""
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._argmax_rows = argmax
        self._generator = torch.Generator(device=self.device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None],
                 prompt_ids: list[Sequence[int]],
                 output_ids: list[Sequence[int]], need_logprobs: bool = True,
                 logit_bias: Sequence[Mapping[int, float] | None] | None = None,
                 token_mask: TokenMask | None = None) -> SamplerOutput:
        """Sample one token per row; `need_logprobs=False` skips the log-softmax work.

        logit_bias: per row, token id -> value added to its logit (-inf bans it), or None.
        token_mask: the allowed tokens of the constrained rows (None: no row is constrained).
        """
        raw = self._checked_logits(logits, params, generators, prompt_ids, output_ids)
        if token_mask is not None:
            apply_token_mask(raw, token_mask)  # in place
        if logit_bias is not None:
            raw = apply_logit_bias(raw, logit_bias)
        any_penalty = any(p.has_penalties for p in params)
        all_greedy = all(p.greedy for p in params)
        if all_greedy and not any_penalty:
            token_ids = self._argmax_rows(raw)  # fast path: no sort, no per-row work
        else:
            token_ids = self._choose(raw, params, generators, prompt_ids, output_ids)
        top_k = min(max((p.top_logprobs for p in params), default=0), self.vocab_size)
        top_ids = top_logprobs = logprobs = None
        if not need_logprobs and top_k == 0:
            return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs)
        log_norm = torch.logsumexp(raw, dim=-1)  # [batch]
        logprobs = raw.gather(1, token_ids[:, None]).squeeze(1) - log_norm  # [batch]
        if top_k > 0:
            top_values, top_ids = raw.topk(top_k, dim=-1)  # [batch, k], descending
            top_logprobs = top_values - log_norm[:, None]
        return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs)

    def _checked_logits(self, logits: torch.Tensor, params: list[SamplingParams],
                        generators: list[torch.Generator | None],
                        prompt_ids: list[Sequence[int]],
                        output_ids: list[Sequence[int]]) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits must have at least vocab_size={self.vocab_size} columns, "
                             f"got {logits.shape[1]}")
        batch = logits.shape[0]
        for name, rows in (("params", params), ("generators", generators),
                           ("prompt_ids", prompt_ids), ("output_ids", output_ids)):
            if len(rows) != batch:
                raise ValueError(f"{name} must have one entry per logits row ({batch}), "
                                 f"got {len(rows)}")
        # Columns past vocab_size (a padded lm_head) are never sampled.
        return logits[:, :self.vocab_size].float()  # [batch, vocab]

    def _choose(self, raw: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None],
                prompt_ids: list[Sequence[int]],
                output_ids: list[Sequence[int]]) -> torch.Tensor:
        """Token ids for a batch that needs penalties and/or random sampling."""
        penalised = apply_penalties(raw, params, prompt_ids, output_ids)  # [batch, vocab]
        greedy = [p.greedy for p in params]
        if all(greedy):
            return penalised.argmax(dim=-1)
        device = raw.device
        # Greedy rows get neutral settings; their sampled value is replaced below.
        sampling = [_NEUTRAL if g else p for p, g in zip(params, greedy)]
        temperature = _row_tensor([p.temperature for p in sampling], torch.float32, device)
        scores = _filter(penalised / temperature[:, None], sampling)  # [batch, vocab]
        log_noise = self._log_exponential_noise(greedy, generators, raw.shape, device)
        sampled = (scores - log_noise).argmax(dim=-1)  # [batch]: argmax_i p_i / E_i
        if any(greedy):
            greedy_rows = _row_tensor(greedy, torch.bool, device)
            sampled = torch.where(greedy_rows, penalised.argmax(dim=-1), sampled)
        return sampled

    def _log_exponential_noise(self, greedy: list[bool],
                               generators: list[torch.Generator | None],
                               shape: torch.Size, device: torch.device) -> torch.Tensor:
        """log E, E ~ Exp(1) as -log U: [batch, vocab]; seeded rows use their own generator
        (seeded per token by the runner: `seeded_generator`), the rest the sampler's.

        Every sampled row consumes exactly [vocab] uniforms per step; greedy rows get log E = 0.
        U lies in [0, 1): U = 0 gives E = inf (that token just loses), and E > 0 always.
        """
        unseeded = [i for i, (g, gen) in enumerate(zip(greedy, generators))
                    if not g and gen is None]
        if len(unseeded) == shape[0]:
            uniform = torch.empty(shape, dtype=torch.float32, device=device)
            uniform.uniform_(generator=self._generator)
        else:
            uniform = torch.full(shape, math.exp(-1.0), dtype=torch.float32, device=device)
            if unseeded:
                shared = torch.empty((len(unseeded), shape[1]), dtype=torch.float32,
                                     device=device).uniform_(generator=self._generator)
                uniform[_row_tensor(unseeded, torch.int64, device)] = shared
            for row, (g, gen) in enumerate(zip(greedy, generators)):
                if not g and gen is not None:
                    uniform[row].uniform_(generator=gen)  # [vocab] from the row's own stream
        return uniform.log_().neg_().log_()


def _filter(scores: torch.Tensor, sampling: list[SamplingParams]) -> torch.Tensor:
    """Apply top-k, top-p and min-p to temperature-scaled scores [batch, vocab]."""
    device = scores.device
    vocab = scores.shape[1]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in sampling):
        top_k = top_p = None
        candidates = vocab
        if any(p.top_k > 0 for p in sampling):
            top_k = _row_tensor([p.top_k for p in sampling], torch.int64, device)
            sampled_top_k = [p.top_k for p in sampling if p is not _NEUTRAL]
            if all(k > 0 for k in sampled_top_k):  # greedy rows' results are discarded
                candidates = min(vocab, max(sampled_top_k))
        if any(p.top_p < 1.0 for p in sampling):
            top_p = _row_tensor([p.top_p for p in sampling], torch.float32, device)
        scores = mask_top_k_top_p(scores, top_k, top_p, candidates)
    if any(p.min_p > 0.0 for p in sampling):
        min_p = _row_tensor([p.min_p for p in sampling], torch.float32, device)
        scores = mask_min_p(scores, min_p)
    return scores


def apply_logit_bias(logits: torch.Tensor,
                     biases: Sequence[Mapping[int, float] | None]) -> torch.Tensor:
    """logits [batch, vocab] plus each row's bias (a copy; the input itself when no row has one).

    Token ids must be < vocab (validated at admission). One scatter over all biased entries.
    """
    if len(biases) != logits.shape[0]:
        raise ValueError(f"logit_bias must have one entry per logits row ({logits.shape[0]}), "
                         f"got {len(biases)}")
    rows = [i for i, bias in enumerate(biases) if bias]
    if not rows:
        return logits
    sizes = [len(biases[i]) for i in rows]
    row_index = np.repeat(np.asarray(rows, dtype=np.int64), sizes)  # [entries]
    token_index = np.fromiter((t for i in rows for t in biases[i]), np.int64, sum(sizes))
    values = np.fromiter((v for i in rows for v in biases[i].values()), np.float32, sum(sizes))
    biased = logits.clone()
    biased.index_put_((_to_device(torch.from_numpy(row_index), logits.device),
                       _to_device(torch.from_numpy(token_index), logits.device)),
                      _to_device(torch.from_numpy(values), logits.device), accumulate=True)
    return biased


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    prompt_ids: list[Sequence[int]],
                    output_ids: list[Sequence[int]]) -> torch.Tensor:
    """Repetition (prompt+output, HF style) then presence/frequency (output, OpenAI style)."""
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    device = logits.device
    vocab = logits.shape[1]
    chosen = [params[i] for i in rows]
    row_index = _row_tensor(rows, torch.int64, device)
    sub = logits[row_index]  # [n_rows, vocab] (a copy)
    output_counts = torch.zeros(sub.shape, dtype=torch.float32, device=device)
    output_index = _flat_token_index([output_ids[i] for i in rows], vocab, device)
    output_counts.view(-1).scatter_add_(
        0, output_index, torch.ones(output_index.shape, dtype=torch.float32, device=device))
    if any(p.repetition_penalty != 1.0 for p in chosen):
        present = output_counts > 0  # [n_rows, vocab]
        prompt_index = _flat_token_index(
            [prompt_ids[i] if params[i].repetition_penalty != 1.0 else () for i in rows],
            vocab, device)
        present.view(-1)[prompt_index] = True
        penalty = _row_tensor([p.repetition_penalty for p in chosen], torch.float32, device)
        penalty = penalty[:, None]
        scaled = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(present, scaled, sub)
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in chosen):
        presence = _row_tensor([p.presence_penalty for p in chosen], torch.float32, device)
        frequency = _row_tensor([p.frequency_penalty for p in chosen], torch.float32, device)
        sub = sub - (presence[:, None] * (output_counts > 0) + frequency[:, None] * output_counts)
    if len(rows) == logits.shape[0]:
        return sub
    return logits.index_copy(0, row_index, sub)


def mask_top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor | None,
                     top_p: torch.Tensor | None, candidates: int) -> torch.Tensor:
    """Set to -inf what top-k (0 = off) and then top-p (1 = off) drop.

    scores: [batch, vocab]; top_k: [batch] int64 or None; top_p: [batch] float32 or None.
    Only the `candidates` best tokens of each row can survive: pass vocab (one full sort) unless
    every row has 0 < top_k <= candidates (then one topk over the candidates replaces the sort).
    Top-p keeps the smallest prefix (by descending prob, after top-k) whose mass >= top_p.
    """
    vocab = scores.shape[1]
    if candidates >= vocab:
        best, best_ids = scores.sort(dim=-1, descending=True)  # [batch, vocab]
    else:
        best, best_ids = scores.topk(candidates, dim=-1)  # [batch, candidates], descending
    drop = torch.zeros(best.shape, dtype=torch.bool, device=scores.device)
    if top_k is not None:
        ranks = torch.arange(best.shape[1], device=scores.device)[None, :]  # [1, candidates]
        keep_count = torch.where(top_k > 0, top_k, vocab)  # [batch]
        drop = ranks >= keep_count[:, None]  # [batch, candidates], by rank
    if top_p is not None:
        probs = best.masked_fill(drop, _NEG_INF).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # [batch, candidates]
        # Rows with top_p == 1 are left alone: float32 cumsum may reach 1.0 before the tail.
        drop |= (mass_before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    kept = best.masked_fill(drop, _NEG_INF)  # [batch, candidates]
    return torch.full_like(scores, _NEG_INF).scatter_(1, best_ids, kept)


def mask_min_p(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf tokens whose prob < min_p * max prob. scores: [batch, vocab]; min_p: [batch]."""
    row_max = scores.max(dim=-1, keepdim=True).values  # [batch, 1]
    threshold = row_max + torch.log(min_p)[:, None]  # log(0) = -inf keeps everything
    return scores.masked_fill(scores < threshold, _NEG_INF)


def _row_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One host->device copy of a per-row parameter list."""
    return _to_device(torch.tensor(values, dtype=dtype), device)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without waiting for the device: pinned + non_blocking (a pageable copy would sync)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _flat_token_index(seqs: list[Sequence[int]], vocab: int,
                      device: torch.device) -> torch.Tensor:
    """Index into a flattened [len(seqs), vocab] table of every token of every sequence."""
    arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    if lengths.sum() == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    tokens = np.concatenate(arrays)
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}), got min {tokens.min()} "
                         f"max {tokens.max()}")
    rows = np.repeat(np.arange(len(arrays), dtype=np.int64), lengths)
    return _to_device(torch.from_numpy(rows * vocab + tokens), device)
