"""``python -m vitq`` and the ``vitq`` command."""
from __future__ import annotations

import sys


def main() -> int:
    """Run the command line (``vitq.cli`` imports no torch; the command's own imports are guarded there)."""
    try:
        from .cli import main as cli_main  # light: argparse and vitq's torch-free modules
    except KeyboardInterrupt:
        print("vitq: interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
