"""``make arm64-check`` (not in CI): the ORT-format graphs of a model dir on ARM64 under emulation, against x86.

    python -m eval.arm64_check [MODEL_DIR] [--source FILE | --split NAME] [--sentences 50] [--out JSON]

MODEL_DIR (default: ``runs/embedded/lsra/onnx/int8``, made by ``make demo``) is run in ORT format: its own ``ort/``
graphs (``lite export --ort``, kept by ``lite compress quantize``), else a copy converted as ``lite export --ort``
converts, made once under ``--cache``. Both sides run the torch-free translator (``lite.translate``, backend
``ort``, one thread, batch 1, beam 4) in a worker process on the first N lines of the model's test split:
    x86_64  this venv's Python
    arm64   Debian bookworm's arm64 Python 3.11 with aarch64 wheels of onnxruntime, numpy and sentencepiece at this
            venv's versions, run by ``qemu-aarch64-static -cpu cortex-a76 -L ROOT`` (no binfmt needed), with this
            repo on PYTHONPATH (no torch, no fairseq). ROOT: ``debootstrap --foreign`` and every package unpacked
            with ``dpkg -x`` (nothing runs emulated to install), made once under ``--cache``.
The Cortex-A76 (ARMv8.2-A with dot product, a common phone big core) decides which int8 kernels ONNX Runtime picks.
The result (printed, and written to ``--out``): identical and differing hypotheses (the first few that differ), peak
RSS (VmHWM; on arm64 that of the qemu process: the guest's memory plus the emulator's), the share of node time per
operator from ONNX Runtime's profiler on each side (a second pass on the first ``PROFILED`` sentences) and the
versions. Emulated times are not latencies (an instruction costs what its translation costs, not what it costs on
a core), so only time shares are reported; measure latency with ``lite bench`` on the board itself.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from export.model_dir import GRAPHS, ModelDir
from export.search import SearchOptions
from lite.errors import LiteError

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "runs/embedded/lsra/onnx/int8"
DEFAULT_CACHE = Path.home() / ".cache" / "lite" / "arm64"
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
PYTHON = "usr/bin/python3.11"  # bookworm's; the wheels below are for it (cp311, glibc 2.36)
PYTHON_DEBS = ("python3.11-minimal", "libpython3.11-stdlib")
WHEELS = ("onnxruntime", "numpy", "sentencepiece")
WHEEL_TAGS = ("--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64", "--only-binary=:all:",
              "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")
QEMU, CPU = "qemu-aarch64-static", "cortex-a76"
# qemu-user 7.2 shows the guest the host's x86 /proc/cpuinfo, in which ONNX Runtime's cpuinfo finds no ARM core and
# crashes on import (SIGSEGV); with -L, qemu serves ROOT/proc/cpuinfo instead: qemu's cortex-a76 (MIDR r4p1)
CPUINFO = ("processor\t: {n}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
           "asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
           "CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n")
READY = ".lite-ready"
# the profiler keeps every event in memory (about 1 GB over 50 sentences of the demo model), so it runs on these
# first sentences in a second pass, after the peak RSS of the plain pass has been read
PROFILED = 10
NOTE = "emulated times are not latencies: op shares only; measure latency with `lite bench` on the board"


class Arm64Error(LiteError, RuntimeError):
    """The emulated side cannot be prepared or run; the message names the tool or file and the fix."""


# ---------------------------------------------------------------------------------------------- pure logic

def op_shares(events: list[dict]) -> dict[str, float]:
    """ONNX Runtime profile events (Chrome trace JSON) -> share of node time per operator type, largest first."""
    totals: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    whole = sum(totals.values())
    return {op: round(t / whole, 4) for op, t in totals.most_common()} if whole else {}


def compare(sources: list[str], x86: list[str], arm64: list[str], examples: int = 5) -> dict:
    """Identical and differing hypotheses of the two sides, with the first ``examples`` that differ."""
    if not len(sources) == len(x86) == len(arm64):
        raise Arm64Error(f"{len(sources)} sources but {len(x86)} x86 and {len(arm64)} arm64 hypotheses")
    differing = [i for i, (a, b) in enumerate(zip(x86, arm64)) if a != b]
    return {"identical": len(sources) - len(differing), "differing": len(differing),
            "examples": [{"line": i + 1, "source": sources[i], "x86_64": x86[i], "arm64": arm64[i]}
                         for i in differing[:examples]]}


# ---------------------------------------------------------------------------------------------- in the worker

def translate_profiled(model: str, sources: list[str], beam: int, profile_dir: str) -> dict:
    """The ``ort`` translator on ``sources`` (one thread, batch 1), then on the first ``PROFILED`` of them with ONNX
    Runtime's profiler writing into ``profile_dir``; hypotheses, peak RSS of the first pass, profile files and
    versions. Torch-free: it runs on the arm64 side."""
    import numpy
    import onnxruntime as ort
    import sentencepiece

    from eval.bench import _status_mb
    from lite.translate import open_translator

    rss_libs = _status_mb("VmRSS")
    translator, _ = open_translator("ort", model, options=SearchOptions(beam=beam), threads=1, batch_size=1)
    hypotheses = translator.translate(sources)
    peak_rss = _status_mb("VmHWM")
    options = translator.model.encoder.get_session_options()  # the translator's own, for both graphs
    translator.model.encoder = translator.model.decoder_step = None  # freed before the profiled sessions load
    for graph in GRAPHS:
        options.enable_profiling, options.profile_file_prefix = True, str(Path(profile_dir) / graph)
        setattr(translator.model, graph, ort.InferenceSession(str(translator.dir.graph(graph, "ort")), options,
                                                              providers=["CPUExecutionProvider"]))
    translator.translate(sources[:PROFILED])
    return {"hypotheses": hypotheses, "profiles": [getattr(translator.model, g).end_profiling() for g in GRAPHS],
            "rss_libs_mb": round(rss_libs, 1), "peak_rss_mb": round(peak_rss, 1),
            "machine": platform.machine(), "python": platform.python_version(),
            "versions": {m.__name__: m.__version__ for m in (ort, numpy, sentencepiece)}}


def _worker() -> None:
    """Read translate_profiled's arguments as JSON on stdin, print its result as JSON."""
    print(json.dumps(translate_profiled(**json.loads(sys.stdin.read()))))


# ---------------------------------------------------------------------------------------------- the arm64 side

def _call(cmd: list[str], **kwargs) -> str:
    """Run a setup command; its stdout, or Arm64Error with the last line it wrote."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()][-1:] or ["no output"]
        raise Arm64Error(f"{Path(cmd[0]).name} exited with {proc.returncode}: {tail[0]}")
    return proc.stdout


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Arm64Error(f"{name} not found; install Debian's tools: apt-get install qemu-user-static debootstrap")
    return path


def prepare_root(cache: Path) -> Path:
    """Debian arm64 with Python 3.11 under ``cache`` (made once): debootstrap's first stage resolves and downloads
    the packages, ``dpkg -x`` unpacks every one. Its /proc/cpuinfo is (re)written to match qemu's CPU."""
    from lite.files import staged_dir

    root = cache / f"debian-{SUITE}-arm64"
    if not (root / READY).is_file():
        logger.info(f"preparing {root} (debootstrap, once)")
        with staged_dir(root, READY, force=False, what="arm64 root") as staging:
            _call([_tool("debootstrap"), "--foreign", "--arch=arm64", "--variant=minbase",
                   f"--include={','.join(PYTHON_DEBS)}", SUITE, str(staging), MIRROR])
            for deb in sorted((staging / "var/cache/apt/archives").glob("*.deb")):
                _call([_tool("dpkg"), "-x", str(deb), str(staging)])
                deb.unlink()
            (staging / READY).touch()
    last_cpu = int(re.split("[-,]", Path("/sys/devices/system/cpu/possible").read_text().strip())[-1])
    (root / "proc" / "cpuinfo").write_text("".join(CPUINFO.format(n=n) for n in range(last_cpu + 1)))
    return root


def prepare_site(cache: Path, pins: dict[str, str]) -> Path:
    """The aarch64 wheels at ``pins`` ({name: version}), unpacked under ``cache`` by pip (made once per pins)."""
    from lite.files import staged_dir

    site = cache / "site-cp311" / "+".join(f"{n}-{v}" for n, v in pins.items())
    if not (site / READY).is_file():
        logger.info(f"installing aarch64 wheels into {site}")
        with staged_dir(site, READY, force=False, what="arm64 site-packages") as staging:
            _call([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                   "--target", str(staging), *WHEEL_TAGS, *(f"{n}=={v}" for n, v in pins.items())])
            (staging / READY).touch()
    return site


# ---------------------------------------------------------------------------------------------- the check

def _run_side(side: str, cmd: list[str], env: dict, model: Path, sources: list[str], beam: int) -> dict:
    """One worker (``cmd``: its Python) on ``sources``; its result with the profile reduced to op shares."""
    with tempfile.TemporaryDirectory(prefix="arm64-check-") as profile_dir:
        job = {"model": str(model), "sources": sources, "beam": beam, "profile_dir": profile_dir}
        proc = subprocess.run([*cmd, "-c", "from eval.arm64_check import _worker; _worker()"], input=json.dumps(job),
                              capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
            raise Arm64Error(f"the {side} worker exited with {proc.returncode}: {tail[0]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        events = [e for path in result.pop("profiles") for e in json.loads(Path(path).read_text())]
    return {**result, "op_shares": op_shares(events)}


def default_sources(model_dir: ModelDir, split: str | None) -> Path:
    """``<data>/raw/<split>.<src>`` of the data dir that model.json names; ``split`` defaults to its test split."""
    from lite.data import REQUIRED_SPLITS, Corpus

    data = Path(model_dir.description["data"])
    corpus = Corpus.load(data)
    tests = [s for s in corpus.splits if s not in REQUIRED_SPLITS]
    if split is None and not tests:
        raise Arm64Error(f"{data} has no test split (only {', '.join(corpus.splits)}); pass --source FILE")
    return data / "raw" / f"{split or tests[0]}.{corpus.src}"


def with_ort(model_dir: ModelDir, cache: Path) -> ModelDir:
    """``model_dir`` if it has ORT-format graphs, else a copy with them under ``cache`` (made once per model.json)."""
    from export.model_dir import DESCRIPTION, sha256, stage, write_description
    from export.ort_format import to_ort

    if model_dir.has_ort:
        return model_dir
    out = cache / "models" / sha256(model_dir.path / DESCRIPTION)[:16]
    if not (out / DESCRIPTION).is_file():
        logger.info(f"{model_dir.path} has no ort/ graphs: converting a copy into {out}")
        with stage(out) as staging:
            for name in model_dir.description["files"]:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(model_dir.file(name), staging / name)
            to_ort(staging)
            write_description(staging, dict(model_dir.description))
    return ModelDir.open(out)


def check(model_dir: ModelDir, sources: list[str], cache: Path = DEFAULT_CACHE, beam: int = 4) -> dict:
    """Translate ``sources`` with the model dir's ORT-format graphs on x86 (here) and arm64 (emulated); the report."""
    model = with_ort(model_dir, cache).path.resolve()
    qemu = _tool(QEMU)
    root, site = prepare_root(cache), prepare_site(cache, {n: version(n) for n in WHEELS})
    x86 = _run_side("x86_64", [sys.executable], dict(os.environ), model, sources, beam)
    guest_env = {"PYTHONPATH": f"{site}{os.pathsep}{REPO}", "PYTHONNOUSERSITE": "1"}
    arm64 = _run_side("arm64", [qemu, "-cpu", CPU, "-L", str(root), str(root / PYTHON)], guest_env, model, sources,
                      beam)
    if arm64["machine"] != "aarch64":
        raise Arm64Error(f"the emulated worker ran on {arm64['machine']}, not aarch64")
    arm64["emulator"] = f"{_call([qemu, '--version']).splitlines()[0]}, -cpu {CPU}, Debian " \
                        f"{(root / 'etc/debian_version').read_text().strip()}"
    return {"model": str(model_dir.path.resolve()), "ort_model": str(model), "sentences": len(sources), "beam": beam,
            "batch": 1, "threads": 1, "profiled_sentences": min(PROFILED, len(sources)),
            **compare(sources, x86["hypotheses"], arm64["hypotheses"]), "note": NOTE, "x86_64": x86, "arm64": arm64}


def summary(report: dict, top: int = 5) -> str:
    """The report in a few lines."""
    def shares(side: dict) -> str:
        return ", ".join(f"{op} {100 * s:.1f}%" for op, s in list(side["op_shares"].items())[:top])

    a, x = report["arm64"], report["x86_64"]
    lines = [f"{report['sentences']} sentences: {report['identical']} identical, {report['differing']} differing "
             f"(arm64 under {a['emulator']} vs x86_64)"]
    lines += [f"  line {e['line']}: x86 {e['x86_64']!r} | arm64 {e['arm64']!r}" for e in report["examples"]]
    lines += [f"op shares arm64 ({NOTE}; first {report['profiled_sentences']} sentences): {shares(a)}",
              f"op shares x86_64: {shares(x)}",
              f"peak RSS: arm64 {a['peak_rss_mb']} MB (qemu process; {a['rss_libs_mb']} MB with the libraries "
              f"imported, no model), x86_64 {x['peak_rss_mb']} MB ({x['rss_libs_mb']} MB)",
              f"versions: arm64 Python {a['python']} {a['versions']}; x86_64 Python {x['python']} {x['versions']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from lite.cli.types import positive_int
    from lite.files import write_json
    from lite.text import read_lines

    p = argparse.ArgumentParser(prog="python -m eval.arm64_check", description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model dir, int8 (default: {DEFAULT_MODEL}, made by `make demo`)")
    p.add_argument("--source", help="source sentences, one a line (default: the model's test split)")
    p.add_argument("--split", help="a split of the model's data dir instead (default: its test split)")
    p.add_argument("--sentences", type=positive_int, default=50, help="the first N non-empty lines (default: 50)")
    p.add_argument("--beam", type=positive_int, default=4)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"arm64 root, wheels, ORT-format copies (default: {DEFAULT_CACHE})")
    p.add_argument("--out", help="the JSON report (default: <model dir>.arm64.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if not (Path(args.model) / "model.json").is_file() and args.model == DEFAULT_MODEL:
            raise Arm64Error(f"{DEFAULT_MODEL}: no model dir; make it with `make demo` or pass a model dir")
        model_dir = ModelDir.open(args.model)
        source = args.source or default_sources(model_dir, args.split)
        sources = [line for line in read_lines(source) if line.strip()][:args.sentences]
        if not sources:
            raise Arm64Error(f"{source}: no non-empty line to translate")
        report = {"source": str(source), **check(model_dir, sources, args.cache, args.beam)}
        out = Path(args.out or f"{model_dir.path.resolve()}.arm64.json")
        write_json(out, report)
    except LiteError as e:
        print(f"arm64-check: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{summary(report)}\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
