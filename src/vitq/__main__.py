"""``python -m vitq`` and the ``vitq`` command: Ctrl-C or SIGTERM during start-up (importing torch) ends
with one line, not a traceback."""
from __future__ import annotations

import signal
import sys


def _stop(signum, frame):
    raise KeyboardInterrupt


def main() -> int:
    """Import the command line, then run it; an interruption while importing exits 130 with one line."""
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("vitq: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
