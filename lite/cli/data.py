"""``lite data prepare | download | embedded``."""
from __future__ import annotations

from lite.cli.types import positive_int


def _run(args) -> int:
    if args.action == "prepare":
        from lite.data import prepare

        prepare(args.source, args.out, args.src, args.tgt, args.vocab_size, args.force)
    elif args.action == "download":
        from lite.download import download

        download(args.name, args.out)
    else:
        from lite.corpus import write_default_corpus

        print(write_default_corpus(args.out))
    return 0


def register(sub) -> None:
    data = sub.add_parser("data", help="prepare, download or generate parallel text")
    actions = data.add_subparsers(dest="action", required=True)
    p = actions.add_parser("prepare", help="validate, sentencepiece, binarize into a fairseq data dir")
    p.add_argument("--from", dest="source", required=True, help="dir with train/valid/<test>.{src,tgt}")
    p.add_argument("--src", default="de")
    p.add_argument("--tgt", default="en")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=positive_int, default=8000,
                   help="joint sentencepiece vocabulary (an upper bound)")
    p.add_argument("--force", action="store_true", help="replace an out dir that holds a different corpus")
    p = actions.add_parser("download", help="download a public corpus (needs internet)")
    p.add_argument("name", choices=["multi30k", "iwslt14"])
    p.add_argument("--out", required=True)
    p = actions.add_parser("embedded", help="write the embedded default German->English corpus")
    p.add_argument("--out", required=True)
    data.set_defaults(func=_run)
