"""Raw text in, detokenized text out, on the PyTorch/fairseq backend (fairseq's SequenceGenerator)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import torch

from export.search import SearchOptions
from lite.checkpoint import load_model
from lite.data import SPM_MODEL, Corpus

logger = logging.getLogger(__name__)


class TorchTranslator:
    """sentencepiece -> fairseq SequenceGenerator (beam search) -> sentencepiece, in batches."""

    def __init__(self, checkpoint: str | Path, data: str | Path | None = None,
                 options: SearchOptions = SearchOptions(), batch_size: int = 64):
        import sentencepiece as spm

        self.model, self.task = load_model(checkpoint, data)
        self.data_dir = Path(self.task.cfg.data)
        self.corpus = Corpus.load(self.data_dir)
        self.spm = spm.SentencePieceProcessor(model_file=str(self.data_dir / SPM_MODEL))
        self.batch_size = batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.options = options
        # <eos> is appended, so at most max_positions - 1 pieces fit
        self.max_source_tokens = self.model.encoder.max_positions() - 1

    @property
    def options(self) -> SearchOptions:
        return self._options

    @options.setter
    def options(self, options: SearchOptions) -> None:
        """New search options (a new SequenceGenerator over the same model)."""
        from fairseq.sequence_generator import SequenceGenerator

        self._options = options
        self.generator = SequenceGenerator(
            [self.model], self.task.target_dictionary, beam_size=options.beam, len_penalty=options.lenpen,
            max_len_a=options.max_len_a, max_len_b=options.max_len_b, min_len=options.min_len,
            no_repeat_ngram_size=options.no_repeat_ngram_size, unk_penalty=options.unk_penalty)

    def encode(self, line: str) -> torch.Tensor:
        """Raw sentence -> source token ids (with <eos>); over-long sentences are truncated, with a warning."""
        pieces = self.spm.encode(line.strip(), out_type=str)
        if len(pieces) > self.max_source_tokens:
            logger.warning(f"sentence of {len(pieces)} pieces truncated to the model's {self.max_source_tokens}")
            pieces = pieces[:self.max_source_tokens]
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
        for start in range(0, len(todo), self.batch_size):
            ids = list(range(start, min(start + self.batch_size, len(todo))))
            batch = dataset.collater([dataset[i] for i in ids])
            net_input = {k: v.to(self.device) for k, v in batch["net_input"].items()}
            hypos = self.generator.generate([self.model], {"net_input": net_input})
            for item, nbest in zip(batch["id"].tolist(), hypos):  # batch["id"]: positions in todo
                outputs[todo[item][0]] = self.decode(nbest[0]["tokens"].cpu())
        return outputs
