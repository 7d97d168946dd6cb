"""``python -m diffst.training --config FILE [--resume] [--set section.key=value ...]``.

Works under ``torchrun --nproc_per_node K -m diffst.training ...`` and
``accelerate launch [--cpu] --num_processes K -m diffst.training ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from diffst.config import load_config
from diffst.errors import DiffSTError, TrainingInterrupted


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, print the run folder; returns the exit code.

    0 when training finished, 2 on a bad input (one line on stderr), 130 after SIGINT / SIGTERM (a
    checkpoint was saved; the line on stderr says how to resume).
    """
    parser = argparse.ArgumentParser(prog="python -m diffst.training", description="Train a Diff-ST denoiser.")
    parser.add_argument("--config", required=True, help="run configuration (YAML)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of run_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        from diffst.training.loop import train

        run_dir = train(cfg, resume=args.resume)
    except TrainingInterrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            print(exc, file=sys.stderr)
        return 130
    except DiffSTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
