"""Export validates itself: output names, then shapes, then values of the ONNX graphs against PyTorch.

The grid: {1 sentence x 1 hypothesis, 3 sentences x 2 hypotheses} x source length {1, 7, 33} (a batch of 3 holds
left-padded shorter sentences) x 10 decoding steps with random tokens and a random beam reordering (within each
sentence's hypotheses, as beam search reorders) at every step. Tolerance 1e-4 (fp32).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from torch import nn

from export import candidates
from export.graphs import DecoderStep, Encoder, initial_states, memory_names
from export.search import SearchOptions, penalize, top_candidates
from export.model_dir import StateSpec
from lite.errors import CriterionNotMet

BATCHES, SOURCE_LENGTHS, STEPS, ATOL = ((1, 1), (3, 2)), (1, 7, 33), 10, 1e-4  # batches: (sentences, beam)
RTOL = 1e-6  # on top of ATOL, relative to |torch|
STATE_RTOL = 1e-5  # for the decoder's next states, relative to the state's largest |torch|: running sums (linear
#                    attention, Performer) add terms of up to 1e2 and differ by tens of float32 ulps of those (1 ulp =
#                    7.6e-6) after 10 steps of other summation orders, in every entry, small ones included
Run = Callable[[Dict[str, np.ndarray]], List[np.ndarray]]  # one graph: feeds -> outputs in graph order


class ExportMismatch(CriterionNotMet, RuntimeError):
    """An exported graph that does not reproduce the PyTorch model; the message says what, where and by how much."""


@dataclass(frozen=True)
class Report:
    cases: int  # (batch, source length) pairs checked
    steps: int
    max_abs_diff: float

    def to_json(self) -> dict:
        return {"cases": self.cases, "steps": self.steps, "max_abs_diff": self.max_abs_diff, "atol": ATOL,
                "rtol": RTOL, "state_rtol": STATE_RTOL}


def _compare(graph: str, names: Sequence[str], expected: Sequence[torch.Tensor], actual: Sequence[np.ndarray],
             where: str) -> float:
    """Names, then shapes, then values; returns the largest absolute difference."""
    if len(actual) != len(expected):
        raise ExportMismatch(f"{graph}: {len(actual)} outputs, PyTorch gives {len(expected)} ({where})")
    worst = 0.0
    for name, e, a in zip(names, expected, actual):
        e = e.detach().cpu().numpy()
        if a.shape != e.shape:
            raise ExportMismatch(f"{graph}: output {name!r} has shape {a.shape}, PyTorch {e.shape} ({where})")
        if e.dtype == np.bool_:
            if not np.array_equal(a, e):
                raise ExportMismatch(f"{graph}: output {name!r} differs from PyTorch ({where})")
            continue
        if e.size == 0:
            continue
        state = name.endswith(".next")  # a next state: "<state>.next"
        rtol, scale = (STATE_RTOL, np.abs(e).max()) if state else (RTOL, np.abs(e.astype(np.float64)))
        diff = np.abs(a.astype(np.float64) - e.astype(np.float64))
        excess = diff - (ATOL + rtol * scale)  # > 0: out of tolerance
        index = np.unravel_index(int(np.nan_to_num(excess, nan=np.inf).argmax()), diff.shape)
        if not np.isfinite(diff[index]) or excess[index] > 0:
            raise ExportMismatch(f"{graph}: output {name!r} differs from PyTorch by {diff[index]:.3g} > {ATOL} + "
                                 f"{rtol} x {'max ' if state else ''}|torch| at index {tuple(int(i) for i in index)} (onnx {a[index]!r}, torch "
                                 f"{e[index]!r}; {where})")
        worst = max(worst, float(diff[index]))
    return worst


def sources(dictionary, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Random source tokens [B, S] ending in eos; rows after the first are shorter and left-padded."""
    tokens = torch.full((batch, length), dictionary.pad())
    for row in range(batch):
        n = max(1, length - 2 * row)
        tokens[row, length - n:] = torch.randint(dictionary.nspecial, len(dictionary), (n,), generator=generator)
        tokens[row, -1] = dictionary.eos()
    return tokens


# the search's penalties at work within the validation's steps: eos banned at steps 0-2, only eos from step 6 on
CANDIDATE_FEEDS = {"min_len": np.array(3, dtype=np.int64), "max_len": np.array(6, dtype=np.int64),
                   "unk_penalty": np.array(0.75, dtype=np.float32), "k": np.array([8], dtype=np.int64)}


def _check_candidates(log_probs: np.ndarray, step: int, found: Sequence[np.ndarray], dictionary, where: str) -> None:
    """The graph's candidates == ``penalize`` + ``top_candidates`` (export/search.py) on its own log-probs."""
    lprobs = log_probs.astype(np.float32).copy()
    options = SearchOptions(min_len=int(CANDIDATE_FEEDS["min_len"]), unk_penalty=float(CANDIDATE_FEEDS["unk_penalty"]))
    penalize(lprobs, step, int(CANDIDATE_FEEDS["max_len"]), options, eos=dictionary.eos(), pad=dictionary.pad(),
             unk=dictionary.unk())
    values, indices = top_candidates(lprobs, int(CANDIDATE_FEEDS["k"][0]))
    scores, tokens = found
    if not np.array_equal(tokens, indices) or not np.array_equal(scores, values):
        raise ExportMismatch(f"decoder_step: the in-graph candidates differ from the search's penalties + top-k "
                             f"({where})")


@torch.no_grad()
def validate(model: nn.Module, specs: List[StateSpec], encoder: Run, decoder_step: Run, output_names: Dict[str, List[str]],
             seed: int = 0) -> Report:
    """Run the graphs (``encoder``/``decoder_step`` take feeds, return outputs) beside the PyTorch model."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = model.decoder.dictionary
    torch_encoder, torch_step = Encoder(model), DecoderStep(model.decoder, specs)
    names = memory_names(model.decoder)
    worst, cases = 0.0, 0
    for batch, beam in BATCHES:
        rows = batch * beam
        for length in SOURCE_LENGTHS:
            where = f"{batch} sentences x {beam} hypotheses, source length {length}"
            src = sources(dictionary, batch, length, generator)
            expected = torch_encoder(src)
            actual = encoder({"src_tokens": src.numpy()})
            worst = max(worst, _compare("encoder", output_names["encoder"], expected, actual, where))
            mask, memory = actual[0], actual[1:]
            t_mask, t_memory = expected[0], list(expected[1:])
            t_states = initial_states(model.decoder, specs, rows)
            states = [t.numpy() for t in t_states]
            first_row = torch.arange(rows) // beam * beam  # [N]: the first row of each row's sentence
            for step in range(STEPS):
                tokens = torch.randint(dictionary.nspecial, len(dictionary), (rows,), generator=generator)
                order = first_row + torch.randint(0, beam, (rows,), generator=generator) if step else torch.arange(rows)
                feeds = {"tokens": tokens.numpy(), "step": np.array(step, dtype=np.int64), "order": order.numpy(),
                         "encoder_padding_mask": mask, **dict(zip(names, memory)),
                         **{s.name: a for s, a in zip(specs, states)}}
                t_out = torch_step(tokens, torch.tensor(step), order, t_mask, *t_memory, *t_states)
                with_candidates = set(candidates.OUTPUTS) <= set(output_names["decoder_step"])
                out = decoder_step({**feeds, **(CANDIDATE_FEEDS if with_candidates else {})})
                worst = max(worst, _compare("decoder_step", output_names["decoder_step"], t_out, out[:len(t_out)],
                                            f"{where}, step {step}"))
                if with_candidates:
                    _check_candidates(out[0], step, out[len(t_out):], dictionary, f"{where}, step {step}")
                t_states, states = list(t_out[1:]), out[1:len(t_out)]
            cases += 1
    return Report(cases, STEPS, worst)


def onnx_runner(path: Path, threads: int = 1) -> Run:
    """A plain onnxruntime session as a ``Run``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda feeds: session.run(None, {k: v for k, v in feeds.items() if k in names})
