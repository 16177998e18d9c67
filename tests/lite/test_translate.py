"""One output line per input line, whatever comes in: the ONNX translator behind ``translate_lines`` and ``lite
translate`` fuzzed with hostile lines (empty, blank, 10,000 tokens, control, bidi, emoji, unassigned and rare
scripts, line separators, bytes that are not UTF-8); a rejected line gives an empty output line and one warning
naming it, so outputs stay aligned with references."""
import io
import subprocess
import sys
import time
from contextlib import redirect_stdout
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from export.search import SearchOptions
from lite.cli import main
from lite.translate import open_translator, translate_lines
from tests.conftest import LITE, fuzz, logged
from tests.figures import tally

HOSTILE = {
    "empty": "", "blank": " \t\u3000\u00a0 ", "ascii": "Ein Hund läuft über die Wiese.",
    "control": "\x00\x01\x07\x1b[31mHund\x7f", "bidi": "\u202eHund\u202c \u2066Katze\u2069 \u200f\u061c",
    "invisible": "\u200b\u200d\ufeff\u2060\ufffe\uffff", "emoji": "🐶👩‍👩‍👧👍🏽🇩🇪",
    "combining": "a" + "\u0301" * 200, "scripts": "𓀀𓀁 ꦲꦏ ᚠᚢᚦ 漢字 עברית ﷽",
    "unassigned": "\U000e0001\U0010fffd\U0001fbff\u0378", "separators": "eins\u2028zwei\u2029drei\x85\r\x0b\x0c\x1c",
    "newline": "eins\nzwei", "tokens_10000": "Hund " * 10_000,
}
LIMIT = {"tokens_1023": "Hund " * 1023, "tokens_1024": "Hund " * 1024}  # the tiny model takes 1023 (+ eos)
LINE = st.one_of(
    st.sampled_from(list(HOSTILE.values())),
    st.text(max_size=40),  # any code point but surrogates (a decoded line cannot hold one)
    st.lists(st.sampled_from([*HOSTILE.values(), "Hund", " ", "läuft", "."]), max_size=8).map("".join),
)
FAST = SearchOptions(beam=2, max_len_a=0.0, max_len_b=2)  # the fuzz is about the input: 3 decoder steps per batch


@pytest.fixture(scope="module")
def translator(model_dir):
    return open_translator("onnx", model_dir, options=FAST)[0]


def _pieces(translator, line):
    return len(translator.spm.encode(line.strip()))


@fuzz(1000)
@given(lines=st.lists(LINE, max_size=6))
def test_hostile_batches_give_one_line_each(translator, lines):
    tally("fuzz cases: runtime translator (hostile batches of lines)")
    start = time.process_time()
    with logged("lite.translate") as records:
        outputs = translate_lines(translator, lines, "in.de")
    assert time.process_time() - start < 1.0 + 0.5 * len(lines)  # CPU seconds: the batch, then per line
    assert len(outputs) == len(lines) and all(isinstance(o, str) and "\n" not in o for o in outputs)
    too_long = [n for n, line in enumerate(lines, 1) if _pieces(translator, line) > translator.max_source_tokens]
    assert [r.getMessage().split(":")[1] for r in records] == [str(n) for n in too_long]
    for number, (line, output) in enumerate(zip(lines, outputs), 1):
        if not line.strip() or number in too_long:
            assert output == ""


def test_each_hostile_line_at_the_default_search_in_bounded_time(model_dir):
    translator = open_translator("onnx", model_dir)[0]  # beam 4, max length 1.2 * source + 10
    assert translator.max_source_tokens == 1023
    for name, line in {**HOSTILE, **LIMIT}.items():
        start = time.process_time()
        with logged("lite.translate") as records:
            (output,) = translate_lines(translator, [line], name)
        assert time.process_time() - start < 5.0, name  # CPU seconds; the 1023-token line takes the longest
        assert "\n" not in output and (output == "" or line.strip()), name
        assert len(records) == (name in ("tokens_1024", "tokens_10000")), name
        assert output == "" or name not in ("tokens_1024", "tokens_10000")


RAW_LINE = st.one_of(LINE.map(lambda s: s.replace("\n", " ").encode()), st.binary(max_size=12).map(
    lambda b: b.replace(b"\n", b"")))


@fuzz(30)  # each case opens the translator (~0.2 s): 30 cases cover the CLI's own code, the rest is fuzzed above
@given(raws=st.lists(RAW_LINE, max_size=5))
def test_translate_cli_keeps_lines_aligned(translator, model_dir, raws):
    tally("fuzz cases: lite translate (stdin bytes)")
    stdin = io.TextIOWrapper(io.BytesIO(b"".join(r + b"\n" for r in raws)))
    stdout = io.StringIO()
    with mock.patch.object(sys, "stdin", stdin), redirect_stdout(stdout), logged("lite") as records:
        assert main(["translate", "--backend", "onnx", "--model", str(model_dir), "--beam", "2",
                     "--max-len-a", "0", "--max-len-b", "2"]) == 0
    outputs = stdout.getvalue().split("\n")
    assert outputs[-1] == "" and len(outputs) - 1 == len(raws)
    for number, (raw, output) in enumerate(zip(raws, outputs), 1):
        said = [r.getMessage() for r in records if r.getMessage().startswith(f"<stdin>:{number}: ")]
        try:
            line = raw.removesuffix(b"\r").decode("utf-8")
            rejected = "sentencepiece pieces" if _pieces(translator, line) > translator.max_source_tokens else None
        except UnicodeDecodeError:
            line, rejected = "", "not UTF-8"
        assert len(said) == (rejected is not None) and (not said or rejected in said[0])
        if rejected or not line.strip():
            assert output == ""


def test_translate_cli_rejects_lines_one_warning_each(model_dir):
    lines = [b"Ein Hund l\xc3\xa4uft.", b"Zwei \xff Katzen.", b"", b"Hund " * 10_000, b"Eine Katze schl\xc3\xa4ft."]
    out = subprocess.run([*LITE, "translate", "--backend", "onnx", "--model", str(model_dir)], capture_output=True,
                         input=b"".join(line + b"\n" for line in lines), timeout=300)
    stdout, stderr = out.stdout.decode(), out.stderr.decode()
    assert out.returncode == 0, stderr[-2000:]
    outputs = stdout.split("\n")[:-1]
    assert len(outputs) == 5 and outputs[0] and outputs[4] and outputs[1:4] == ["", "", ""]
    warnings = [line for line in stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2 and "Traceback" not in stderr, stderr
    assert "<stdin>:2: not UTF-8" in warnings[0] and "<stdin>:4: 10000 sentencepiece pieces" in warnings[1]
