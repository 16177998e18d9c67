"""lite data download against local file:// mirrors: layout, checksums, re-runs that fetch nothing."""
import gzip
import hashlib
import io
import tarfile
import urllib.request

import pytest

from lite.data import DataError
from lite.download import IWSLT14_ARCHIVE, MULTI30K_SPLITS, ChecksumError, download

MULTI30K = {"train": ("Ein Hund läuft.\nZwei Katzen schlafen.\n", "A dog runs.\nTwo cats sleep.\n"),
            "valid": ("Eine Frau liest.\n", "A woman reads.\n"),
            "test2016": ("Ein Mann singt.\n", "A man sings.\n")}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture
def url_opens(monkeypatch):
    """Every URL urllib opens, in order."""
    opened, urlopen = [], urllib.request.urlopen

    def counting(url, *args, **kwargs):
        opened.append(url)
        return urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", counting)
    return opened


@pytest.fixture
def multi30k_mirror(tmp_path):
    """The upstream raw/ dir (gzipped, upstream names) and the sha256 of each decompressed file."""
    mirror = tmp_path / "raw"
    mirror.mkdir()
    checksums = {}
    for split, texts in MULTI30K.items():
        for lang, text in zip(("de", "en"), texts):
            (mirror / f"{MULTI30K_SPLITS[split]}.{lang}.gz").write_bytes(gzip.compress(text.encode("utf-8")))
            checksums[f"{split}.{lang}"] = sha256(text)
    return mirror, checksums


def test_multi30k_writes_the_prepare_layout_and_skips_verified_files(multi30k_mirror, tmp_path, url_opens):
    mirror, checksums = multi30k_mirror
    out = download("multi30k", tmp_path / "out", url=mirror.as_uri(), sha256=checksums)
    assert sorted(p.name for p in out.iterdir()) == sorted(checksums)  # no temp files left
    for split, (de, en) in MULTI30K.items():
        assert (out / f"{split}.de").read_text(encoding="utf-8") == de
        assert (out / f"{split}.en").read_text(encoding="utf-8") == en
    base = mirror.as_uri()
    assert url_opens == [f"{base}/{up}.{lang}.gz" for up in MULTI30K_SPLITS.values() for lang in ("de", "en")]

    download("multi30k", out, url=mirror.as_uri(), sha256=checksums)
    assert len(url_opens) == 6  # the second run opened nothing

    (out / "valid.en").write_text("changed\n", encoding="utf-8")
    download("multi30k", out, url=mirror.as_uri(), sha256=checksums)
    assert url_opens[6:] == [f"{mirror.as_uri()}/val.en.gz"]  # only the file with the wrong hash again
    assert (out / "valid.en").read_text(encoding="utf-8") == MULTI30K["valid"][1]


def test_multi30k_checksum_mismatch_names_file_and_both_hashes(multi30k_mirror, tmp_path):
    mirror, checksums = multi30k_mirror
    wrong = {**checksums, "valid.de": "0" * 64}
    with pytest.raises(ChecksumError) as e:
        download("multi30k", tmp_path / "out", url=mirror.as_uri(), sha256=wrong)
    message = str(e.value)
    assert "valid.de" in message and "0" * 64 in message and checksums["valid.de"] in message
    assert not (tmp_path / "out" / "valid.de").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_unreachable_url_and_bad_gzip_are_data_errors(multi30k_mirror, tmp_path):
    mirror, checksums = multi30k_mirror
    with pytest.raises(DataError, match="cannot download"):
        download("multi30k", tmp_path / "out", url=(tmp_path / "nowhere").as_uri(), sha256=checksums)
    (mirror / "train.de.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a complete gzip file"):
        download("multi30k", tmp_path / "out", url=mirror.as_uri(), sha256=checksums)
    with pytest.raises(DataError, match="unknown corpus"):
        download("wmt14", tmp_path / "out")


def xml(segments: list[str], lang: str) -> str:
    segs = "".join(f'<seg id="{i}"> {s} </seg>\n' for i, s in enumerate(segments, start=1))
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<mteval>\n<refset setid="x" trglang="{lang}">\n' \
           f'<doc docid="1">\n<talkid>1</talkid>\n{segs}</doc>\n</refset>\n</mteval>\n'


IWSLT_TALKS = {"dev2010": ["Hallo Welt.", "Danke &amp; tschüss."], "tst2010": ["Eins."], "tst2011": ["Zwei."],
               "tst2012": ["Drei.", "Vier."]}


def english(german: str) -> str:
    return f"EN {german}"


@pytest.fixture
def iwslt_archive(tmp_path):
    """A tiny de-en.tgz with the members of the real one, and its md5."""
    train_de = "<url>http://ted.com/x</url>\n<talkid>1</talkid>\nIch bin hier.\n  Du bist da.  \n<title>T</title>\n"
    train_en = "<url>http://ted.com/x</url>\n<talkid>1</talkid>\nI am here.\nYou are there.\n<title>T</title>\n"
    members = {"de-en/train.tags.de-en.de": train_de, "de-en/train.tags.de-en.en": train_en,
               "de-en/IWSLT14.TEDX.dev2012.de-en.de.xml": xml(["ungenutzt"], "de")}
    for name, segs in IWSLT_TALKS.items():
        members[f"de-en/IWSLT14.TED.{name}.de-en.de.xml"] = xml(segs, "de")
        members[f"de-en/IWSLT14.TED.{name}.de-en.en.xml"] = xml([english(s) for s in segs], "en")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "mirror" / "de-en.tgz"
    archive.parent.mkdir()
    archive.write_bytes(buffer.getvalue())
    return archive, hashlib.md5(buffer.getvalue()).hexdigest()


def test_iwslt14_extracts_train_valid_test(iwslt_archive, tmp_path, url_opens):
    archive, md5 = iwslt_archive
    out = download("iwslt14", tmp_path / "out", url=archive.as_uri(), md5=md5)
    read = lambda name: (out / name).read_text(encoding="utf-8").splitlines()  # noqa: E731
    assert read("train.de") == ["Ich bin hier.", "Du bist da."]
    assert read("train.en") == ["I am here.", "You are there."]
    assert read("valid.de") == ["Hallo Welt.", "Danke & tschüss."]
    assert read("test.de") == ["Eins.", "Zwei.", "Drei.", "Vier."]
    assert read("test.en") == [english(s) for s in ["Eins.", "Zwei.", "Drei.", "Vier."]]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [IWSLT14_ARCHIVE] + [f"{s}.{lang}" for s in ("train", "valid", "test") for lang in ("de", "en")])

    download("iwslt14", out, url=archive.as_uri(), md5=md5)
    assert url_opens == [archive.as_uri()]  # the verified archive is not fetched again


def test_iwslt14_checksum_mismatch_and_missing_members(iwslt_archive, tmp_path):
    archive, md5 = iwslt_archive
    with pytest.raises(ChecksumError) as e:
        download("iwslt14", tmp_path / "out", url=archive.as_uri(), md5="f" * 32)
    assert IWSLT14_ARCHIVE in str(e.value) and "f" * 32 in str(e.value) and md5 in str(e.value)

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz"):
        pass
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(DataError, match="train.tags.de-en.de"):
        download("iwslt14", tmp_path / "out", url=archive.as_uri(), md5=hashlib.md5(buffer.getvalue()).hexdigest())
