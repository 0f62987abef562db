"""The one base of every "the input is wrong" error, and the registry's own error types.

The CLI prints a `UserError` as one clear line and exits 1; anything else is a bug and keeps its traceback.
That is why plain `ValueError` is not a user error: a `ValueError` raised by a slip in our own code must not
be dressed up as the user's mistake. Validation that rejects what a user typed raises `InvalidInput`, which is
also a `ValueError` so the HTTP layers that answer 400 for `ValueError` keep doing so.
"""


class UserError(Exception):
    """The input (a file, a flag, a request, a setting) is wrong; the message says which and why."""


class InvalidInput(UserError, ValueError):
    """A value a user gave is invalid: a name, a setting, a rule, a record."""


class RegistryError(UserError):
    """A registry or provenance operation could not be carried out; the message says which file or link and why."""


class DeployRefused(UserError):
    """A swap or rollback was refused (gate, unknown task, no previous version); nothing was changed."""
