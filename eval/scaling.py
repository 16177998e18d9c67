"""Latency vs length (``lite scaling``): the encoder on L source tokens and one beam decoder step after L target
tokens, per architecture, on ONNX Runtime (fp32), so that what a mechanism buys on long inputs shows — softmax
attention's step grows with its cache, linear attention's state does not.

Each architecture is built at its preset with random weights (latency does not depend on training) and exported to
a temp dir with the toolkit's own exporter; the step's states are given L frames of random values (their shapes from
the model dir's state declarations), the memory is the encoder's output on L tokens. Each figure is the median of
``repeat`` timed runs after one warm-up.

``--train``: what a training update costs instead — CPU seconds of one forward + backward pass in PyTorch on a batch
of ``tokens // L`` sentences of L source and L target tokens, which is what sets how many updates a preset makes in
its CPU-time budget (``lite pipeline``'s 90 CPU-minutes). CPU time of the process (user + system), so a figure does
not depend on what else runs beside it as much as wall time does.

    lite scaling --arch transformer_100m,linear_100m,performer_100m --lengths 16,64,256,512 [--threads 1] [--json]
    lite scaling --arch transformer_100m,lsra_100m --lengths 15 --train [--tokens 3360]
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lite.errors import LiteError

BEAM = 4


class ScalingError(LiteError, ValueError):
    """No length the architecture can take, or an unknown architecture."""


@dataclass
class Point:
    arch: str
    length: int
    encoder_ms: float  # the encoder on ``length`` source tokens, batch 1
    step_ms: float  # one decoder step on ``BEAM`` hypotheses after ``length`` target tokens, memory of ``length``
    state_bytes: int  # the decoder state carried from step to step, all hypotheses


@dataclass
class TrainPoint:
    arch: str
    length: int
    sentences: int  # the batch: tokens // length sentences of ``length`` source and ``length`` target tokens
    step_s: float  # CPU seconds of one training step (forward + backward)


def _median_ms(run, repeat: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 3)


def measure(arch: str, lengths: list[int], repeat: int = 20, threads: int = 1, vocab_size: int = 8000) -> list[Point]:
    """Latency of ``arch`` at each length it takes (see the module doc); lengths past its fixed maximum (Synthesizer,
    Linformer, BigBird: 256 positions) are left out."""
    import onnxruntime as ort

    from export import candidates
    from export.exporter import export_graphs
    from export.model_dir import StateSpec
    model, lengths = _build(arch, lengths, vocab_size)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        description = export_graphs(model, Path(tmp))
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        encoder, step = (ort.InferenceSession(str(Path(tmp) / f"{g}.onnx"), options, providers=["CPUExecutionProvider"])
                         for g in ("encoder", "decoder_step"))
    states = [StateSpec.from_json(s) for s in description["states"]]
    memory_names = description["io"]["encoder"]["outputs"]
    points = []
    for length in lengths:
        src = rng.integers(4, vocab_size, size=(1, length), dtype=np.int64)  # [1, L], no special tokens
        encoder_ms = _median_ms(lambda: encoder.run(None, {"src_tokens": src}), repeat)
        memory = dict(zip(memory_names, encoder.run(None, {"src_tokens": src})))  # once per sentence, as decoded
        state = {}
        for s in states:
            shape = s.initial_shape(BEAM)
            if s.time_axis is not None:
                shape[s.time_axis] = length
            state[s.name] = rng.standard_normal(shape).astype(s.dtype) if np.dtype(s.dtype).kind == "f" \
                else np.full(shape, s.fill, dtype=s.dtype)
        feeds = {"tokens": rng.integers(4, vocab_size, size=BEAM, dtype=np.int64),
                 "step": np.array(length, dtype=np.int64), "order": np.arange(BEAM, dtype=np.int64),
                 **memory, **state, **{**candidates.INPUTS, "k": np.array([2 * BEAM], dtype=np.int64)}}
        step_ms = _median_ms(lambda: step.run(None, feeds), repeat)
        points.append(Point(arch, length, encoder_ms, step_ms, sum(v.nbytes for v in state.values())))
    return points


def _build(arch: str, lengths: list[int], vocab_size: int):
    """``arch`` at its preset with random weights, and the lengths it takes (longer ones are left out of its row:
    "–" in the table)."""
    from lite.models.factory import build_arch, lite_archs

    if arch not in lite_archs():
        raise ScalingError(f"--arch {arch}: not a registered architecture (see `lite macs --markdown`)")
    model = build_arch(arch, vocab_size=vocab_size)
    limit = min(model.encoder.max_positions(), model.decoder.max_positions()) - 2  # mixers' fixed lengths included
    lengths = [n for n in lengths if n <= limit]
    if not lengths:
        raise ScalingError(f"--lengths: {arch} takes at most {limit} tokens")
    return model, lengths


def measure_training(arch: str, lengths: list[int], tokens: int = 3360, repeat: int = 3, threads: int = 1,
                     vocab_size: int = 8000) -> list[TrainPoint]:
    """CPU seconds of a training step of ``arch`` at each length it takes (see the module doc): the median of
    ``repeat`` steps after one warm-up, on random tokens (cost does not depend on them)."""
    import torch
    import torch.nn.functional as F

    model, lengths = _build(arch, lengths, vocab_size)
    model.train()
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    points = []
    for length in lengths:
        sentences = max(1, tokens // length)
        src, tgt = (torch.randint(4, vocab_size, (sentences, length), generator=generator) for _ in range(2))
        src_lengths = torch.full((sentences,), length)

        def step() -> float:
            start = time.process_time()
            logits, _ = model(src, src_lengths, tgt)  # [N, L, V]
            F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1)).backward()
            model.zero_grad(set_to_none=True)
            return time.process_time() - start

        step()  # warm-up
        points.append(TrainPoint(arch, length, sentences, round(float(np.median([step() for _ in range(repeat)])), 3)))
    return points


def markdown(points: list[Point], threads: int) -> str:
    lengths = sorted({p.length for p in points})
    archs = list(dict.fromkeys(p.arch for p in points))
    by = {(p.arch, p.length): p for p in points}
    head = "| `--arch` | " + " | ".join(f"L = {n}" for n in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    rows = []
    for what, field in (("encoder, ms", "encoder_ms"), (f"decoder step (beam {BEAM}), ms", "step_ms"),
                        ("decoder state, KiB", "state_bytes")):
        rows.append(f"| **{what}** |" + " |" * len(lengths))
        scale = 1 / 1024 if field == "state_bytes" else 1
        rows += [f"| `{a}` | " + " | ".join(f"{round(getattr(by[a, n], field) * scale, 1):g}" if (a, n) in by else "–"
                                           for n in lengths) + " |" for a in archs]
    note = (f"ONNX Runtime fp32, {threads} thread(s), random weights; encoder on L source tokens (batch 1), one step "
            f"after L target tokens with a memory of L; – beyond the architecture's fixed maximum length. "
            f"Generated by `lite scaling`.")
    return "\n".join([head, rule, *rows, "", note])


def training_markdown(points: list[TrainPoint], threads: int) -> str:
    lengths = sorted({p.length for p in points})
    by = {(p.arch, p.length): p for p in points}
    sentences = {p.length: p.sentences for p in points}
    head = "| `--arch` | " + " | ".join(f"L = {n} ({sentences[n]} sentences)" for n in lengths) + " |"
    rows = [f"| `{a}` | " + " | ".join(f"{by[a, n].step_s:g}" if (a, n) in by else "–" for n in lengths) + " |"
            for a in dict.fromkeys(p.arch for p in points)]
    note = (f"CPU seconds of one training step (forward + backward, PyTorch, {threads} thread(s)) on a batch of "
            f"L + L-token sentences; – beyond the architecture's fixed maximum length. Generated by `lite scaling "
            f"--train`.")
    return "\n".join([head, "|---|" + "---:|" * len(lengths), *rows, "", note])


def to_json(points: list[Point] | list[TrainPoint]) -> list[dict]:
    return [asdict(p) for p in points]
