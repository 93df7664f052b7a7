"""``python -m leanserve.cli``: the ``leanserve`` command."""

import sys

from leanserve.cli import main

sys.exit(main())
