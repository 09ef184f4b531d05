"""Settings read from the environment."""

from __future__ import annotations

import os


def positive_int_env(*names: str, unit: str = "") -> int | None:
    """The first of `names` set (non-blank) in the environment, as an int >= 1; None when none is set.

    Raises:
        ValueError: naming the variable, when its value is not a whole number >= 1.
    """
    for name in names:
        text = os.environ.get(name, "").strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{name}={text!r} must be a whole number >= 1{' of ' + unit if unit else ''}")
        return value
    return None
