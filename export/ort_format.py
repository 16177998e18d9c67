"""ORT-format graphs (ONNX Runtime Mobile) of a model dir's ONNX graphs. Torch-free."""
from __future__ import annotations

import tempfile
from pathlib import Path

from export.model_dir import GRAPHS


def to_ort(model_dir: Path) -> list[Path]:
    """Convert ``model_dir/<graph>.onnx`` into ``model_dir/ort/<graph>.ort`` (fixed optimizations); returns them.
    An ORT-format graph holds its weights (external data, as the compact layout's, is read in)."""
    import onnx
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory() as tmp:
        for graph in GRAPHS:
            onnx.save(onnx.load(str(model_dir / f"{graph}.onnx")), str(Path(tmp) / f"{graph}.onnx"))
        convert_onnx_models_to_ort(Path(tmp), output_dir=model_dir / "ort",
                                   optimization_styles=[OptimizationStyle.Fixed])
    return sorted((model_dir / "ort").glob("*.ort"))
