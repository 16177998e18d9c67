"""A translator on ONNX Runtime alone: sentencepiece -> encoder graph -> beam search over the decoder-step graph.

No torch here (a test imports this module where importing torch fails). One decoder-step call per step
serves every sentence and hypothesis of a batch; the decoder states stay ONNX Runtime values bound to the
session (I/O binding): a step's state outputs are the next step's inputs, with the beam reordering done
inside the graph, so no state is copied between steps.

    translator = Translator("runs/export/lsra")          # verifies every file against model.json
    translator.translate(["Ein Hund läuft."])             # -> ["A dog is running."]
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable, List, Sequence

import numpy as np

from export import candidates
from export import shortlist as shortlist_lib
from export.model_dir import GRAPHS, ModelDir, ModelDirError, StateSpec
from export.search import SearchOptions, left_pad, search

logger = logging.getLogger(__name__)


class OnnxStepModel:
    """The two graphs behind export/search.py's ``StepModel`` protocol, and its ``CandidateStepModel`` when the
    step graph has the in-graph candidates (export/candidates.py; graphs exported before them have not)."""

    def __init__(self, encoder, decoder_step, description: dict):
        import onnxruntime as ort

        self.ort, self.encoder, self.decoder_step = ort, encoder, decoder_step
        self.memory_names = description["io"]["encoder"]["outputs"][1:]
        self.states = [StateSpec.from_json(s) for s in description["states"]]
        self.outputs = description["io"]["decoder_step"]["outputs"]
        self.vocab_size = description["vocab_size"]
        self.candidates = set(candidates.OUTPUTS) <= set(self.outputs)  # else the search takes the log-probs
        self.log_probs_only = candidates.INPUTS if self.candidates else {}  # the extra inputs, passing them as is
        self.vocabulary: np.ndarray | None = None  # int64 [C]: the next search's shortlist (a shortlisted step)

    def start(self, src_tokens: np.ndarray, beam: int) -> None:
        """src_tokens int64 [B, S] -> the encoder's outputs (once per sentence, [B, ...]) and fresh states for
        B * beam rows, bound to a new I/O binding that the steps of this search reuse (only tokens, order, step and
        states change)."""
        outputs = self.encoder.run_with_ort_values(None, {"src_tokens": self.ort.OrtValue.ortvalue_from_numpy(src_tokens)})
        self.memory = dict(zip(["encoder_padding_mask", *self.memory_names], outputs))
        rows = src_tokens.shape[0] * beam
        self.values = [self.ort.OrtValue.ortvalue_from_numpy(s.initial(rows)) for s in self.states]
        self.step_index = 0
        self.binding = self.decoder_step.io_binding()
        for name, v in self.memory.items():
            self.binding.bind_ortvalue_input(name, v)
        if self.vocabulary is not None:
            self.binding.bind_cpu_input(shortlist_lib.INPUT, self.vocabulary)
        self.extra: dict = {}  # the extra inputs, bound at the first step; kept alive here for ONNX Runtime

    def keep(self, sentences: np.ndarray) -> None:
        """Only these sentences go on: their encoder outputs bound in place of the batch's (the states follow through
        the next step's order)."""
        value = self.ort.OrtValue.ortvalue_from_numpy
        self.memory = {name: value(np.ascontiguousarray(v.numpy()[sentences])) for name, v in self.memory.items()}
        for name, v in self.memory.items():
            self.binding.bind_ortvalue_input(name, v)

    def _run(self, tokens: np.ndarray, order: np.ndarray, outputs: list[str], extra: dict) -> list:
        """One step: feeds bound, the states advanced; returns the OrtValues of ``outputs`` (states excluded)."""
        binding = self.binding
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input("step", np.array(self.step_index, dtype=np.int64))
        binding.bind_cpu_input("order", np.ascontiguousarray(order, dtype=np.int64))
        if self.step_index == 0:  # the same for every step of a search
            self.extra = extra
            for name, v in extra.items():
                binding.bind_cpu_input(name, v)
            self.output_names = [*outputs, *(s.name + ".next" for s in self.states)]
        for state, v in zip(self.states, self.values):
            binding.bind_ortvalue_input(state.name, v)
        for name in self.output_names:  # unallocated: the states grow every step
            binding.bind_output(name, "cpu")
        self.decoder_step.run_with_iobinding(binding)
        found = binding.get_outputs()
        self.values = found[len(outputs):]
        self.step_index += 1
        return found[:len(outputs)]

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
    ``shortlist``: a vocabulary map (``lite data shortlist``; export/shortlist.py): each batch's search scores only
    the target tokens that its source words map to.
    Sentences longer than the model's source positions are truncated, with a warning (as the torch backend).
    """

    def __init__(self, model_dir: str | Path, options: SearchOptions = SearchOptions(), threads: int = 1,
                 batch_size: int = 64, format: str = "onnx", shortlist: str | Path | None = None):
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
        external = self.dir.external_weights() if format == "onnx" else {}  # sparse weights, expanded here
        if external:
            names = list(external)
            options_.add_external_initializers_from_files_in_memory(names, [external[n] for n in names],
                                                                    [external[n].nbytes for n in names])
        self.shortlist = self._shortlist(shortlist, format) if shortlist is not None else None
        graphs = {g: str(self.dir.graph(g, format)) for g in GRAPHS}
        if self.shortlist is not None:
            graphs["decoder_step"] = self._shortlisted_step()
        sessions = {g: ort.InferenceSession(graph, options_, providers=["CPUExecutionProvider"])
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
        self.max_source_tokens = d["max_source_positions"] - 1  # <eos> is appended
        self.seconds = 0.0  # time spent in translate(), for --timing
        self.sentences = 0

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
            hypos = search(self.model, left_pad([t for _, t in chunk], d["pad"]), eos=d["eos"], pad=d["pad"], unk=d["unk"],
                           options=self.options, max_len_cap=d["max_target_positions"] - 1)
            for (i, _), nbest in zip(chunk, hypos):
                outputs[i] = self.decode(nbest[0].tokens.tolist())
        self.seconds += time.perf_counter() - start
        self.sentences += len(todo)
        return outputs
