"""``lite data prepare | download | embedded | shortlist``."""
from __future__ import annotations

from lite.cli.types import non_negative_int, positive_int


def _run(args) -> int:
    if args.action == "prepare":
        from lite.data import prepare

        prepare(args.source, args.out, args.src, args.tgt, args.vocab_size, args.force)
    elif args.action == "download":
        from lite.download import download

        download(args.name, args.out)
    elif args.action == "shortlist":
        from lite.shortlist import build_shortlist

        counts = build_shortlist(args.data, args.out, args.per_source, args.frequent, args.iterations, args.max_pairs)
        print(f"{args.out}: {counts['frequent']} target pieces always, up to {counts['per_source']} for each of "
              f"{counts['source_pieces']} source pieces (IBM Model 1 on {counts['pairs']} training pairs)")
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
    p = actions.add_parser("shortlist", help="a vocabulary map (CTranslate2's vmap format) from a prepared dir's "
                                             "training split, for `--shortlist`")
    p.add_argument("data", help="prepared data dir (`lite data prepare`)")
    p.add_argument("--out", required=True, help="the vocabulary map file to write")
    p.add_argument("--per-source", type=positive_int, default=20, help="translations kept per source piece")
    p.add_argument("--frequent", type=non_negative_int, default=100,
                   help="most frequent target pieces, always candidates")
    p.add_argument("--iterations", type=positive_int, default=5, help="IBM Model 1 EM iterations")
    p.add_argument("--max-pairs", type=positive_int, default=100_000,
                   help="training pairs read (the first N; the EM's memory grows with them)")
    data.set_defaults(func=_run)
