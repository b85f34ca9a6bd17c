"""IMAGEGEN_* numbers from the environment, read and checked when used (never at import time).

A bad value (`IMAGEGEN_KEEP_WARM=abc`, `nan`, `-5`) is an invalid_argument error naming the
variable, so a typo in a shell profile gives `error:` + `hint:` instead of a traceback.
"""

from __future__ import annotations

import math
import os

from imagegen.util.errors import ImagegenError


def _refuse(name: str, raw: str, why: str, default: float) -> ImagegenError:
    return ImagegenError("invalid_argument", f"{name}={raw!r} {why}",
                         hint=f"Unset {name} (the default is {default:g}) or set it to a number, "
                              f"e.g. {name}={default:g}.")


def env_float(name: str, default: float, minimum: float | None = 0.0, maximum: float | None = None) -> float:
    """The variable as a finite float within [minimum, maximum]; `default` when unset or empty."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _refuse(name, raw, "is not a number", default) from None
    if not math.isfinite(value):
        raise _refuse(name, raw, "is not a finite number", default)
    if minimum is not None and value < minimum:
        raise _refuse(name, raw, f"is below the minimum of {minimum:g}", default)
    if maximum is not None and value > maximum:
        raise _refuse(name, raw, f"is above the maximum of {maximum:g}", default)
    return value


def env_int(name: str, default: int, minimum: int | None = 0, maximum: int | None = None) -> int:
    """The variable as a whole number within [minimum, maximum]; `default` when unset or empty."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise _refuse(name, raw, "is not a whole number", default) from None
    if minimum is not None and value < minimum:
        raise _refuse(name, raw, f"is below the minimum of {minimum}", default)
    if maximum is not None and value > maximum:
        raise _refuse(name, raw, f"is above the maximum of {maximum}", default)
    return value
