"""The one exception type for bad input that a user can fix."""


class DiffutronError(ValueError):
    """Bad input: the message names the problem and what to do about it.

    The CLI prints it as a single line on stderr and exits with code 2.
    """
