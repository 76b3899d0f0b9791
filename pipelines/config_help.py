"""Every config field as the schema declares it (section, name, type, default, choices, the comment beside it),
read from the dataclasses and their source, so the help a command prints cannot go stale."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any, Literal, Optional

FIELD_LINE = re.compile(r"^\s+(\w+)\s*:\s*[^=]+?(?:=.*?)?(?:\s+#\s*(?P<comment>.*))?$")


def comments_of(cls: type) -> dict[str, str]:
    """The comment of each field in the class's source: the one on its line, else the block just above it."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    found, above = {}, []
    names = {f.name for f in dataclasses.fields(cls)}
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = FIELD_LINE.match(line)
        if match and match.group(1) in names and match.group(1) not in found:
            found[match.group(1)] = (match.group("comment") or " ".join(above)).strip()
        above = []
    return found


def type_name(hint: Any) -> tuple[str, list[str]]:
    """A readable type and the choices of a Literal (with null where the field is Optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "choice", [str(a) for a in args]
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        name, choices = type_name(inner[0]) if len(inner) == 1 else (" | ".join(map(str, inner)), [])
        return f"{name} or null", choices + (["null"] if choices else [])
    if origin in (list, tuple):
        inner = ", ".join(type_name(a)[0] for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]", []
    return getattr(hint, "__name__", str(hint)), []


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def field_rows(cls: type, prefix: str = "") -> list[dict]:
    """One row per leaf field of the config class `cls`: dotted name, type, default, choices, comment."""
    hints, comments, rows = typing.get_type_hints(cls), comments_of(cls), []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(field_rows(hint, f"{prefix}{f.name}."))
            continue
        name, choices = type_name(hint)
        rows.append({"name": f"{prefix}{f.name}", "type": name, "default": default_of(f), "choices": choices,
                     "comment": comments.get(f.name, "")})
    return rows


def shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def config_help(cls: type, section: Optional[str] = None) -> str:
    """The fields of `cls` (or of one section) as text: `name = default  (type; choices)`, then the comment."""
    rows = field_rows(cls)
    sections = sorted({r["name"].split(".")[0] for r in rows if "." in r["name"]})
    if section is not None:
        rows = [r for r in rows if r["name"].split(".")[0] == section]
        if not rows:
            raise ValueError(f"--help-config {section}: no such section; sections: {', '.join(sections)}")
    out = []
    for row in rows:
        kind = row["type"] if not row["choices"] else f"one of {', '.join(row['choices'])}"
        out.append(f"  {row['name']} = {shown(row['default'])}  ({kind})")
        if row["comment"]:
            out.append(f"      {row['comment']}")
    return "\n".join(out)


def choices(cls: type, name: str) -> list[str]:
    """The choices of the Literal field `name` (dotted) of `cls`."""
    return next(r["choices"] for r in field_rows(cls) if r["name"] == name)
