"""Params and GMACs of every model config, training and deploy form (the README's model table).

Launcher of ``xvol-summary``: the code is xvol/cli/summary.py.
``python scripts/model_summary.py --help``.
"""

import sys

from xvol.cli.summary import main

if __name__ == "__main__":
    sys.exit(main())
