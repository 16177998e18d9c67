"""The CPU a figure was measured on. A CPU-minute bought an LSRA training about twice the updates on AVX-512 VNNI
servers that it bought on an AVX2-only one (README, "Measured"), and int8 kernels differ with the same extensions,
so every time and every CPU-time budget is recorded with it. Torch-free: the bench's parent process and the ONNX runtime read it too."""
from __future__ import annotations

import os
import platform
from pathlib import Path

# the vector extensions that choose torch's and ONNX Runtime's CPU kernels, most capable first
# (x86: /proc/cpuinfo "flags"; ARM: "Features", where asimddp is the int8 dot product)
EXTENSIONS = ("avx512_vnni", "avx512f", "avx_vnni", "avx2", "avx", "sve", "asimddp", "asimd")


def describe(cpuinfo: str | None = None) -> dict:
    """{"cpu": model name, "isa": the most capable of EXTENSIONS present ("" if none), "cores", "arch",
    "python"}; ``cpuinfo`` is /proc/cpuinfo's text (read when not given; empty where there is none)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first core's
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "isa": next((name for name in EXTENSIONS if name in flags), ""),
            "cores": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version()}
