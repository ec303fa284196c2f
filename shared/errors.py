"""The one error type for bad input a user can fix.

Raised with a message that names the file, field, row or value at fault; the CLI
prints it without a traceback and exits with status 2.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: a file, a field, a row, an option."""
