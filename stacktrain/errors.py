"""`StackError` and the small validators every component uses to reject bad input early.

This module imports nothing but the standard library, so the Lightning-free core
(`stacktrain.functional`) can raise the same error as the callbacks and modules.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from typing import Any

_UNSET: Any = object()


class StackError(ValueError):
    """A configuration that stacktrain cannot run, raised before the first batch (and by
    `NonFiniteGuard` when a run has diverged, so the CLI prints that as one line too).

    The message always says where the problem is (``source``: a technique, module or data
    module), which key, the value it got, and how to fix it, e.g.::

        TokenDropout: keep_ratio=1.5 is out of range (0, 1]. Fix: pass a keep ratio such as 0.5.
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        key: str | None = None,
        value: Any = _UNSET,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.key = key
        self.value = None if value is _UNSET else value
        self.fix = fix
        parts = []
        if source:
            parts.append(f"{source}: ")
        if key is not None:
            parts.append(f"{key}={value!r} " if value is not _UNSET else f"{key} ")
        parts.append(problem.rstrip("."))
        parts.append(".")
        if fix:
            parts.append(f" Fix: {fix.rstrip('.')}.")
        super().__init__("".join(parts))


def require_number(
    value: Any,
    key: str,
    *,
    source: str,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
    fix: str | None = None,
) -> Any:
    """Return ``value`` if it is a number inside the given interval, else raise `StackError`."""
    kind = "an integer" if integer else "a number"
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive else ")"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    fix = fix or f"use {kind} in {interval}"
    is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not is_number:
        raise StackError(
            f"must be {kind}, got {type(value).__name__}", source=source, key=key, value=value, fix=fix
        )
    if value != value:  # NaN
        raise StackError("must be a number, got NaN", source=source, key=key, value=value, fix=fix)
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        raise StackError(f"is out of range {interval}", source=source, key=key, value=value, fix=fix)
    return value


def require_choice(value: Any, key: str, choices: Sequence[Any], *, source: str) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise `StackError` naming the closest."""
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise StackError(
        f"is not one of {list(choices)}{hint}",
        source=source,
        key=key,
        value=value,
        fix=f"use one of {', '.join(repr(c) for c in choices)}",
    )


def closest_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The ``n`` candidates closest to ``name`` (for 'did you mean' messages)."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.4)


def require_existing_path(path: str | os.PathLike, key: str, *, source: str, fix: str | None = None) -> str:
    """Return ``path`` as a string if it exists and is readable, else raise `StackError` naming it."""
    text = os.fspath(path)
    if not os.path.exists(text):
        raise StackError(
            "does not exist", source=source, key=key, value=text,
            fix=fix or "check the path (relative paths are taken from the current directory)",
        )
    if not os.access(text, os.R_OK):
        raise StackError("is not readable", source=source, key=key, value=text, fix="fix its permissions")
    return text
