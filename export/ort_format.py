"""ORT-format graphs (ONNX Runtime Mobile) of a model dir's ONNX graphs. Torch-free."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from export.model_dir import GRAPHS


def to_ort(model_dir: Path) -> list[Path]:
    """Convert ``model_dir/<graph>.onnx`` into ``model_dir/ort/<graph>.ort`` (fixed optimizations); returns them."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory() as tmp:
        for graph in GRAPHS:
            shutil.copy(model_dir / f"{graph}.onnx", tmp)
        convert_onnx_models_to_ort(Path(tmp), output_dir=model_dir / "ort",
                                   optimization_styles=[OptimizationStyle.Fixed])
    return sorted((model_dir / "ort").glob("*.ort"))
