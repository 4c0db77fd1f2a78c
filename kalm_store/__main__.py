"""``python -m kalm_store ...``: the ``kalm-store`` command line, for environments without the script on PATH."""

import sys

from kalm_store.cli import main

sys.exit(main())
