"""Train a model: Hydra config -> plain objects -> xvol.engine.Trainer.

Launcher of ``xvol-train``: the code is xvol/cli/train.py.
``python scripts/train.py --help``.
"""

import sys

from xvol.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
