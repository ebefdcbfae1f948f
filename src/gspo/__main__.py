"""`python -m gspo ...` and `accelerate launch -m gspo train ...` run the `gspo` command."""

import sys

from gspo.cli import main

if __name__ == "__main__":
    sys.exit(main())
