"""Writes the small TOML documents a job built from Python values needs:
strings, numbers, booleans, lists of them, tables, and arrays of tables."""

from __future__ import annotations

import json
from typing import Any, Dict, List


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    if hasattr(v, "item"):
        return _value(v.item())
    raise TypeError(f"cannot write {v!r} into a job file")


def dumps(doc: Dict[str, Any]) -> str:
    lines: List[str] = []
    tables = []
    for k, v in doc.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.extend((k, x) for x in v)
        elif isinstance(v, dict) and k == "requirements":
            tables.append((None, (k, v)))
        else:
            lines.append(f"{k} = {_value(v)}")
    for name, t in tables:
        if name is None:
            k, v = t
            lines.append(f"\n[{k}]")
            lines.extend(f"{a} = {_value(b)}" for a, b in v.items())
        else:
            lines.append(f"\n[[{name}]]")
            lines.extend(f"{a} = {_value(b)}" for a, b in t.items())
    return "\n".join(lines) + "\n"
