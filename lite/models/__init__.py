"""fairseq models of the project; importing this registers them (and lets torch's weights-only loader read
fairseq checkpoints)."""
import logging

logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)  # it asks for tensorboardX at import

from lite.checkpoint import allow_fairseq_checkpoints  # noqa: E402

allow_fairseq_checkpoints()

from lite.models import seq2seq, architectures, budgets  # noqa: F401,I001,E402  (the model, then its architectures)
from lite.models.seq2seq import LiteTransformerModel  # noqa: E402

__all__ = ["LiteTransformerModel"]
