"""``python -m rev_tasks.cli``: the ``rev`` console script."""

import sys

from rev_tasks.cli import main

sys.exit(main())
