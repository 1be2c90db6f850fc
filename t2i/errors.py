"""User-facing errors: the message names the thing that is wrong and how to fix it."""


class T2IError(RuntimeError):
    """Base class for errors a user can cause (bad path, bad override, bad data, mismatch)."""


class ConfigError(T2IError):
    """A configuration that cannot work, e.g. no model selected."""
