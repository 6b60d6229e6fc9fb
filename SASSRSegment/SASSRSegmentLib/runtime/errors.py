"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A mistake in the user's input or environment.

    The command line prints its message as a single line and exits with status 2; no traceback.
    Messages say what is wrong and what to do about it.
    """
