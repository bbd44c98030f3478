"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: a config key, a missing file, an unreadable image...

    The message must name the file or key and say what was expected.
    """


class ConfigError(UserError):
    """A config key or value is wrong."""


class DataError(UserError):
    """A dataset file is missing, unreadable or inconsistent."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), to quote in a one-line error."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
