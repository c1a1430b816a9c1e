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


def check_skip_prob(key: str, value: Any) -> float | None:
    """``None`` or a probability in [0, 1) for how often random sampling skips a layer that can be skipped."""
    if value is None:
        return None
    try:
        p = float(value)
    except (TypeError, ValueError):
        p = float("nan")
    if not 0.0 <= p < 1.0:
        raise UserError(f"{key}={value!r} must be null (each candidate alike, zero included) or a probability in "
                        f"[0, 1) that a layer which can be skipped is skipped (e.g. 0.5)")
    return p
