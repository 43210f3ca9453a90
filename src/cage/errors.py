"""One error hierarchy. Each error carries a message for users and the exit code to leave with.

The CLI prints ``cage: <message>`` on stderr and exits with ``exit_code``; no traceback.
"""

from __future__ import annotations


class CageError(Exception):
    """Base of every error cage reports to a user."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(CageError):
    """The command line itself is wrong (exit 2, like argparse)."""

    exit_code = 2


class PolicyError(CageError):
    """The mission policy is missing, unreadable or invalid.

    ``problems`` holds one formatted line per problem, each naming the file, the line and
    column where known, and the key path.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class GitError(CageError):
    """A git operation failed or a revision does not resolve."""


class LedgerError(CageError):
    """The spend ledger cannot be opened, migrated or written."""


class TranscriptError(CageError):
    """A transcript or log cannot be read at all (single bad lines are counted, not raised)."""


class ProxyError(CageError):
    """The metering proxy cannot start or reach its upstream."""


class ReceiptError(CageError):
    """A mission receipt is missing or malformed."""
