"""Re-parameterize a training checkpoint into its deploy form, verified before anything is written.

Launcher of ``xvol-reparam``: the code is xvol/cli/reparam.py.
``python tools/reparam.py --help``.
"""

import sys

from xvol.cli.reparam import main

if __name__ == "__main__":
    sys.exit(main())
