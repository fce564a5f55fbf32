"""``python -m report RUN_DIR [--no-pdf] [--timeout S]``: re-render the report of a run."""

import sys

from report.render import main

sys.exit(main())
