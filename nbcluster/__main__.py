"""``python -m nbcluster``: the ``nbcluster`` command."""

import sys

from nbcluster.cli import main

sys.exit(main())
