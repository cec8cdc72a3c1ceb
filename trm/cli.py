"""`trm`: one command for every part of the system.

Each package registers its own subcommands (`register(subparsers)`) and imports its heavy
libraries (torch, faust, feast) only when a command runs, so `trm --help` stays instant.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trm", description="Streaming hybrid semantic tokenization (TRM) for ranking, backed by Feast.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    import importlib

    for module in ("tokenizer.cli", "streams.cli", "streams.compaction", "trainer.cli", "trm.demo"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # that part is not built yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
