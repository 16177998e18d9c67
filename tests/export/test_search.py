"""export/search.py: numpy beam search == fairseq's SequenceGenerator, hypothesis for hypothesis."""
from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator
from torch import nn

from export.search import SearchOptions, _block_repeated_ngrams, penalize, search, top_candidates
from tests.conftest import assert_close, tiny_dictionary, tiny_model

ARCHS = ["transformer_d128", "lsra_wmt_200", "flash_100m", "fastformer_100m"]
SOURCE_LENGTHS = [[3, 8, 5], [6, 2, 6]]  # per batch, eos included; shorter rows are left-padded
MAX_LEN_A, MAX_LEN_B = 1.2, 10

OPTIONS = [  # beam, lenpen, no_repeat_ngram_size, min_len, unk_penalty
    SearchOptions(beam=1),
    SearchOptions(beam=4),
    SearchOptions(beam=5),
    SearchOptions(beam=4, lenpen=0.6, no_repeat_ngram_size=2),
    SearchOptions(beam=5, lenpen=0.6, min_len=3),
    SearchOptions(beam=4, no_repeat_ngram_size=2, min_len=3, unk_penalty=-1.0),
    SearchOptions(beam=1, lenpen=0.6, no_repeat_ngram_size=2, min_len=3),
    SearchOptions(beam=5, lenpen=0.6, no_repeat_ngram_size=3, unk_penalty=0.5),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models step 10x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TorchStepModel:
    """Test-only StepModel over a fairseq model, driven the way SequenceGenerator drives it."""

    def __init__(self, model, pad: int):
        self.model, self.pad = model, pad

    @torch.no_grad()
    def start(self, src_tokens: np.ndarray, beam: int) -> None:
        src = torch.from_numpy(src_tokens)  # [B, S]
        net_input = {"src_tokens": src, "src_lengths": src.ne(self.pad).sum(1)}
        encoder_out = self.model.encoder.forward_torchscript(net_input)
        self.encoder_out = self.model.encoder.reorder_encoder_out(
            encoder_out, torch.arange(len(src)).repeat_interleave(beam))  # N = B * beam rows
        self.state: dict = {}
        self.prev: torch.Tensor | None = None  # [N, t] tokens so far (positions come from their count)

    def keep(self, sentences: np.ndarray) -> None:
        """Nothing to drop here: the next step's order picks the rows of encoder_out and of the states."""

    @torch.no_grad()
    def step(self, tokens: np.ndarray, order: np.ndarray) -> np.ndarray:
        tokens = torch.from_numpy(np.ascontiguousarray(tokens))[:, None]  # [N, 1]
        if self.prev is None:
            self.prev = tokens
        else:
            order = torch.from_numpy(np.ascontiguousarray(order))
            self.model.decoder.reorder_incremental_state_scripting(self.state, order)
            self.encoder_out = self.model.encoder.reorder_encoder_out(self.encoder_out, order)
            self.prev = torch.cat([self.prev[order], tokens], dim=1)
        logits, extra = self.model.decoder(self.prev, encoder_out=self.encoder_out, incremental_state=self.state)
        return self.model.get_normalized_probs((logits[:, -1:], extra), log_probs=True)[:, -1].numpy()  # [N, V]


class CandidateTorchStepModel(TorchStepModel):
    """The same, offering export/search.py's candidates path: penalties and per-row top-k in numpy, as the step
    graph does them (export/candidates.py; the graph's TopK against this numpy is checked by export validation)."""

    candidates = True

    def __init__(self, model, dictionary):
        super().__init__(model, dictionary.pad())
        self.vocab_size, self.dictionary = len(dictionary), dictionary

    def step_candidates(self, tokens, order, step, max_len, options, k):
        d = self.dictionary
        lprobs = self.step(tokens, order).astype(np.float32)
        penalize(lprobs, step, max_len, options, eos=d.eos(), pad=d.pad(), unk=d.unk())
        return top_candidates(lprobs, k)


class SlicedNGramBlocker(nn.Module):
    """fairseq's CPU n-gram blocker fed only the tokens generated so far (the fix of fairseq issue #4709).

    Unfixed, it compares against the pad-filled end of the token buffer and blocks nothing; fed
    ``tokens[:, :step + 1]`` it blocks what fairseq's CUDA kernel blocks.
    """

    def __init__(self, blocker: nn.Module):
        super().__init__()
        self.blocker = blocker

    def forward(self, tokens, lprobs, bsz: int, beam_size: int, step: int):
        return self.blocker(tokens[:, :step + 1], lprobs, bsz, beam_size, step)


def _sources(dictionary, lengths: list[int], generator: torch.Generator) -> torch.Tensor:
    """int64 [B, max(lengths)]: random words, eos last, left-padded (as fairseq batches sources)."""
    src = torch.full((len(lengths), max(lengths)), dictionary.pad())
    for row, length in enumerate(lengths):
        src[row, -length:-1] = torch.randint(dictionary.nspecial, len(dictionary), (length - 1,), generator=generator)
        src[row, -1] = dictionary.eos()
    return src


def _fairseq(model, dictionary, src: torch.Tensor, options: SearchOptions, fix_ngram_blocker: bool = True, **extra):
    generator = SequenceGenerator(
        [model], dictionary, beam_size=options.beam, len_penalty=options.lenpen, max_len_a=options.max_len_a,
        max_len_b=options.max_len_b, min_len=options.min_len, no_repeat_ngram_size=options.no_repeat_ngram_size,
        unk_penalty=options.unk_penalty, **extra)
    if fix_ngram_blocker and generator.repeat_ngram_blocker is not None:
        generator.repeat_ngram_blocker = SlicedNGramBlocker(generator.repeat_ngram_blocker)
    with torch.no_grad():
        net_input = {"src_tokens": src, "src_lengths": src.ne(dictionary.pad()).sum(1)}
        return generator.generate([model], {"net_input": net_input})


def _max_len(src: torch.Tensor) -> int:
    return int(MAX_LEN_A * src.shape[1] + MAX_LEN_B)


def _peaked(arch: str, dictionary, generator: torch.Generator):
    """A tiny model whose output projection is untied, std-1 (distinct, peaked scores) and constant for eos."""
    torch.manual_seed(0)
    model = tiny_model(arch, dictionary)
    projection = nn.Linear(model.decoder.output_projection.in_features, len(dictionary), bias=True)
    with torch.no_grad():
        projection.weight.normal_(0.0, 1.0, generator=generator)
        projection.weight[dictionary.eos()] = 0.0
        projection.bias.zero_()
    model.decoder.output_projection = projection
    return model


@functools.lru_cache(maxsize=None)
def _case(arch: str):
    """(model, dictionary, source batches); the eos bias is the smallest at which every OPTIONS ends some
    hypotheses before max length and the hypotheses have at least 3 different lengths (random tiny models are
    near uniform, and left alone they never end early)."""
    d = tiny_dictionary()
    generator = torch.Generator().manual_seed(1)
    batches = [_sources(d, lengths, generator) for lengths in SOURCE_LENGTHS]
    model = _peaked(arch, d, generator)
    for eos_bias in (5.0, 6.0, 7.0, 8.0, 9.0, 10.0):
        with torch.no_grad():
            model.decoder.output_projection.bias[d.eos()] = eos_bias
        lengths = [[(len(h["tokens"]), _max_len(src) + 1) for src in batches
                    for hypos in _fairseq(model, d, src, options) for h in hypos] for options in OPTIONS]
        if (all(any(n < limit for n, limit in per_options) for per_options in lengths)
                and len({n for per_options in lengths for n, _ in per_options}) >= 3):
            return model, d, batches
    raise AssertionError(f"{arch}: no eos bias makes every OPTIONS end hypotheses early")


def _assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for sent, (mine, ref) in enumerate(zip(ours, theirs)):
        assert len(mine) == len(ref), f"sentence {sent}"
        for rank, (h, r) in enumerate(zip(mine, ref)):
            where = f"sentence {sent} rank {rank}"
            assert h.tokens.dtype == np.int64
            assert h.tokens.tolist() == r["tokens"].tolist(), where
            assert h.score == pytest.approx(float(r["score"]), abs=1e-4), where
            assert_close(torch.from_numpy(h.positional_scores), r["positional_scores"], atol=1e-4, rtol=1e-4)


def _run(model, d, src: torch.Tensor, options: SearchOptions, max_len_cap: int | None = None,
         candidates: bool = False):
    cap = model.max_decoder_positions() - 1 if max_len_cap is None else max_len_cap
    step_model = CandidateTorchStepModel(model, d) if candidates else TorchStepModel(model, d.pad())
    return search(step_model, src.numpy(), eos=d.eos(), pad=d.pad(), unk=d.unk(), options=options, max_len_cap=cap)



@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"b{o.beam}-lp{o.lenpen}-ng{o.no_repeat_ngram_size}"
                         f"-min{o.min_len}-unk{o.unk_penalty}")
@pytest.mark.parametrize("candidates", [False, True], ids=["log-probs", "candidates"])
def test_search_matches_fairseq(arch, options, candidates):
    model, d, batches = _case(arch)
    lengths = []
    for src in batches:
        ours = _run(model, d, src, options, candidates=candidates)
        _assert_same(ours, _fairseq(model, d, src, options))
        lengths += [(len(h.tokens), _max_len(src) + 1) for hypos in ours for h in hypos]
        assert all(len(hypos) == options.beam for hypos in ours)
    assert any(n < limit for n, limit in lengths), "no hypothesis ended before max length: finalisation untested"
    if options.min_len > 1:
        assert all(n > options.min_len for n, _ in lengths)


@pytest.mark.parametrize("arch", ["transformer_d128", "lsra_wmt_200"])
def test_search_matches_fairseq_when_the_beam_fills_the_vocabulary(arch):
    """V = beam + 1: at step 0 only beam - 1 candidates are not eos, so an eos slot is carried as ignored
    (fairseq's cands_to_ignore). min_len 0: with min_len 1, pad and eos would tie at -inf for the last slot."""
    d = tiny_dictionary(2)  # 4 specials + 2 words
    generator = torch.Generator().manual_seed(2)
    model = _peaked(arch, d, generator)
    options = SearchOptions(beam=len(d) - 1, min_len=0)
    for lengths in SOURCE_LENGTHS:
        src = _sources(d, lengths, generator)
        expected = _fairseq(model, d, src, options)
        _assert_same(_run(model, d, src, options), expected)
        _assert_same(_run(model, d, src, options, candidates=True), expected)


@pytest.mark.parametrize("candidates", [False, True], ids=["log-probs", "candidates"])
def test_finished_sentences_leave_the_batch_as_in_fairseq(candidates):
    """The search drops a sentence once it has its hypotheses (``keep``: the sentences that go on, fewer each time),
    and what it finds is still fairseq's, which drops them too."""
    model, d, batches = _case("transformer_d128")
    options = SearchOptions(beam=4)
    step_model = CandidateTorchStepModel(model, d) if candidates else TorchStepModel(model, d.pad())
    kept = []
    step_model.keep = lambda sentences: kept.append(sentences.tolist())
    for src in batches:
        ours = search(step_model, src.numpy(), eos=d.eos(), pad=d.pad(), unk=d.unk(), options=options,
                      max_len_cap=model.max_decoder_positions() - 1)
        _assert_same(ours, _fairseq(model, d, src, options))
    assert kept, "no sentence finished before the others: dropping untested"
    assert all(len(k) >= 1 and k == sorted(k) for k in kept)


def test_max_len_cap_matches_fairseq_max_len():
    model, d, batches = _case("transformer_d128")
    options = SearchOptions(beam=4)
    for src in batches:  # fairseq caps max_len at its max_len (here 6) minus 1
        ours = _run(model, d, src, options, max_len_cap=5)
        _assert_same(ours, _fairseq(model, d, src, options, max_len=6))
        assert max(len(h.tokens) for hypos in ours for h in hypos) == 6


def _token_lists(finalized) -> list[list[list[int]]]:
    return [[h["tokens"].tolist() for h in hypos] for hypos in finalized]


def test_fairseq_cpu_ngram_blocker_blocks_nothing():
    """Why the tests patch fairseq (issue #4709); when this fails, fairseq is fixed and the patch can go."""
    model, d, batches = _case("transformer_d128")
    blocking, plain = SearchOptions(beam=4, no_repeat_ngram_size=2), SearchOptions(beam=4)
    for src in batches:
        plain_tokens = _token_lists(_fairseq(model, d, src, plain))
        assert _token_lists(_fairseq(model, d, src, blocking, fix_ngram_blocker=False)) == plain_tokens
    assert any(_token_lists(_fairseq(model, d, src, blocking)) != _token_lists(_fairseq(model, d, src, plain))
               for src in batches), "the fixed blocker should block something here"


def test_block_repeated_ngrams_by_hand():
    tokens = np.array([[2, 5, 6, 5], [2, 5, 6, 7], [2, 5, 5, 5]])  # [N, t], leading eos
    lprobs = np.zeros((3, 9), dtype=np.float32)
    _block_repeated_ngrams(tokens, lprobs, 2)
    assert np.isneginf(lprobs).nonzero()[0].tolist() == [0, 2]  # row 0: "5 6" seen -> no 6; row 2: "5 5" -> no 5
    assert np.isneginf(lprobs[0, 6]) and np.isneginf(lprobs[2, 5])
    lprobs = np.zeros((3, 9), dtype=np.float32)
    _block_repeated_ngrams(tokens, lprobs, 3)
    assert np.isneginf(lprobs).nonzero()[0].tolist() == [2]  # row 2: "5 5 5" seen -> no 5
    assert np.isneginf(lprobs[2, 5])


def test_options_are_validated():
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        SearchOptions(no_repeat_ngram_size=1)
    with pytest.raises(ValueError, match="beam"):
        SearchOptions(beam=0)


def test_imports_without_torch():
    root = Path(__file__).resolve().parents[2]
    code = "import sys; sys.modules['torch'] = None; import export.search"
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
