"""A translator on ONNX Runtime alone: sentencepiece -> encoder graph -> beam search over the decoder-step graph.

No torch here (a test imports this module where importing torch fails). One decoder-step call per step
serves every sentence and hypothesis of a batch; the decoder states stay ONNX Runtime values: a step's state
outputs are the next step's inputs, with the beam reordering done inside the graph, so no state is copied
between steps.

    translator = Translator("runs/export/lsra")          # verifies every file against model.json
    translator.translate(["Ein Hund läuft."])             # -> ["A dog is running."]
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable, List, Sequence

import numpy as np

from export import candidates, ort_search
from export import shortlist as shortlist_lib
from export.model_dir import GRAPHS, ModelDir, ModelDirError, StateSpec
from export.search import SearchOptions, left_pad, search

logger = logging.getLogger(__name__)
SEARCHES = ("fairseq", "ort")  # export/search.py (fairseq's, step for step); ONNX Runtime's BeamSearch op


class OnnxStepModel:
    """The two graphs behind export/search.py's ``StepModel`` protocol, and its ``CandidateStepModel`` when the
    step graph has the in-graph candidates (export/candidates.py; graphs exported before them have not).

    Each step runs through ``run_with_ortvaluevector``, ONNX Runtime's call with the least Python around it: the
    feeds are one vector of values (tokens, step, order, the sentence's memory, the previous step's states) and the
    outputs another, whose states feed the next step as they are (I/O binding spends ~2 µs of Python on each bound
    name, 26 a step)."""

    def __init__(self, encoder, decoder_step, description: dict):
        import onnxruntime as ort
        from onnxruntime.capi import _pybind_state as C  # OrtValueVector, the type run_with_ortvaluevector takes

        self.ort, self.C, self.encoder, self.decoder_step = ort, C, encoder, decoder_step
        self.cpu = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
        self.run_options = ort.RunOptions()
        self.memory_names = description["io"]["encoder"]["outputs"][1:]
        self.states = [StateSpec.from_json(s) for s in description["states"]]
        self.outputs = description["io"]["decoder_step"]["outputs"]
        self.vocab_size = description["vocab_size"]
        self.candidates = set(candidates.OUTPUTS) <= set(self.outputs)  # else the search takes the log-probs
        self.log_probs_only = candidates.INPUTS if self.candidates else {}  # the extra inputs, passing them as is
        self.vocabulary: np.ndarray | None = None  # int64 [C]: the next search's shortlist (a shortlisted step)

    def _value(self, array: np.ndarray):
        """A value over ``array``'s memory (not a copy): the caller keeps the array alive while it is fed."""
        return self.C.OrtValue.ortvalue_from_numpy(array, self.cpu)

    def start(self, src_tokens: np.ndarray, beam: int) -> None:
        """src_tokens int64 [B, S] -> the encoder's outputs (once per sentence, [B, ...]) and fresh states for
        B * beam rows."""
        source = self.ort.OrtValue.ortvalue_from_numpy(src_tokens)
        outputs = self.encoder.run_with_ort_values(None, {"src_tokens": source})
        self.extra: dict = {}  # the extra inputs, the same for every step of a search (set at its first step)
        self._memory(dict(zip(["encoder_padding_mask", *self.memory_names], (v.numpy() for v in outputs))))
        rows = src_tokens.shape[0] * beam
        self.initial = [s.initial(rows) for s in self.states]  # alive until the first step has read them
        self.state_values = [self._value(a) for a in self.initial]
        self.step_index = 0

    def _memory(self, memory: dict[str, np.ndarray]) -> None:
        """The sentences' encoder outputs (and the shortlist, and the search's extra inputs) as the step's fixed
        feeds."""
        self.memory = memory
        fixed = {**memory, **({} if self.vocabulary is None else {shortlist_lib.INPUT: self.vocabulary}),
                 **self.extra}
        self.fixed_names, self.fixed_values = list(fixed), [self._value(a) for a in fixed.values()]

    def keep(self, sentences: np.ndarray) -> None:
        """Only these sentences go on: their encoder outputs fed in place of the batch's (the states follow through
        the next step's order)."""
        self._memory({name: np.ascontiguousarray(a[sentences]) for name, a in self.memory.items()})

    def _run(self, tokens: np.ndarray, order: np.ndarray, outputs: list[str], extra: dict) -> list:
        """One step: the states advanced; returns the values of ``outputs`` (states excluded)."""
        if self.step_index == 0:
            self.extra = {name: np.asarray(v) for name, v in extra.items()}
            self._memory(self.memory)
            self.output_names = [*outputs, *(s.name + ".next" for s in self.states)]
            self.devices = [self.cpu] * len(self.output_names)
        self.fed = (np.ascontiguousarray(tokens, dtype=np.int64), np.array(self.step_index, dtype=np.int64),
                    np.ascontiguousarray(order, dtype=np.int64))  # alive while the step runs
        names = ["tokens", "step", "order", *self.fixed_names, *(s.name for s in self.states)]
        feeds = self.C.OrtValueVector()
        for value in (*map(self._value, self.fed), *self.fixed_values, *self.state_values):
            feeds.push_back(value)
        fetched = self.C.OrtValueVector()
        self.decoder_step.run_with_ortvaluevector(self.run_options, names, feeds, self.output_names, fetched,
                                                  self.devices)
        self.fetched, found = fetched, len(outputs)  # the states below are views into this vector: keep it
        self.state_values = [fetched[i] for i in range(found, len(self.output_names))]
        self.initial = None
        self.step_index += 1
        return [fetched[i] for i in range(found)]

    def step(self, tokens: np.ndarray, order: np.ndarray) -> np.ndarray:
        """tokens, order int64 [N] -> log-probs float32 [N, V]; the states advance in place of the old ones."""
        if self.vocabulary is not None:
            raise shortlist_lib.ShortlistError(shortlist_lib.NO_REPEAT)  # a shortlisted step gives candidates only
        (log_probs,) = self._run(tokens, order, ["log_probs"], self.log_probs_only)
        return log_probs.numpy()

    def step_candidates(self, tokens: np.ndarray, order: np.ndarray, step: int, max_len: int,
                        options: SearchOptions, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As ``step``, the search's penalties and each row's top ``k`` applied in the graph: values float32 [N, k],
        tokens int64 [N, k]."""
        extra = self.extra or {
            "min_len": np.array(options.min_len, dtype=np.int64), "max_len": np.array(max_len, dtype=np.int64),
            "unk_penalty": np.array(options.unk_penalty, dtype=np.float32), "k": np.array([k], dtype=np.int64)}
        scores, tokens_ = self._run(tokens, order, list(candidates.OUTPUTS), extra)
        return scores.numpy(), tokens_.numpy()


class Translator:
    """Raw sentences in, detokenized translations out, on ONNX Runtime; batched, thread count settable.

    ``format="ort"`` runs the ORT-format graphs (``lite export --ort``), as ONNX Runtime Mobile would.
    ``search="ort"`` runs each batch's whole search in one ONNX Runtime call (export/ort_search.py; Transformer
    family only) instead of export/search.py's, which is fairseq's step for step.
    ``shortlist``: a vocabulary map (``lite data shortlist``; export/shortlist.py): each batch's search scores only
    the target tokens that its source words map to.
    Sentences longer than the model's source positions are truncated, with a warning (as the torch backend).
    """

    def __init__(self, model_dir: str | Path, options: SearchOptions = SearchOptions(), threads: int = 1,
                 batch_size: int = 64, format: str = "onnx", shortlist: str | Path | None = None,
                 search: str = "fairseq"):
        import onnxruntime as ort
        import sentencepiece as spm

        self.dir = ModelDir.open(model_dir)  # every listed file checked against its sha256
        self.model_dir, self.description = self.dir.path, self.dir.description
        d = self.description
        self.options, self.batch_size = options, batch_size
        self.symbols = self.dir.file("vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
        if len(self.symbols) != d["vocab_size"]:
            raise ModelDirError(f"{self.model_dir}: vocab.txt has {len(self.symbols)} entries, the graphs "
                                f"{d['vocab_size']}")
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.spm = spm.SentencePieceProcessor(model_file=str(self.dir.file("spm.model")))
        specials = {d[k] for k in ("bos", "pad", "eos", "unk")}
        foreign = [s for i, s in enumerate(self.symbols) if i not in specials and self.spm.piece_to_id(s) == self.spm.unk_id()
                   and not s.startswith("madeupword")]
        if foreign:
            raise ModelDirError(f"{self.model_dir}: spm.model does not know {len(foreign)} dictionary entries "
                                f"(e.g. {foreign[:3]}): the sentencepiece model and dictionary do not match")
        options_ = ort.SessionOptions()
        options_.intra_op_num_threads = threads
        options_.inter_op_num_threads = 1
        options_.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options_.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if search not in SEARCHES:
            raise ValueError(f"search {search!r}: use one of {', '.join(SEARCHES)}")
        self.search = search
        if search == "ort":
            self._open_ort_search(options_, format, shortlist)
        else:
            self._open_step_model(options_, format, shortlist)
        self.max_source_tokens = d["max_source_positions"] - 1  # <eos> is appended
        self.seconds = 0.0  # time spent in translate(), for --timing
        self.sentences = 0

    def _open_step_model(self, session_options, format: str, shortlist) -> None:
        """The encoder and decoder-step sessions behind export/search.py's search."""
        import onnxruntime as ort

        d = self.description
        external = self.dir.external_weights() if format == "onnx" else {}  # sparse weights, expanded here
        if external:
            names = list(external)
            session_options.add_external_initializers_from_files_in_memory(
                names, [external[n] for n in names], [external[n].nbytes for n in names])
        self.shortlist = self._shortlist(shortlist, format) if shortlist is not None else None
        graphs = {g: str(self.dir.graph(g, format)) for g in GRAPHS}
        if self.shortlist is not None:
            graphs["decoder_step"] = self._shortlisted_step()
        sessions = {g: ort.InferenceSession(graph, session_options, providers=["CPUExecutionProvider"])
                    for g, graph in graphs.items()}
        del external, graphs  # ONNX Runtime copied what it needs
        for g, session in sessions.items():  # a graph swapped for another, its hash recomputed, stops here
            found = {"inputs": {i.name for i in session.get_inputs()} - {shortlist_lib.INPUT},
                     "outputs": {o.name for o in session.get_outputs()}}
            if any(found[k] != set(d["io"][g][k]) for k in found):
                raise ModelDirError(f"{self.dir.graph(g, format)}: its inputs/outputs are not those model.json lists "
                                    f"for the {g} graph; it belongs to another model or place")
        vocab = sessions["decoder_step"].get_outputs()[0].shape[-1]  # symbolic when shortlisted
        if isinstance(vocab, int) and vocab != d["vocab_size"]:
            raise ModelDirError(f"{self.model_dir}: decoder_step gives {vocab} log-probs, model.json says "
                                f"{d['vocab_size']}")
        self.model = OnnxStepModel(sessions["encoder"], sessions["decoder_step"], d)

    def _open_ort_search(self, session_options, format: str, shortlist) -> None:
        if format != "onnx" or shortlist is not None:
            raise ort_search.OrtSearchError("--search ort builds its graph from the ONNX graphs, over the whole "
                                            "vocabulary: not with the ORT-format graphs or a shortlist")
        ort_search.check_search_options(self.options)
        self.model = ort_search.OrtBeamSearch(self.dir, session_options, self.options.no_repeat_ngram_size)
        self.shortlist = None

    def _shortlist(self, path: str | Path, format: str) -> "shortlist_lib.Shortlist":
        if format != "onnx":
            raise ModelDirError("a shortlist rewrites the decoder-step graph at load: use the ONNX graphs, not "
                                f"the {format.upper()}-format ones")
        if self.options.no_repeat_ngram_size:
            raise shortlist_lib.ShortlistError(shortlist_lib.NO_REPEAT)
        d = self.description
        return shortlist_lib.Shortlist(path, self.symbols, always=[d["eos"], d["unk"]])

    def _shortlisted_step(self) -> bytes:
        """The model dir's decoder step over a given vocabulary, serialized (its weights inside)."""
        import onnx

        with self.dir.readable_graphs() as files:
            model = onnx.load(str(files["decoder_step"]))
        return shortlist_lib.shortlisted_step(model, self.description["vocab_size"]).SerializeToString()

    def encode(self, line: str) -> np.ndarray:
        """Raw sentence -> token ids int64 [n] ending in eos (unknown pieces -> unk)."""
        pieces = self.spm.encode(line.strip(), out_type=str)
        if len(pieces) > self.max_source_tokens:
            logger.warning(f"sentence of {len(pieces)} pieces truncated to the model's {self.max_source_tokens}")
            pieces = pieces[:self.max_source_tokens]
        unk, eos = self.description["unk"], self.description["eos"]
        return np.array([self.index.get(p, unk) for p in pieces] + [eos], dtype=np.int64)

    def decode(self, tokens: Sequence[int]) -> str:
        """Token ids -> text, eos and bos dropped (as fairseq's Dictionary.string)."""
        skip = {self.description["eos"], self.description["bos"]}
        return self.spm.decode([self.symbols[t] for t in tokens if t not in skip])

    def translate(self, lines: Iterable[str]) -> List[str]:
        """One output line per input line; empty input lines give empty output lines."""
        lines = list(lines)
        outputs = [""] * len(lines)
        todo = sorted(((i, self.encode(line)) for i, line in enumerate(lines) if line.strip()), key=lambda x: len(x[1]))
        d = self.description
        start = time.perf_counter()
        for first in range(0, len(todo), self.batch_size):  # the target starts with eos, as fairseq's does
            chunk = todo[first:first + self.batch_size]
            if self.shortlist is not None:
                self.model.vocabulary = self.shortlist.candidates(
                    [[self.symbols[i] for i in ids[:-1]] for _, ids in chunk], at_least=2 * self.options.beam)
            src_tokens = left_pad([t for _, t in chunk], d["pad"])
            if self.search == "ort":
                best = self.model.search(src_tokens, self.options, max_len_cap=d["max_target_positions"] - 1)
            else:
                best = [nbest[0].tokens for nbest in search(self.model, src_tokens, eos=d["eos"], pad=d["pad"],
                                                            unk=d["unk"], options=self.options,
                                                            max_len_cap=d["max_target_positions"] - 1)]
            for (i, _), tokens in zip(chunk, best):
                outputs[i] = self.decode(tokens.tolist())
        self.seconds += time.perf_counter() - start
        self.sentences += len(todo)
        return outputs
