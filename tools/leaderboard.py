"""Aggregate eval records (results/*.json from tools/eval.py) into a leaderboard.

Launcher of ``xvol-leaderboard``: the code is xvol/cli/leaderboard.py.
``python tools/leaderboard.py --help``.
"""

import sys

from xvol.cli.leaderboard import main

if __name__ == "__main__":
    sys.exit(main())
