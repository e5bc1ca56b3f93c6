"""Export the deploy model to ONNX, checked against PyTorch with onnxruntime before it is kept.

Launcher of ``xvol-export``: the code is xvol/cli/export.py.
``python tools/export.py --help``.
"""

import sys

from xvol.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
