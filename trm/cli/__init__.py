"""`trm`: one command for every part of the system, one module per noun (as Feast's `feast/cli/`).

  tokenizer.py  trm tokenizer fit|encode
  streams.py    trm broker|topics|publish|worker|feast-repo
  compact.py    trm compact
  train.py      trm train|eval
  demo.py       trm demo
  serve.py      trm serve
Each module registers its subcommands (`register(subparsers)`) and imports the heavy libraries
(torch, faust, feast) only when a command runs, so `trm --help` stays instant. This is the top of
the house: it imports every layer, and no layer imports it.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trm", description="Streaming hybrid semantic tokenization (TRM) for ranking, backed by Feast.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from trm.cli import compact, demo, serve, streams, tokenizer, train

    for mod in (tokenizer, streams, compact, train, demo, serve):
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

