"""lite: lite transformer translation models, from fairseq training to a device.

Importing ``lite`` registers the models with fairseq (``fairseq-train --user-dir lite``) and
lets torch's weights-only loader read fairseq checkpoints.
"""
import logging

from lite.checkpoint import allow_fairseq_checkpoints

logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)  # it asks for tensorboardX at import

allow_fairseq_checkpoints()

from lite import models  # noqa: E402,F401  (registers architectures with fairseq)

__version__ = "0.1.0"
