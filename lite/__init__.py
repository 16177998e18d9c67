"""lite: lite transformer translation models, from fairseq training to a device.

As fairseq's ``--user-dir lite`` (fairseq is imported first), importing ``lite`` registers the models; anywhere
else it imports nothing heavy, so the torch-free parts (``lite.errors``, ``lite.files``, the ONNX runtime) stay
torch-free. Code that builds models imports ``lite.models``, which registers them.
"""
import sys

__version__ = "0.1.0"

if "fairseq" in sys.modules:
    from lite import models  # noqa: F401  (registers the architectures with fairseq)
