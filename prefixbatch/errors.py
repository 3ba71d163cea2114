"""One exception hierarchy for the whole package.

`UserError` and its subclasses are mistakes a user can fix (a bad spec, a missing file or
column, an unreadable model folder): the CLI prints their message alone and exits with 2.
Anything else that escapes is a bug in prefixbatch: exit code 1, traceback with --debug.
Messages name the file, row, column or field, what was expected and what was found.
"""


class PrefixbatchError(Exception):
    """Base of every error prefixbatch raises on purpose."""


class UserError(PrefixbatchError):
    """A mistake in what the user gave us; the message alone tells them how to fix it."""


class SpecError(UserError):
    """The job spec file is missing, unparsable or fails validation."""


class InputError(UserError):
    """The input Parquet files are missing, unreadable, or lack the columns the spec names."""


class ModelError(UserError):
    """The model folder is missing, unreadable or not supported by the chosen executor."""


class OutputError(UserError):
    """The output location cannot be used as asked (for example, not empty under mode=error)."""
