"""The one line reader: lines end at \\n only (a trailing \\r dropped); every other separator stays inside its line,
so sources and references stay aligned; bad bytes name the file and line."""
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lite.text import TextError, decode_line, read_lines, read_stream
from tests.conftest import fuzz, logged
from tests.figures import tally

# what str.splitlines() would break a line on, besides \n
SEPARATORS = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("sep", SEPARATORS, ids=lambda c: f"U+{ord(c):04X}")
def test_separators_stay_inside_their_line(tmp_path, sep):
    src, ref = tmp_path / "a.de", tmp_path / "a.en"
    src.write_bytes(f"eins{sep}zwei\ndrei\n".encode())  # one side only
    ref.write_bytes("one two\nthree\n".encode())
    assert read_lines(src) == [f"eins{sep}zwei", "drei"] and len(read_lines(ref)) == 2
    both = tmp_path / "b.en"
    both.write_bytes(f"one{sep}two\nthree{sep}four\n".encode())  # both sides: still two pairs, in order
    assert read_lines(both) == [f"one{sep}two", f"three{sep}four"]


def test_windows_line_ends_and_a_missing_last_newline():
    assert read_stream(io.BytesIO(b"a\r\nb\r\nc"), "<t>") == ["a", "b", "c"]
    assert read_stream(io.BytesIO(b"a\r\r\n"), "<t>") == ["a\r"]  # only one trailing \r is a line end


def test_bad_bytes_and_missing_files_name_the_place(tmp_path):
    with pytest.raises(TextError, match=r"<stdin>:2: not UTF-8"):
        read_stream(io.BytesIO(b"gut\n\xff\n"), "<stdin>")
    with pytest.raises(TextError, match="no such file"):
        read_lines(tmp_path / "missing.txt")
    assert read_stream(io.BytesIO(b"1\n2\n3\n"), "<t>", limit=2) == ["1", "2"]


# bytes as they come: random, UTF-8 text, and pieces mixed with line breaks of every kind
LINE_BYTES = st.one_of(st.binary(max_size=64), st.text(max_size=32).map(str.encode),
                       st.lists(st.one_of(st.binary(max_size=4), st.sampled_from([*SEPARATORS, "\n", "é", "\U0001f600"])
                                          .map(str.encode)), max_size=16).map(b"".join))


@fuzz()
@given(body=LINE_BYTES.map(lambda b: b.replace(b"\n", b"")), end=st.sampled_from([b"", b"\n", b"\r\n"]))
def test_decode_line_gives_one_line_or_names_it(body, end):
    tally("fuzz cases: lite.text decode_line (one line of bytes)")
    try:
        text = decode_line(body + end, "f.txt", 7)
    except TextError as e:
        assert str(e).startswith("f.txt:7: not UTF-8") and "\n" not in str(e)
        with pytest.raises(UnicodeDecodeError):
            body.decode("utf-8")
    else:
        assert "\n" not in text and text.encode() == (body if end == b"\r\n" else body.removesuffix(b"\r"))


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


@fuzz()
@given(LINE_BYTES)
def test_read_stream_keeps_every_line_in_place(blob):
    tally("fuzz cases: lite.text read_stream (a file of bytes)")
    raws = blob.split(b"\n")
    raws = raws[:-1] if raws[-1] == b"" else raws  # a last line without its \n still counts
    expected = [_utf8(raw.removesuffix(b"\r")) for raw in raws]
    bad = [number for number, line in enumerate(expected, start=1) if line is None]
    with logged("lite.text") as records:
        lines = read_stream(io.BytesIO(blob), "<t>", keep_going=True)
    assert lines == [line or "" for line in expected]  # a bad line reads as "", the others keep their place
    assert [r.getMessage().split(":")[1] for r in records] == [str(number) for number in bad]
    if bad:
        with pytest.raises(TextError, match=rf"^<t>:{bad[0]}: not UTF-8"):
            read_stream(io.BytesIO(blob), "<t>")
    else:
        assert read_stream(io.BytesIO(blob), "<t>") == lines
