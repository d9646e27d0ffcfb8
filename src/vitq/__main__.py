"""``python -m vitq`` and the ``vitq`` command.

Ctrl-C or SIGTERM while torch is still importing ends with one line, not a traceback: the signal is noted
and acted on once the import is done (raising inside torch's C++ initialisation would abort the process).
"""
from __future__ import annotations

import signal
import sys


def main() -> int:
    """Import the command line, then run it; an interruption while importing exits 130 with one line."""
    seen: list[int] = []

    def note(signum, frame):
        seen.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        from .cli import main as cli_main
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if seen:
        print("vitq: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
