"""BLEU and chrF with sacrebleu, in one place (detokenized text, default 13a tokenization, with signatures)."""
from __future__ import annotations

from typing import Sequence


def score(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF (rounded to 2 decimals) with their sacrebleu signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu, chrf = BLEU(), CHRF()
    return {
        "bleu": round(bleu.corpus_score(list(hypotheses), [list(references)]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": round(chrf.corpus_score(list(hypotheses), [list(references)]).score, 2),
        "chrf_signature": str(chrf.get_signature()),
    }


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU, unrounded."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return BLEU().corpus_score(list(hypotheses), [list(references)]).score
