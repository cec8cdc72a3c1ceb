"""`trm demo`: the whole product on one machine (trm/demo/: run, probes, report)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trm import DEFAULT_DATA_DIR
from trm.demo import MODELS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on one machine (embedded broker + Feast)",
                              description=_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="MovieLens-layout directory")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory (must be new or empty)")
    p.add_argument("--cutoff-quantile", type=float, default=0.5, help="tokenizer fit cutoff on the timeline")
    p.add_argument("--port", type=int, default=None, help="broker port (default: a free one)")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of models to train")
    p.add_argument("--batch-size", type=int, default=2048, help="trainer micro-batch (events per PIT join)")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook", type=int, default=256)
    p.add_argument("--mem-vocab", type=int, default=8192)
    p.add_argument("--freshness-probes", type=int, default=200)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds the replay may take")
    p.add_argument("--warm-epochs", type=int, default=2,
                   help="warm start on the events before the cutoff: most epochs, early-stopped (0: none)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from trm import quiet_third_party_warnings
    from trm.demo import DemoError
    from trm.demo.run import DemoConfig, run_demo

    quiet_third_party_warnings()
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # and the worker's
    cfg = DemoConfig(data=args.data, out=args.out, cutoff_quantile=args.cutoff_quantile, port=args.port,
                     models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
                     batch_size=args.batch_size, levels=args.levels, codebook=args.codebook,
                     mem_vocab=args.mem_vocab, freshness_probes=args.freshness_probes, timeout_s=args.timeout,
                     warm_epochs=args.warm_epochs)
    try:
        run_demo(cfg)
    except DemoError as exc:
        print(f"trm demo: {exc}", file=sys.stderr)
        return 2
    return 0


def _description() -> str:
    import trm.demo.run

    return trm.demo.run.__doc__
