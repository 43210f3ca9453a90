"""``python -m cage``."""

import sys

from cage.cli import main

sys.exit(main())
