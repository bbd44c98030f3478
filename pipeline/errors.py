"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: a config key, a missing file, an unreadable image...

    The message must name the file or key and say what was expected.
    """


class ConfigError(UserError):
    """A config key or value is wrong."""


class DataError(UserError):
    """A dataset file is missing, unreadable or inconsistent."""
