"""Plain values (a YAML mapping, command-line flags) into typed dataclasses, every problem collected.

    values = merge(yaml.safe_load(text), nest({"train.lr": 1e-4}))
    problems = []
    cfg = build(RunConfig, values, "", problems)   # problems: ["train.epochs: expected a number, got 'x'"]

lite_sft.config builds its RunConfig with these; they know nothing of its fields, only of dataclasses and the
types a config field may have (str, int, float, bool, list[str], X | None).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any, get_args, get_origin, get_type_hints


def build(cls: type, values: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a plain dict, recording unknown keys and wrong types."""
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(cls))
            problems.append(f"{name}: unknown field (known: {known})")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{name}: expected a mapping of fields, got {value!r}")
                continue
            kwargs[key] = build(hint, value, f"{name}.", problems)
            continue
        try:
            kwargs[key] = coerce(value, hint)
        except (TypeError, ValueError) as err:
            problems.append(f"{name}: {err}")
    return cls(**kwargs)


def coerce(value: Any, hint: Any) -> Any:
    """Coerce a YAML/CLI value to the field's annotated type (str, int, float, bool, list[str], X | None)."""
    args = get_args(hint)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
    if get_origin(hint) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        return [str(v) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError(f"expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise TypeError(f"expected a string, got {value!r}")
        return str(value)
    return value


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1e-4} -> {"train": {"lr": 1e-4}}"""
    nested: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, mapping by mapping; neither is changed."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def field_docs(cls: type) -> dict[str, str]:
    """{"lr": "Peak learning rate.", ...}: the docstring under each field of dataclass `cls`, whitespace folded.

    Read from the source with `ast`, the one place the words are written: the CLI's --help comes from here.
    """
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    docs = {}
    for field_node, doc_node in zip(node.body, node.body[1:]):
        if (isinstance(field_node, ast.AnnAssign) and isinstance(doc_node, ast.Expr)
                and isinstance(doc_node.value, ast.Constant) and isinstance(doc_node.value.value, str)):
            docs[field_node.target.id] = " ".join(doc_node.value.value.split())
    return docs


def flag(name: str | None = None, short: str | None = None, **option: Any) -> dict[str, Any]:
    """A field's command-line spelling, for `field(metadata=flag(...))`, where it is not `--field-name`.

    `name` replaces the long flag, `short` adds an alias; `option` passes on to the Typer option (min, max,
    envvar, repeat=True for an option given once per value).
    """
    return {"flag": name, "short": short, "option": option}


def flag_name(field: dataclasses.Field) -> str:
    """The long flag of a field: its own (`flag(name=...)`) or `--field-name`."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")
