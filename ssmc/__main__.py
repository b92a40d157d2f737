"""`python -m ssmc` runs the command-line tool."""

import sys

from ssmc.cli import main

sys.exit(main())
