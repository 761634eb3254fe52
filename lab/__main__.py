"""`python -m lab demo` (the README's main job) or `python -m lab listen PORT` (inside a lab
namespace), from the checkout."""

from __future__ import annotations

import os
import signal
import sys
from typing import Sequence


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the demo as Ctrl-C does: through the `with Lab()` teardown."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if args[:1] == ["listen"] and len(args) == 2:
        from .listen import listen

        listen(int(args[1]))
        return 0
    if args[:1] in (["demo"], []):
        if os.geteuid() != 0:
            print("the lab needs root (it creates network namespaces)", file=sys.stderr)
            return 1
        from .demo import demo

        try:
            return demo()
        except KeyboardInterrupt:
            print("\ninterrupted: the lab was removed", file=sys.stderr)
            return 130
    print("usage: python -m lab [demo | listen PORT]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
