"""Beam search in numpy alone, step for step the search of fairseq's ``SequenceGenerator`` (fairseq 0.12).

The network sits behind ``StepModel`` (ONNX Runtime in the runtime package, torch in the tests), so this module
imports numpy only. Every sentence and beam advances in one ``model.step`` call per step; a finished sentence
leaves the batch (``model.keep``), as fairseq drops it, so the rest of the search runs on fewer rows.

What fairseq does and this does too (``_generate``, ``finalize_hypos``, ``search.BeamSearch.step``):
- the target starts with eos; pad is never generated; ``unk_penalty`` is subtracted from unk's log-prob;
  eos is forbidden before ``min_len`` and forced at ``max_len``;
- ``max_len = min(int(max_len_a * S + max_len_b), max_len_cap)`` where S is the PADDED width of the batch
  (``src_tokens.shape[1]``, eos included), so one max length serves the whole batch;
- each step takes the top ``2 * beam`` candidates over ``beam * V`` (over the first beam only at step 0);
  an eos among the first ``beam`` of them is finalised (when not in a slot ignored since a previous
  finalisation), the best ``beam`` non-eos candidates continue; a sentence is done with ``beam`` hypotheses;
- a hypothesis's score is its summed log-prob / ``len ** lenpen``, len counting the eos.

Where it departs, on purpose:
- ``no_repeat_ngram_size`` blocks what fairseq's CUDA kernel blocks (an n-gram already in the hypothesis,
  the leading eos included). fairseq's CPU fallback compares against the padded end of its token buffer and
  so blocks nothing (fairseq issue #4709); size 1 is refused (it bans the leading eos, so nothing can end).
- Exact ties in scores: candidates are ordered by score, then by lower index; torch.topk leaves the order of
  ties unspecified, so on an exact tie the two may pick differently (random float weights never tie).

Notation: B sentences, K beam, N = B * K rows (row b * K + k is hypothesis k of sentence b), V vocabulary,
C candidates per sentence (2 * K), L = max_len.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class StepModel(Protocol):
    def start(self, src_tokens: np.ndarray, beam: int) -> None:
        """Run the encoder and prepare decoder states for N = B * beam rows (every row of a sentence identical).

        src_tokens: int64 [B, S], left-padded with pad, each row ending in eos.
        """

    def step(self, tokens: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Continue row i from the state of row ``order[i]``, feed ``tokens[i]``; return the next token's log-probs.

        tokens: int64 [N] (all eos at the first step); order: int64 [N] (identity at the first step), indices into
        the previous step's rows (after ``keep``, N is smaller than there). Returns float32 [N, V], log_softmax applied.
        """

    def keep(self, sentences: np.ndarray) -> None:
        """Only these sentences go on (int64 [B'], positions in the current batch, ascending); the next ``step``'s
        ``order`` picks their rows out of the previous step's."""


class CandidateStepModel(StepModel, Protocol):
    """A ``StepModel`` that can also apply ``penalize`` itself and return each row's top ``k`` (export/candidates.py):
    the search then never sees [N, V]. Used unless ``no_repeat_ngram_size`` is set (it needs the hypotheses)."""

    vocab_size: int
    candidates: bool  # False: only ``step`` works (e.g. a graph exported without candidates)

    def step_candidates(self, tokens: np.ndarray, order: np.ndarray, step: int, max_len: int, options: "SearchOptions",
                        k: int) -> tuple[np.ndarray, np.ndarray]:
        """As ``step``, then ``penalize`` and ``top_candidates``: values float32 [N, k], tokens int64 [N, k]."""


@dataclass
class SearchOptions:
    """fairseq-generate's options of the same names; the defaults are ``lite translate``'s."""

    beam: int = 4
    lenpen: float = 1.0
    max_len_a: float = 1.2  # max output length = int(a * padded source width + b), eos not counted
    max_len_b: int = 10
    min_len: int = 1  # eos is forbidden at steps < min_len
    no_repeat_ngram_size: int = 0
    unk_penalty: float = 0.0

    def __post_init__(self):
        if self.beam < 1:
            raise ValueError(f"SearchOptions.beam = {self.beam}: must be >= 1")
        if self.min_len < 0:
            raise ValueError(f"SearchOptions.min_len = {self.min_len}: must be >= 0")
        if self.no_repeat_ngram_size == 1 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"SearchOptions.no_repeat_ngram_size = {self.no_repeat_ngram_size}: use 0 (off) or >= 2 "
                             "(1 would ban the leading eos, so no hypothesis could end)")


def left_pad(rows: list[np.ndarray], pad: int) -> np.ndarray:
    """Token rows -> int64 [B, S], left-padded with ``pad`` (as fairseq collates sources)."""
    width = max(len(r) for r in rows)
    batch = np.full((len(rows), width), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        batch[i, width - len(r):] = r
    return batch


@dataclass
class Hypothesis:
    tokens: np.ndarray  # int64 [T], ending in eos (the leading eos/bos not included)
    score: float  # sum(positional_scores) / T ** lenpen
    positional_scores: np.ndarray  # float32 [T], log-prob of each token (penalties included)


def search(model: StepModel, src_tokens: np.ndarray, *, eos: int, pad: int, unk: int, bos: int | None = None,
           options: SearchOptions | None = None, max_len_cap: int | None = None) -> list[list[Hypothesis]]:
    """Beam search over a batch: per sentence, ``options.beam`` hypotheses, best first.

    src_tokens: int64 [B, S], left-padded, rows ending in eos. bos: first target token (None: eos, as fairseq).
    options: None for the defaults. max_len_cap: the decoder's max positions minus 1 (fairseq's cap); None: no cap.
    """
    options = options or SearchOptions()
    src_tokens = np.asarray(src_tokens, dtype=np.int64)
    bsz, src_len = src_tokens.shape
    beam = options.beam
    max_len = int(options.max_len_a * src_len + options.max_len_b)
    if max_len_cap is not None:
        max_len = min(max_len, max_len_cap)
    if options.min_len > max_len:
        raise ValueError(f"SearchOptions.min_len = {options.min_len} exceeds the max length {max_len} of this batch "
                         "(max_len_a * source width + max_len_b, capped): lower min_len or raise max_len_b")
    n = bsz * beam
    cand_size = 2 * beam

    model.start(src_tokens, beam)
    tokens = np.full((n, max_len + 2), pad, dtype=np.int64)  # [N, L + 2]: bos, up to L tokens, eos
    tokens[:, 0] = eos if bos is None else bos
    scores = np.zeros((n, max_len + 1), dtype=np.float32)  # [N, L + 1] cumulative log-prob after each token
    cands_to_ignore = np.zeros((bsz, beam), dtype=bool)  # [B, K] candidate slots taken by finalised hypotheses
    finalized: list[list[Hypothesis]] = [[] for _ in range(bsz)]  # by sentence of the input
    running = list(finalized)  # the same lists, by position in the current (shrinking) batch
    finished = np.zeros(bsz, dtype=bool)  # [B]
    sents = np.arange(bsz)[:, None]  # [B, 1]: with a [B, C] index, picks per sentence (as take_along_axis, faster)
    bbsz_offsets = sents * beam  # [B, 1]
    order = np.arange(n, dtype=np.int64)  # [N]

    in_graph = options.no_repeat_ngram_size == 0 and getattr(model, "candidates", False)
    for step in range(max_len + 1):  # one extra step for the eos
        prev_scores = scores[:, step - 1].reshape(bsz, beam) if step > 0 else None
        if in_graph:  # the model applies the penalties and keeps each row's top candidates
            values, indices = model.step_candidates(tokens[:, step], order, step, max_len, options,
                                                    min(cand_size, model.vocab_size))
            _check_beam(beam, model.vocab_size)
            cand_scores, cand_indices, cand_beams = _beam_step_from_candidates(  # [B, C]
                values.reshape(bsz, beam, -1), indices.reshape(bsz, beam, -1), prev_scores, model.vocab_size)
        else:
            lprobs = np.array(model.step(tokens[:, step], order), dtype=np.float32)  # [N, V], a writable copy
            _check_beam(beam, lprobs.shape[1])
            penalize(lprobs, step, max_len, options, eos=eos, pad=pad, unk=unk)
            if options.no_repeat_ngram_size > 0:
                _block_repeated_ngrams(tokens[:, :step + 1], lprobs, options.no_repeat_ngram_size)
            cand_scores, cand_indices, cand_beams = _beam_step(lprobs.reshape(bsz, beam, -1), prev_scores)  # [B, C]
        cand_bbsz_idx = cand_beams + bbsz_offsets  # [B, C] row each candidate continues

        eos_mask = (cand_indices == eos) & (cand_scores != -np.inf)  # [B, C]
        eos_mask[:, :beam] &= ~cands_to_ignore
        _finalize(step, eos_mask[:, :beam], cand_bbsz_idx[:, :beam], cand_scores[:, :beam], tokens, scores,
                  running, finished, beam, max_len, options.lenpen, eos)
        if finished.all() or step >= max_len:
            break
        if finished.any():  # as fairseq: the finished sentences leave the batch
            alive = np.flatnonzero(~finished)  # [B']
            model.keep(alive)
            eos_mask, cand_bbsz_idx, cand_indices, cand_scores, cands_to_ignore = (
                a[alive] for a in (eos_mask, cand_bbsz_idx, cand_indices, cand_scores, cands_to_ignore))
            running = [running[i] for i in alive.tolist()]
            bsz = len(alive)
            finished = np.zeros(bsz, dtype=bool)
            sents = np.arange(bsz)[:, None]
            bbsz_offsets = sents * beam

        # the best `beam` candidates that are neither eos nor in an ignored slot continue
        eos_mask[:, :beam] |= cands_to_ignore
        active_mask = eos_mask * cand_size + np.arange(eos_mask.shape[1])  # [B, C], distinct per row
        active_hypos = np.argsort(active_mask, axis=1, kind="stable")[:, :beam]  # [B, K]
        cands_to_ignore = active_mask[sents, active_hypos] >= cand_size
        active_bbsz_idx = cand_bbsz_idx[sents, active_hypos].reshape(-1)  # [N]

        tokens = tokens[active_bbsz_idx]  # [N', L + 2], rows of the previous step's
        tokens[:, step + 1] = cand_indices[sents, active_hypos].reshape(-1)
        scores = scores[active_bbsz_idx]
        scores[:, step] = cand_scores[sents, active_hypos].reshape(-1)
        order = active_bbsz_idx

    for sent in range(len(finalized)):  # best first; stable, so equal scores keep their finalisation order
        ranks = np.argsort([-h.score for h in finalized[sent]], kind="stable")
        finalized[sent] = [finalized[sent][r] for r in ranks]
    return finalized


def _check_beam(beam: int, vocab: int) -> None:
    if beam > vocab - 1:
        raise ValueError(f"SearchOptions.beam = {beam} exceeds the vocabulary ({vocab}) minus pad: lower beam")


def penalize(lprobs: np.ndarray, step: int, max_len: int, options: SearchOptions, *, eos: int, pad: int,
             unk: int) -> None:
    """In place, what fairseq does to a step's log-probs before selecting (float32 [N, V]): NaN and pad -> -inf,
    unk -= unk_penalty, only eos from ``max_len`` on, no eos before ``min_len``. export/candidates.py does the
    same in the graph."""
    lprobs[np.isnan(lprobs)] = -np.inf
    lprobs[:, pad] = -np.inf
    lprobs[:, unk] -= np.float32(options.unk_penalty)
    if step >= max_len:  # only eos is left
        eos_lprobs = lprobs[:, eos].copy()
        lprobs[:] = -np.inf
        lprobs[:, eos] = eos_lprobs
    if step < options.min_len:
        lprobs[:, eos] = -np.inf


def top_candidates(lprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` largest values, largest first, equal values by lower index (ONNX TopK's order); a full
    sort, for checking the graph's TopK. lprobs float32 [N, V] -> values float32 [N, k], indices int64 [N, k]."""
    columns = np.broadcast_to(np.arange(lprobs.shape[1], dtype=np.int64), lprobs.shape)
    indices = np.lexsort((columns, -lprobs), axis=1)[:, :k]
    return np.take_along_axis(lprobs, indices, axis=1), indices


def _beam_step_from_candidates(values: np.ndarray, tokens: np.ndarray, prev_scores: np.ndarray | None,
                               vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_beam_step`` from each row's top candidates instead of its whole row: the same result, since the union of
    the rows' top 2K holds the sentence's top 2K, ordered here by score, then by index into [K * V] as there.

    values float32 [B, K, k], tokens int64 [B, K, k] (each row's best first); prev_scores as in ``_beam_step``."""
    bsz, beam, _ = values.shape
    if prev_scores is None:
        values, tokens = values[:, :1], tokens[:, :1]  # [B, 1, k]
    else:
        values = values + prev_scores[:, :, None]  # [B, K, k]
    flat_index = (np.arange(values.shape[1], dtype=np.int64)[None, :, None] * vocab + tokens).reshape(bsz, -1)
    flat = values.reshape(bsz, -1)  # [B, K * k]
    k = min(2 * beam, values.shape[1] * vocab - 1)  # -1: pad is never selected
    ranks = np.lexsort((flat_index, -flat), axis=1)[:, :k]
    sents = np.arange(bsz)[:, None]
    indices = flat_index[sents, ranks]  # [B, C]
    return flat[sents, ranks], indices % vocab, indices // vocab


def _beam_step(lprobs: np.ndarray, prev_scores: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fairseq's ``BeamSearch.step``: the top 2K extensions of each sentence's beams.

    lprobs: float32 [B, K, V]; prev_scores: float32 [B, K] cumulative scores (None at step 0, where only the
    first beam is searched since all are equal). Returns scores float32 [B, C], tokens and beams int64 [B, C].
    """
    bsz, beam, vocab = lprobs.shape
    if prev_scores is None:
        lprobs = lprobs[:, :1, :]  # [B, 1, V]
    else:
        lprobs = lprobs + prev_scores[:, :, None]  # [B, K, V]
    flat = lprobs.reshape(bsz, -1)  # [B, K * V] (or [B, V])
    k = min(2 * beam, flat.shape[1] - 1)  # -1: pad is never selected
    part = np.argpartition(-flat, k - 1, axis=1)[:, :k]  # [B, C] the top k, unordered
    part_scores = np.take_along_axis(flat, part, axis=1)
    ranks = np.lexsort((part, -part_scores), axis=1)  # by score descending, then by lower index
    indices = np.take_along_axis(part, ranks, axis=1)  # [B, C]
    return np.take_along_axis(part_scores, ranks, axis=1), indices % vocab, indices // vocab


def _block_repeated_ngrams(tokens: np.ndarray, lprobs: np.ndarray, size: int) -> None:
    """Set to -inf (in place) every token that would repeat an n-gram of ``size`` already in the row.

    tokens: int64 [N, t] (leading eos/bos included), lprobs: float32 [N, V]. As fairseq's CUDA kernel.
    """
    t = tokens.shape[1]
    if t < size:  # no complete n-gram yet
        return
    prefixes = np.lib.stride_tricks.sliding_window_view(tokens, size - 1, axis=1)[:, :t - size + 1]  # [N, W, n-1]
    matches = (prefixes == tokens[:, None, t - size + 1:]).all(axis=2)  # [N, W] earlier prefix == the last n-1
    rows, starts = np.nonzero(matches)
    lprobs[rows, tokens[rows, starts + size - 1]] = -np.inf


def _finalize(step: int, eos_mask: np.ndarray, bbsz_idx: np.ndarray, eos_scores: np.ndarray, tokens: np.ndarray,
              scores: np.ndarray, finalized: list[list[Hypothesis]], finished: np.ndarray, beam: int, max_len: int,
              lenpen: float, eos: int) -> None:
    """fairseq's ``finalize_hypos``: store the hypotheses ending in eos now, mark sentences that are done.

    eos_mask: bool [B, K], bbsz_idx: int64 [B, K], eos_scores: float32 [B, K] over the first K candidates.
    """
    sents, slots = np.nonzero(eos_mask)  # row-major: by sentence, then by candidate rank
    if sents.size == 0:
        return
    rows = bbsz_idx[sents, slots]
    ends = eos_scores[sents, slots]  # [E] cumulative scores including the eos
    hyp_tokens = tokens[rows, 1:step + 2].copy()  # [E, step + 1]
    hyp_tokens[:, step] = eos
    pos_scores = scores[rows, :step + 1].copy()  # [E, step + 1]
    pos_scores[:, step] = ends
    pos_scores[:, 1:] = pos_scores[:, 1:] - pos_scores[:, :-1]
    normalized = ends / np.float32((step + 1) ** lenpen)
    for i, sent in enumerate(sents.tolist()):
        if len(finalized[sent]) < beam:
            finalized[sent].append(Hypothesis(hyp_tokens[i], float(normalized[i]), pos_scores[i]))
    for sent in np.unique(sents).tolist():
        if len(finalized[sent]) == beam or step == max_len:
            finished[sent] = True
