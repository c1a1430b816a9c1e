"""Errors a user can cause. Entry points print them as one clear message and exit with code 2."""
from __future__ import annotations

from typing import Any, Iterable


class UserError(Exception):
    """A mistake in the user's input: names, paths, files, targets.

    The message says what was wrong, what is allowed, and what to run. Entry points catch it and
    print it without a traceback, before any training starts.
    """


def check_choice(key: str, value: Any, allowed: Iterable[Any], hint: str = "") -> Any:
    """``value`` if it is one of ``allowed``, else a :class:`UserError` naming the key and the choices."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise UserError(f"{key}={value!r} is unknown; choose one of: {', '.join(map(str, allowed))}"
                        + (f" ({hint})" if hint else ""))
    return value
