"""The model dir: what ``lite export`` writes and the ONNX translator reads. Torch-free.

    DIR/model.json                            special ids, limits, decoder states, validation, sha256 of every file
    DIR/encoder.onnx, DIR/decoder_step.onnx   the graphs
    DIR/ort/*.ort                             optional: the same graphs in ORT format (ONNX Runtime Mobile)
    DIR/spm.model, DIR/vocab.txt              sentencepiece model; the dictionary, one symbol per line by index
    DIR/weights.bin or DIR/weights.packed     optional: the compact int8 layout's external data (compress/compact.py),
                                              packed when its tensors are sparse (export/packed_weights.py)

Opening a dir checks it before anything is used: every name in ``files`` is a plain relative name inside the dir
(no ``..``, not absolute, no symlink), every listed file exists and matches its sha256, and every file the
translator or compress opens is looked up through ``ModelDir.file`` (listed, so checked). Writing stages a new dir
beside the target and moves it in atomically (``lite.files``); ``--force`` replaces only a dir holding model.json.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional, Tuple

import numpy as np

from lite.errors import LiteError
from lite.files import staged_dir, write_json

FORMAT = 2  # 2: the decoder step reads the encoder's outputs once per sentence, not per hypothesis
GRAPHS = ("encoder", "decoder_step")
DESCRIPTION = "model.json"
# what the translator reads from model.json; a dir without one of them is refused when opened
REQUIRED_KEYS = ("format", "files", "src", "tgt", "bos", "pad", "eos", "unk", "vocab_size", "max_source_positions",
                 "max_target_positions", "io", "states")
MAX_FILE_BYTES = 2 ** 31  # a graph's protobuf cannot exceed 2 GiB; no file of an edge model comes near it


class ModelDirError(LiteError, ValueError):
    """A model dir that cannot be used: missing, altered, mismatched or unsafe files; the message names the file."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_name(root: Path, name: str) -> Path:
    """``root / name`` for a plain relative name that stays inside ``root``; ModelDirError otherwise."""
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or PurePosixPath(name).is_absolute() or any(p in ("..", ".") for p in parts):
        raise ModelDirError(f"{root / DESCRIPTION}: file name {name!r} is not a plain relative name inside the dir")
    path = root / name
    if any((root / PurePosixPath(*parts[:i + 1])).is_symlink() for i in range(len(parts))):
        raise ModelDirError(f"{root}: {name} is a symbolic link; a model dir holds plain files only")
    return path


@dataclass(frozen=True)
class StateSpec:
    """One tensor of the decoder's state (an entry of model.json's ``states``): where it lives in the model and how
    it starts."""

    name: str  # graph input name; the output is ``name + ".next"``
    module: str  # qualified name of the owning module in the decoder
    key: str  # its incremental-state key
    field: Optional[str]  # entry of a dict-valued state (fairseq attention), else None
    dtype: str  # numpy dtype name
    shape: Tuple[int, ...]  # before the first step, at batch 1
    batch_axis: int
    time_axis: Optional[int]  # the axis that grows by one frame a step, if any
    fill: float  # every element's value before the first step

    @classmethod
    def from_json(cls, entry: dict) -> "StateSpec":
        return cls(**{**entry, "shape": tuple(entry["shape"])})

    def to_json(self) -> dict:
        return asdict(self)

    def initial_shape(self, rows: int) -> list[int]:
        shape = list(self.shape)
        shape[self.batch_axis] = rows
        return shape

    def initial(self, rows: int) -> np.ndarray:
        """The state before the first step for ``rows`` hypotheses."""
        return np.full(self.initial_shape(rows), self.fill, dtype=self.dtype)


@dataclass(frozen=True)
class ModelDir:
    """A checked model dir: ``description`` is its model.json, ``file(name)`` the path of a listed file."""

    path: Path
    description: dict

    @classmethod
    def open(cls, path: str | Path) -> "ModelDir":
        """Read model.json and check every file it lists (names, presence, sha256)."""
        root = Path(path)
        meta = root / DESCRIPTION
        if not meta.is_file():
            raise ModelDirError(f"{root}: no {DESCRIPTION}; make a model dir with `lite export CHECKPOINT --out DIR`")
        try:
            description = json.loads(meta.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelDirError(f"{meta}: not valid JSON ({e})") from None
        if not isinstance(description, dict):
            raise ModelDirError(f"{meta}: not a JSON object")
        missing = [k for k in REQUIRED_KEYS if k not in description]
        if missing:
            raise ModelDirError(f"{meta}: missing {', '.join(missing)}; re-export the model with `lite export`")
        if description["format"] != FORMAT:
            raise ModelDirError(f"{meta}: format {description['format']!r}, this toolkit reads format {FORMAT}: "
                                 "re-export the model with `lite export`")
        if not isinstance(description["files"], dict):
            raise ModelDirError(f"{meta}: 'files' is not a mapping of file name to sha256")
        for name, digest in description["files"].items():
            file = _check_name(root, name)
            if not file.is_file():
                raise ModelDirError(f"{root}: {name} is missing")
            if file.stat().st_size > MAX_FILE_BYTES:  # refused before it is read, let alone hashed or loaded
                raise ModelDirError(f"{root}: {name} is {file.stat().st_size:,} bytes, over the {MAX_FILE_BYTES:,} "
                                    f"a model dir's file may hold")
            if sha256(file) != digest:
                raise ModelDirError(f"{root}: {name} does not match its sha256 in {DESCRIPTION} (altered or corrupt)")
        return cls(root, description)

    def file(self, name: str) -> Path:
        """The path of a file that model.json lists (and so was checked); ModelDirError for any other name."""
        if name not in self.description["files"]:
            raise ModelDirError(f"{self.path}: {name} is not listed in {DESCRIPTION}; it is not part of the model")
        return self.path / name

    def graph(self, graph: str, format: str = "onnx") -> Path:
        """A graph's file: ``<graph>.onnx``, or with ``format="ort"`` the listed ``ort/<graph>.*ort``."""
        if graph not in GRAPHS:
            raise ValueError(f"graph {graph!r}: use one of {GRAPHS}")
        if format == "onnx":
            return self.file(f"{graph}.onnx")
        if format == "ort":
            found = sorted(n for n in self.description["files"]
                           if n.startswith("ort/") and PurePosixPath(n).name.split(".")[0] == graph)
            if len(found) != 1:
                raise ModelDirError(f"{self.path}: {len(found)} ORT-format {graph} graphs listed in {DESCRIPTION} "
                                    f"(need one); export with --ort")
            return self.file(found[0])
        raise ValueError(f"format {format!r}: use 'onnx' or 'ort'")

    @property
    def states(self) -> list[StateSpec]:
        return [StateSpec.from_json(entry) for entry in self.description["states"]]

    @property
    def has_ort(self) -> bool:
        return any(name.startswith("ort/") for name in self.description["files"])

    def external_weights(self) -> dict[str, np.ndarray]:
        """{external-data file the graphs name: its bytes} for each one stored packed, expanded (and checked against
        model.json's sha256); empty when the graphs' external data is on disk as they name it."""
        from export.packed_weights import unpack

        entry = self.description.get("packed")
        if not entry:
            return {}
        return {entry["as"]: unpack(self.file(entry["file"]).read_bytes(), entry["segments"], entry["sha256"])}

    @contextmanager
    def readable_graphs(self) -> Iterator[dict[str, Path]]:
        """{graph: ONNX file} that ``onnx.load`` can read with its external data: the dir's own graphs, or copies in
        a temp dir beside their expanded weights when those are stored packed."""
        import tempfile

        external = self.external_weights()
        if not external:
            yield {g: self.graph(g) for g in GRAPHS}
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in external.items():
                data.tofile(Path(tmp) / name)
            for g in GRAPHS:
                shutil.copy2(self.graph(g), Path(tmp) / f"{g}.onnx")
            yield {g: Path(tmp) / f"{g}.onnx" for g in GRAPHS}

    def copy_non_graph_files(self, staging: Path) -> None:
        """Copy every listed file but the graphs (ONNX and ORT format) into ``staging``: the start of a model dir
        with other graphs (quantized, tuned, round-tripped)."""
        for name in self.description["files"]:
            if name not in {f"{g}.onnx" for g in GRAPHS} and not name.startswith("ort/"):
                target = _check_name(staging, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.file(name), target)


def write_description(staging: Path, description: dict) -> None:
    """Hash every file of ``staging`` into ``description["files"]`` and write model.json (the marker of a dir
    that is the toolkit's to replace)."""
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != DESCRIPTION)
    description["files"] = {p.relative_to(staging).as_posix(): sha256(p) for p in files}
    write_json(staging / DESCRIPTION, description)


@contextmanager
def stage(out: str | Path, force: bool = False) -> Iterator[Path]:
    """A staging dir for a new model dir at ``out``; the block ends with ``write_description``. An ``out`` that
    exists must be a model dir and needs ``force``; the move into place is atomic."""
    with staged_dir(Path(out), DESCRIPTION, force, "model dir") as staging:
        yield staging
