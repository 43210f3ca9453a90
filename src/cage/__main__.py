"""``python -m cage``."""

from cage.cli import console

console()
