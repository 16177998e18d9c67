"""The one line reader: lines end at \\n only (a trailing \\r dropped); every other separator stays inside its line,
so sources and references stay aligned; bad bytes name the file and line."""
import io

import pytest

from lite.text import TextError, read_lines, read_stream

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
