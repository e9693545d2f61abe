"""`python -m kgrad ...`: the `kgrad` command."""

import sys

from kgrad.cli import main

if __name__ == "__main__":
    sys.exit(main())
