"""``python -m trpts``: the ``trpts`` command line (see :mod:`trpts.cli`)."""

import sys

from .cli import main

sys.exit(main())
