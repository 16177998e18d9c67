"""fairseq models (and tasks) of the project; importing this registers them (and lets torch's weights-only loader read
fairseq checkpoints)."""
import logging

logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)  # it asks for tensorboardX at import

from lite.checkpoint import allow_fairseq_checkpoints  # noqa: E402

allow_fairseq_checkpoints()

from lite.models import seq2seq, architectures, budgets  # noqa: F401,I001,E402  (the model, then its architectures)
from lite.models.seq2seq import LiteTransformerModel  # noqa: E402
from lite import tasks  # noqa: F401,E402  (and the task of sparse fine-tunes, which their checkpoints name)

__all__ = ["LiteTransformerModel"]
