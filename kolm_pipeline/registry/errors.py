"""The exception types the registry raises, so callers can catch registry failures as a whole."""


class RegistryError(Exception):
    """A registry operation could not be carried out; the message says which file or link and why."""


class DeployRefused(Exception):
    """A swap or rollback was refused (gate, unknown task, no previous version); nothing was changed."""
