"""``python -m torchquant``: the ``torchquant`` command line."""

import sys

from torchquant.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
