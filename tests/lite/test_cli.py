"""Every command group: a bad argument or input file is one line on stderr and exit code 2, never a traceback."""
import pytest

from lite.cli import main


def _fails_in_one_line(capsys, argv, code=2):
    try:
        result = main(argv)
    except SystemExit as e:  # argparse refuses at parse time
        result = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("INFO ", "WARNING "))]
    assert result == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, says", [
    (["translate", "--beam", "0", "--checkpoint", "x.pt"], "--beam: '0': must be an integer >= 1"),
    (["translate", "--batch-size", "abc", "--checkpoint", "x.pt"], "not an integer"),
    (["eval", "--split", "test", "--max-len-a", "-1", "--checkpoint", "x.pt"], "must be a number >= 0"),
    (["eval", "--split", "test", "--backend", "onnx"], "--backend onnx needs --model"),
    (["data", "prepare", "--from", "x", "--out", "y", "--vocab-size", "0"], "must be an integer >= 1"),
    (["train", "config.yaml", "--max-minutes", "0"], "must be a number > 0"),
    (["compress", "prune", "x.pt", "--out", "o", "--budget", "0"], "budget"),
    (["compress", "prune", "x.pt", "--out", "o", "--budget", "lots"], "not a MAC count"),
    (["compress", "prune", "x.pt", "--out", "o", "--budget", "60M", "--step", "1.5"], "fraction"),
    (["compress", "quantize", "m", "--out", "o", "--method", "fp4"], "invalid choice"),
    (["macs", "--arch", "transformer_d128", "--src-len", "0"], "must be an integer >= 1"),
    (["nonsense"], "invalid choice"),
])
def test_bad_arguments_are_refused_at_parse_time(capsys, argv, says):
    assert says in _fails_in_one_line(capsys, argv)


@pytest.mark.parametrize("argv, says", [
    (["data", "prepare", "--from", "/no/such/dir", "--out", "{tmp}/out"], "no such directory"),
    (["train", "{tmp}/missing.yaml"], "cannot read config"),
    (["translate", "--checkpoint", "{tmp}/missing.pt"], "not found"),
    (["eval", "--split", "test", "--backend", "onnx", "--model", "{tmp}"], "no model.json"),
    (["export", "{tmp}/missing.pt", "--out", "{tmp}/onnx"], "not found"),
    (["compress", "prune", "{tmp}/missing.pt", "--out", "{tmp}/p", "--budget", "1M"], "not found"),
    (["compress", "quantize", "{tmp}", "--out", "{tmp}/q"], "no model.json"),
    (["compress", "report", "a={tmp}", "--out", "{tmp}/r"], "no model.json"),
    (["macs", "--checkpoint", "{tmp}/missing.pt"], "not found"),
    (["macs", "--arch", "no_such_arch"], "not a lite_transformer architecture"),
])
def test_bad_files_are_one_line_errors(capsys, tmp_path, monkeypatch, argv, says):
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    line = _fails_in_one_line(capsys, argv)
    assert line.startswith(f"lite {argv[0]}") and says in line, line
