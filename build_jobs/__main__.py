"""``python -m build_jobs``: see ``build_jobs.cli``."""

import sys

from build_jobs.cli import main

sys.exit(main())
