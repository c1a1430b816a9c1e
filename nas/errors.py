"""Errors a user can cause. Entry points print them as one clear message and exit with code 2."""


class UserError(Exception):
    """A mistake in the user's input: names, paths, files, targets.

    The message says what was wrong, what is allowed, and what to run. Entry points catch it and
    print it without a traceback, before any training starts.
    """
