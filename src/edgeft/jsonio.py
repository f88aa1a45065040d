"""Strict JSON in and out: what edgeft writes never holds NaN or Infinity (strict parsers reject
them), and what it reads from a file is refused when it holds them or nests too deeply."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_DEPTH", "dumps", "loads"]

MAX_DEPTH = 32  # containers inside containers; edgeft's own documents nest 4 deep


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (a missing measurement)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """`json.dumps` that writes strict JSON: NaN and infinities become null."""
    return json.dumps(_finite(value), allow_nan=False, **options)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str | bytes) -> Any:
    """`json.loads` of strict JSON: NaN, Infinity and nesting deeper than MAX_DEPTH raise ValueError."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    if _depth(value) > MAX_DEPTH:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    return value


def _depth(value: Any) -> int:
    """How many containers deep `value` nests (iteratively: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack += [(child, level + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest
