"""fairseq tasks of the project: ``--task sparse_translation``, translation fine-tuned under gradual fine-grained
magnitude pruning (``compress.sparsity``; ``lite compress sparsify`` sets it up).

It is fairseq's ``translation`` task plus a sparsity schedule: before each update's forward the masks move to the
schedule's sparsity at that update, after each optimizer step the masked weights are zeroed again, so every
checkpoint it saves has its zeros in place (and a resumed run takes its masks back from them).
"""

# No ``from __future__ import annotations`` here: fairseq reads the config's field types at run time.
from dataclasses import dataclass, field

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask


@dataclass
class SparseTranslationConfig(TranslationConfig):
    sparsity: float = field(default=0.0, metadata={"help": "final fraction of zeros in each pruned weight, in [0, 1)"})
    sparsity_begin: int = field(default=0, metadata={"help": "update at which pruning starts"})
    sparsity_end: int = field(default=0, metadata={"help": "update at which the final sparsity is reached"})
    sparsity_interval: int = field(default=10, metadata={"help": "updates between two mask changes"})
    sparsity_embeddings: bool = field(default=False, metadata={"help": "prune the embedding tables too"})


@register_task("sparse_translation", dataclass=SparseTranslationConfig)
class SparseTranslationTask(TranslationTask):
    def __init__(self, cfg: SparseTranslationConfig, src_dict, tgt_dict):
        from compress.sparsity import Schedule

        super().__init__(cfg, src_dict, tgt_dict)
        self.schedule = Schedule(cfg.sparsity, cfg.sparsity_begin, cfg.sparsity_end, cfg.sparsity_interval)
        self.sparsifier = None

    def _sparsifier(self, model):
        from compress.sparsity import Sparsifier

        if self.sparsifier is None:  # built at the first update, from the (possibly resumed) weights
            self.sparsifier = Sparsifier(model, self.schedule, self.cfg.sparsity_embeddings)
        return self.sparsifier

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        self._sparsifier(model).update(update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def optimizer_step(self, optimizer, model, update_num):
        super().optimizer_step(optimizer, model, update_num)
        self._sparsifier(model).apply()
