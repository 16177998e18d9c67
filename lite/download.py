"""Public corpora for users with internet: download, verify, write ``train/valid/<test>.{de,en}``.

The written dir is what ``lite data prepare --from DIR`` reads. Every file is fetched to a temp name and
renamed only once its checksum matched, so a re-run skips what is already there and verified.
"""
from __future__ import annotations

import gzip
import hashlib
import html
import logging
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from lite.data import DataError
from lite.files import write_lines

logger = logging.getLogger(__name__)

LANGS = ("de", "en")

MULTI30K_URL = ("https://raw.githubusercontent.com/multi30k/dataset/"
                "a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw")
MULTI30K_SPLITS = {"train": "train", "valid": "val", "test2016": "test_2016_flickr"}  # ours -> upstream file
MULTI30K_SHA256 = {  # of the decompressed files
    "train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    "train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    "valid.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
    "valid.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "test2016.de": "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
    "test2016.en": "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
}

# The archive fairseq's examples/translation/prepare-iwslt14.sh downloads. fairseq publishes no checksum
# for it; this md5 is the only one found in public material, from a third-party wrapper of that script
# (github.com/Rukshanth-s/Mask-Predict, scripts/prepare_iwslt14.sh at 6cb380a), not from fairseq itself.
# Beyond it, the archive must hold the members below with equal German and English line counts.
IWSLT14_URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
IWSLT14_MD5 = "10936dfdf616504ddbd844e91b94ef4a"
IWSLT14_ARCHIVE = "iwslt14-de-en.tgz"
IWSLT14_TALKS = {"valid": ("dev2010",), "test": ("tst2010", "tst2011", "tst2012")}  # split -> XML sets
SEGMENT = re.compile(r"<seg[^>]*>(.*?)</seg>", re.S)


class ChecksumError(DataError):
    """A downloaded file whose hash is not the published one."""


def file_hash(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url: str, dest: Path, expected: str, algorithm: str, gunzip: bool = False) -> None:
    """Download url (decompressed if gunzip) to dest, unless dest is there with the expected hash.

    The bytes go to a temp name first; dest appears only if their hash is the expected one.
    """
    if dest.is_file() and file_hash(dest, algorithm) == expected:
        logger.info("%s is present and verified, not downloading it", dest)
        return
    logger.info("downloading %s", url)
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(gzip.GzipFile(fileobj=response) if gunzip else response, f)
        actual = file_hash(tmp, algorithm)
        if actual != expected:
            raise ChecksumError(f"{dest.name} from {url}: {algorithm} is {actual}, expected {expected}; "
                                f"the download is corrupt or the source changed (nothing was written)")
        os.replace(tmp, dest)
    except urllib.error.URLError as e:
        raise DataError(f"cannot download {url} ({e.reason}); check the internet connection or the url") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise DataError(f"{url} is not a complete gzip file ({e}); run again to retry") from None
    finally:
        tmp.unlink(missing_ok=True)


def download_multi30k(out_dir: str | Path, url: str = MULTI30K_URL,
                      sha256: dict[str, str] = MULTI30K_SHA256) -> Path:
    """Multi30k task 1 (flickr captions) as train/valid/test2016.{de,en}; url is the dir of the .gz files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, upstream in MULTI30K_SPLITS.items():
        for lang in LANGS:
            name = f"{split}.{lang}"
            fetch(f"{url}/{upstream}.{lang}.gz", out / name, sha256[name], "sha256", gunzip=True)
    return out


def train_pairs(de: str, en: str, member: str) -> tuple[list[str], list[str]]:
    """The talk transcripts of train.tags.*, without the metadata lines (those starting with '<')."""
    de_lines, en_lines = de.splitlines(), en.splitlines()
    if len(de_lines) != len(en_lines):
        raise DataError(f"{member}.{{de,en}}: {len(de_lines)} German but {len(en_lines)} English lines")
    kept = [(d.strip(), e.strip()) for d, e in zip(de_lines, en_lines)
            if not (d.lstrip().startswith("<") or e.lstrip().startswith("<"))]
    return [d for d, _ in kept], [e for _, e in kept]


def segments(de: str, en: str, member: str) -> tuple[list[str], list[str]]:
    """The <seg> texts of a German and an English IWSLT XML file, which must pair up."""
    de_segs, en_segs = ([html.unescape(s.strip()) for s in SEGMENT.findall(text)] for text in (de, en))
    if not de_segs or len(de_segs) != len(en_segs):
        raise DataError(f"{member}.{{de,en}}.xml: {len(de_segs)} German and {len(en_segs)} English <seg> "
                        f"elements; expected the same number, more than 0")
    return de_segs, en_segs


def read_iwslt14(archive: Path) -> dict[str, tuple[list[str], list[str]]]:
    """split -> (German lines, English lines) from the IWSLT14 de-en archive."""
    train = "de-en/train.tags.de-en"
    talks = {split: [f"de-en/IWSLT14.TED.{name}.de-en" for name in names] for split, names in IWSLT14_TALKS.items()}
    members = [f"{train}.{lang}" for lang in LANGS] + [f"{m}.{lang}.xml" for ms in talks.values() for m in ms
                                                       for lang in LANGS]
    try:
        with tarfile.open(archive, "r:gz") as tar:
            missing = sorted(set(members) - set(tar.getnames()))
            if missing:
                raise DataError(f"{archive} lacks {', '.join(missing)}: not the IWSLT14 de-en archive; "
                                f"delete it and run again")
            text = {m: tar.extractfile(m).read().decode("utf-8") for m in members}
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{archive} is not a readable .tgz ({e}); delete it and run again") from None
    splits = {"train": train_pairs(text[f"{train}.de"], text[f"{train}.en"], train)}
    for split, ms in talks.items():
        pairs = [segments(text[f"{m}.de.xml"], text[f"{m}.en.xml"], m) for m in ms]
        splits[split] = ([s for de, _ in pairs for s in de], [s for _, en in pairs for s in en])
    return splits


def download_iwslt14(out_dir: str | Path, url: str = IWSLT14_URL, md5: str = IWSLT14_MD5) -> Path:
    """IWSLT14 de-en TED talks, raw cased text: train, valid (dev2010), test (tst2010-2012).

    The verified archive stays in out_dir, so a re-run only re-extracts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    archive = out / IWSLT14_ARCHIVE
    fetch(url, archive, md5, "md5")
    for split, (de, en) in read_iwslt14(archive).items():
        write_lines(out / f"{split}.de", de)
        write_lines(out / f"{split}.en", en)
    return out


DOWNLOADERS = {"multi30k": download_multi30k, "iwslt14": download_iwslt14}


def download(name: str, out_dir: str | Path, **options) -> Path:
    """Download corpus name into out_dir; options (url, checksums) go to ``download_<name>``."""
    if name not in DOWNLOADERS:
        raise DataError(f"unknown corpus {name!r}; choose one of {', '.join(DOWNLOADERS)}")
    return DOWNLOADERS[name](out_dir, **options)
