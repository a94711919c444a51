"""`python -m splitserve ...` runs the `splitserve` command line."""

import sys

from splitserve.cli import main

if __name__ == "__main__":
    sys.exit(main())
