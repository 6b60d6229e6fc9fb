"""`python -m SASSRSegmentLib.train` / `torchrun -m SASSRSegmentLib.train`: the train command alone.

The same command as `python -m SASSRSegmentLib train`, without the command dispatch; torchrun needs a
module to run. No other engine command is imported, so it runs on SimpleITK-free hosts.
"""

from __future__ import annotations

import argparse
import sys

from .commands import train
from .commands.runner import run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m SASSRSegmentLib.train", description=__doc__.splitlines()[0]
    )
    train.add_arguments(parser)
    return run_command(train.run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
