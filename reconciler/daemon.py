"""`tproxyd`: the daemon. For now it converges once and exits; watching the config, supervising
the relay and repairing drift come with the daemon issue."""

from __future__ import annotations

import sys
from typing import Sequence

from . import cli


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return cli.main(["apply", *args])


if __name__ == "__main__":
    sys.exit(main())
