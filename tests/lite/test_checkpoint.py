"""A checkpoint carrying code (a malicious pickle) is refused before it runs: one error line, exit code 2."""
import os
import pickle

import pytest
import torch

from lite.checkpoint import CheckpointError, read_state
from lite.cli import main


class Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(params=["zip", "legacy"])
def evil(request, tmp_path):
    """(checkpoint, marker): a fairseq-looking checkpoint whose args would create the marker when unpickled."""
    marker, path = tmp_path / "PWNED", tmp_path / "evil.pt"
    state = {"model": {}, "args": Payload(marker)}
    if request.param == "zip":
        torch.save(state, path)
    else:  # a plain pickle, as torch's pre-1.6 format; protocol 2 so the refusal is the global itself
        path.write_bytes(pickle.dumps(state, protocol=2))
    pickle.loads(pickle.dumps(Payload(tmp_path / "probe")))  # the payload does run when unpickled unsafely
    assert (tmp_path / "probe").exists()
    return path, marker


def test_read_state_refuses_code(evil):
    path, marker = evil
    with pytest.raises(CheckpointError, match=r"refused by the weights-only loader.*\(global posix\.system\)"):
        read_state(path)
    assert not marker.exists()


@pytest.mark.parametrize("argv", [["translate", "--checkpoint", "{ck}"], ["export", "{ck}", "--out", "{tmp}/onnx"]],
                         ids=["translate", "export"])
def test_the_cli_refuses_it_in_one_line(evil, argv, capsys, monkeypatch, tmp_path):
    path, marker = evil
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    assert main([a.format(ck=path, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("INFO ")]
    assert len(lines) == 1 and lines[0].startswith(f"lite {argv[0]}: error: {path}: refused"), err
    assert "Traceback" not in err and "weights_only` set to `False`" not in err
    assert not marker.exists() and not (tmp_path / "onnx").exists()
