"""fairseq models of the project; importing this registers them."""
from lite.models import seq2seq, architectures, budgets  # noqa: F401,I001  (register the model, then its architectures)
from lite.models.seq2seq import LiteTransformerModel

__all__ = ["LiteTransformerModel"]
