"""Real inputs for quantization: calibration feeds of both graphs, and the held-out text inc-tune scores.

    data = CalibrationData("runs/export/lsra", lines)          # source sentences, checked against the vocabulary
    data.feeds("encoder"), data.feeds("decoder_step")           # what ort-static's MinMax calibration runs
    CalibrationReader(data, "encoder")                          # the same, as ONNX Runtime's CalibrationDataReader

Default text comes from the data dir model.json names: the first ``CALIBRATION_LINES`` of ``raw/train.<src>``
(calibration), the first ``HELDOUT_LINES`` of ``raw/valid.<src>`` / ``raw/valid.<tgt>`` (inc-tune's BLEU).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import numpy as np

from compress.errors import QuantizeError
from export import candidates
from export.model_dir import GRAPHS
from export.runtime import Translator
from export.search import left_pad
from lite.text import read_lines

CALIBRATION_LINES = 256  # lines of <data>/raw/train.<src> when none are given
HELDOUT_LINES = 300  # inc-tune: valid lines scored with BLEU per trial
CALIBRATION_BATCH = 16  # sentences per calibration batch (encoder run + greedy decoding steps)
MAX_UNK = 0.5  # calibration lines with more unknown pieces than this are another language/vocabulary


def _raw(description: dict, text: str, flags: str) -> Path:
    """``<data>/raw`` of the data dir model.json names."""
    if not description.get("data"):
        raise QuantizeError(f"{text}: model.json names no data dir ('data') to read it from; pass {flags}")
    return Path(description["data"]) / "raw"


def default_calibration_lines(description: dict, count: int = CALIBRATION_LINES) -> tuple[List[str], Path]:
    """The first ``count`` lines of ``<data>/raw/train.<src>`` of the data dir model.json names."""
    path = _raw(description, "calibration text", "--calibration FILE") / f"train.{description['src']}"
    if not path.is_file():
        raise QuantizeError(f"ort-static needs calibration text: {path} (model.json 'data' + 'src') does not exist; "
                            f"pass calibration lines (--calibration FILE, source-language sentences, one a line)")
    return read_lines(path, limit=count), path


def heldout_lines(description: dict, count: int = HELDOUT_LINES) -> tuple[List[str], List[str]]:
    """The first ``count`` (source, reference) lines of the valid split of the data dir model.json names."""
    raw = _raw(description, "held-out text", "--eval-source and --eval-reference")
    paths = [raw / f"valid.{description[k]}" for k in ("src", "tgt")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise QuantizeError(f"inc-tune scores BLEU on held-out text: {', '.join(missing)} (model.json 'data') does "
                            f"not exist; pass --eval-source and --eval-reference")
    sources, references = (read_lines(p, limit=count) for p in paths)
    return sources, references


class CalibrationData:
    """Real inputs for both graphs: source lines -> encoder feeds; greedy decoding on the fp32 graphs -> decoder-step
    feeds, one per step. Made lazily (the decoder states of a few hundred steps would not fit in memory at once).

    Lines are checked first: more than ``MAX_UNK`` of their pieces (the lone word-boundary piece "▁" not counted)
    unknown to the dictionary is a mismatch (another language, another model's data) and raises ``QuantizeError``.
    """

    def __init__(self, model_dir: str | Path, lines: Sequence[str], batch_size: int = CALIBRATION_BATCH,
                 source: str = "calibration lines"):
        self.translator = t = Translator(model_dir)
        d = t.description
        rows = [t.encode(line) for line in lines if line.strip()]
        if not rows:
            raise QuantizeError(f"{source}: no non-empty lines to calibrate with")
        # the lone word-boundary piece carries no text (sentencepiece emits it before an unknown word): not counted
        content = [r[:-1][r[:-1] != t.index.get("\u2581", -1)] for r in rows]  # eos dropped too
        pieces = sum(len(c) for c in content)
        unknown = sum(int(np.sum(c == d["unk"])) for c in content)
        self.lines, self.unk_fraction = len(rows), unknown / max(pieces, 1)
        if self.unk_fraction > MAX_UNK:
            raise QuantizeError(f"{source}: {self.unk_fraction:.0%} of the {pieces} sentencepiece pieces of its "
                                f"{len(rows)} lines are unknown to {Path(model_dir) / 'vocab.txt'}: not "
                                f"{d['src']!r} text of this model's data ({d['data']}); "
                                f"give source-language lines like <data>/raw/train.{d['src']}")
        rows.sort(key=len)  # batches of similar length: little padding
        self.batches = [left_pad(rows[i:i + batch_size], d["pad"]) for i in range(0, len(rows), batch_size)]

    def feeds(self, graph: str) -> Iterator[Dict[str, np.ndarray]]:
        """Feeds of ``graph`` ("encoder" | "decoder_step"), batch by batch."""
        if graph not in GRAPHS:
            raise ValueError(f"graph {graph!r}: use one of {GRAPHS}")
        for src in self.batches:
            if graph == "encoder":
                yield {"src_tokens": src}
            else:
                yield from self._steps(src)

    def _steps(self, src: np.ndarray) -> Iterator[Dict[str, np.ndarray]]:
        """Greedy decoding of one batch [B, S] on the fp32 graphs; yields each step's decoder-step feeds."""
        t, d = self.translator, self.translator.description
        model = t.model
        mask, *memory = model.encoder.run(None, {"src_tokens": src})
        rows = src.shape[0]
        states = [s.initial(rows) for s in model.states]
        tokens = np.full(rows, d["eos"], dtype=np.int64)  # [B]; fairseq starts decoding from eos
        order = np.arange(rows, dtype=np.int64)  # greedy: no beam reordering
        finished = np.zeros(rows, dtype=bool)
        max_len = min(int(t.options.max_len_a * src.shape[1] + t.options.max_len_b), d["max_target_positions"] - 1)
        for step in range(max_len + 1):
            feeds = {"tokens": tokens, "step": np.array(step, dtype=np.int64), "order": order,
                     "encoder_padding_mask": mask, **dict(zip(model.memory_names, memory)),
                     **{s.name: v for s, v in zip(model.states, states)},
                     **(candidates.INPUTS if model.candidates else {})}
            yield feeds
            log_probs, *states = model.decoder_step.run(None, feeds)[:1 + len(model.states)]  # [B, V], next states
            log_probs[:, d["pad"]] = -np.inf
            if step == 0:
                log_probs[:, d["eos"]] = -np.inf  # min_len 1, as the search
            tokens = log_probs.argmax(axis=1).astype(np.int64)
            finished |= tokens == d["eos"]
            if finished.all():
                break


class CalibrationReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over ``CalibrationData.feeds(graph)``."""

    def __init__(self, data: CalibrationData, graph: str):
        self.data, self.graph = data, graph
        self.rewind()

    def get_next(self) -> Dict[str, np.ndarray] | None:
        return next(self.iterator, None)

    def rewind(self) -> None:
        self.iterator = self.data.feeds(self.graph)
