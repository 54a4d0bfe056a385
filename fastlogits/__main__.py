"""``python -m fastlogits``: the command line, as the ``fastlogits`` script runs it."""
import sys

from fastlogits.cli import main

sys.exit(main())
