"""Evaluate a training or deploy checkpoint on an ImageNet-layout val folder; write one record.

Launcher of ``xvol-eval``: the code is xvol/cli/eval.py.
``python tools/eval.py --help``.
"""

import sys

from xvol.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
