"""Stub: delegates to the old registration until the compress CLI moves here."""


def register(sub) -> None:
    from compress.prune import register_cli
    from compress.quantize import add_quantize_parser
    from compress.report import add_report_parser

    actions = register_cli(sub)
    add_quantize_parser(actions)
    add_report_parser(actions)
