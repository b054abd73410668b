"""``python -m search.cli``: the same as the ``evomerge`` command."""

import sys

from search.cli import main

sys.exit(main())
