"""Raw text in, detokenized text out, on the PyTorch/fairseq backend (fairseq's SequenceGenerator)."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from lite.checkpoint import CheckpointError
from lite.data import CORPUS_FILE, SPM_MODEL, Corpus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationOptions:
    """Beam search settings, with fairseq-generate's meaning."""

    beam: int = 4
    lenpen: float = 1.0
    max_len_a: float = 1.2  # max output length = a * source length + b
    max_len_b: int = 10
    batch_size: int = 64  # sentences per batch

    def __post_init__(self):
        if self.beam < 1 or self.batch_size < 1:
            raise ValueError(f"beam ({self.beam}) and batch size ({self.batch_size}) must be >= 1")


def read_stdin_lines() -> list[str]:
    """stdin as UTF-8 lines; a bad byte is reported with its line number."""
    lines = []
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            lines.append(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError as e:
            raise CheckpointError(f"<stdin>:{number}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return lines


def load_checkpoint(path: str | Path, data: str | Path | None = None):
    """(model in eval mode, task) from a fairseq checkpoint; ``data`` overrides the data dir it was trained on."""
    from fairseq import checkpoint_utils
    from fairseq.data import Dictionary

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    overrides = {"data": str(data)} if data else {}
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path), arg_overrides=overrides)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not a loadable fairseq checkpoint ({type(e).__name__}: {e})") from None
    data_dir = Path(state["cfg"]["task"].data)
    if not (data_dir / CORPUS_FILE).is_file():
        raise CheckpointError(f"{path}: {data_dir} is not a prepared data dir; pass --data DIR (the dir made by "
                              f"`lite data prepare` that the checkpoint was trained on)")
    dict_path = data_dir / f"dict.{Corpus.load(data_dir).src}.txt"
    trained_vocab = state["model"]["encoder.embed_tokens.weight"].size(0)
    if trained_vocab != len(Dictionary.load(str(dict_path))):
        raise CheckpointError(f"{path} was trained with a {trained_vocab}-entry dictionary but {dict_path} has "
                              f"{len(Dictionary.load(str(dict_path)))}: pass the --data dir it was trained on")
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides=overrides, state=state)
    return models[0].eval(), task


class TorchTranslator:
    """sentencepiece -> fairseq SequenceGenerator (beam search) -> sentencepiece, in batches."""

    def __init__(self, checkpoint: str | Path, data: str | Path | None = None,
                 options: GenerationOptions = GenerationOptions()):
        import sentencepiece as spm
        from fairseq.sequence_generator import SequenceGenerator

        self.model, self.task = load_checkpoint(checkpoint, data)
        self.data_dir = Path(self.task.cfg.data)
        self.corpus = Corpus.load(self.data_dir)
        self.spm = spm.SentencePieceProcessor(model_file=str(self.data_dir / SPM_MODEL))
        self.options = options
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.generator = SequenceGenerator(
            [self.model], self.task.target_dictionary, beam_size=options.beam, len_penalty=options.lenpen,
            max_len_a=options.max_len_a, max_len_b=options.max_len_b)
        # <eos> is appended, so at most max_positions - 1 pieces fit
        self.max_source_pieces = self.model.encoder.max_positions() - 1

    def encode(self, line: str) -> torch.Tensor:
        """Raw sentence -> source token ids (with <eos>); over-long sentences are truncated, with a warning."""
        pieces = self.spm.encode(line.strip(), out_type=str)
        if len(pieces) > self.max_source_pieces:
            logger.warning(f"sentence of {len(pieces)} pieces truncated to the model's {self.max_source_pieces}")
            pieces = pieces[:self.max_source_pieces]
        return self.task.source_dictionary.encode_line(" ".join(pieces), add_if_not_exist=False, append_eos=True).long()

    def decode(self, tokens: torch.Tensor) -> str:
        pieces = self.task.target_dictionary.string(tokens)
        return self.spm.decode(pieces.split())

    @torch.inference_mode()
    def translate(self, lines: Iterable[str]) -> list[str]:
        """One output line per input line; empty input lines give empty output lines."""
        lines = list(lines)
        outputs = [""] * len(lines)
        todo = [(i, self.encode(line)) for i, line in enumerate(lines) if line.strip()]
        todo.sort(key=lambda item: len(item[1]))  # similar lengths share a batch: less padding
        dataset = self.task.build_dataset_for_inference([t for _, t in todo], [len(t) for _, t in todo])
        for start in range(0, len(todo), self.options.batch_size):
            ids = list(range(start, min(start + self.options.batch_size, len(todo))))
            batch = dataset.collater([dataset[i] for i in ids])
            net_input = {k: v.to(self.device) for k, v in batch["net_input"].items()}
            hypos = self.generator.generate([self.model], {"net_input": net_input})
            for item, nbest in zip(batch["id"].tolist(), hypos):  # batch["id"]: positions in todo
                outputs[todo[item][0]] = self.decode(nbest[0]["tokens"].cpu())
        return outputs
