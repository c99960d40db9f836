"""``python -m circuitdiff``: the command line."""

import sys

from .cli import main

if __name__ == "__main__":  # not in the recipe's spawned bind lanes
    sys.exit(main())
