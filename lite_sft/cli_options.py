"""The commands' options, built from the dataclass fields they set: the field is the flag, its docstring the help.

    @options("TuneOptions.config", "model.name_or_path", "train.lr")
    def tune(given: Given): ...          # lite-sft tune --config run.yaml --model org/model --lr 1e-4

A dotted lower-case name is a field of the run config (lite_sft.config): its flag overrides the YAML file, so it
defaults to None (left out, it changes nothing), shows no default, and a bool takes --x and --no-x. A `Class.field`
name is a field of a class in lite_sft.options: its flag has the field's default. Either way the flag is
`--field-name` unless the field's `flag(...)` metadata names another, a list is comma-separated text, and the help
is the docstring under the field, word for word.

Why a builder over `dataclasses.fields` rather than jsonargparse (what litgpt uses): the commands stay Typer
commands, so every flag, its help and its `[default: ...]` render exactly as before (tests/test_cli_help.py), and
no new dependency is needed; the builder only writes the signature Typer reads.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Annotated, Any, Callable, Optional, get_args, get_origin, get_type_hints

import typer

from . import options as option_classes
from .config import RunConfig, config_field, field_docs as config_docs
from .config_io import field_docs, flag_name

CLASSES = {name: cls for name, cls in vars(option_classes).items()
           if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == option_classes.__name__}


def fail(err: Exception, code: int = 2):
    """Print `error: ...` in red and exit with `code` (2: a usage or input problem, 1: a gate or a run failed)."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _source(path: str) -> tuple[type, dataclasses.Field, str]:
    """(the dataclass, the field, its help) that a name such as `train.lr` or `ExportOptions.dtype` means."""
    if path[0].isupper():
        cls_name, name = path.split(".")
        cls = CLASSES[cls_name]
        return cls, next(f for f in dataclasses.fields(cls) if f.name == name), _docs(cls)[name]
    section = path.rpartition(".")[0]
    cls = type(getattr(RunConfig(), section)) if section else RunConfig
    return cls, config_field(path), _docs(RunConfig)[path]


@functools.cache
def _docs(cls: type) -> dict[str, str]:
    return config_docs() if cls is RunConfig else field_docs(cls)


def param_name(path: str) -> str:
    """The Python parameter a field's option fills (unique across the classes a command draws on)."""
    return path.replace(".", "__")


def _parameter(path: str) -> inspect.Parameter:
    cls, field, help = _source(path)
    override = not path[0].isupper()
    hint = get_type_hints(cls)[field.name]
    optional = type(None) in get_args(hint)
    kind = next(a for a in get_args(hint) if a is not type(None)) if optional else hint
    extra = dict(field.metadata.get("option", {}))
    if get_origin(kind) is list and not extra.pop("repeat", False):
        kind = str  # comma-separated on the command line
    long = flag_name(field)
    if kind is bool and (override or optional or field.default is True):
        # Both spellings where leaving the flag out is not the same as one of them: a config override (out:
        # the file decides), an unset None, or a default of True.
        long = f"{long}/--no-{long[2:]}"
    names = [long] + ([field.metadata["short"]] if field.metadata.get("short") else [])
    if override:
        default, extra["show_default"] = None, False
    elif field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = inspect.Parameter.empty  # a required option
    if isinstance(default, list):
        default = ",".join(str(v) for v in default)
    annotation = Optional[kind] if (override or optional) else kind
    return inspect.Parameter(param_name(path), inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, typer.Option(*names, help=help, **extra)])


class Given:
    """The values a command's generated options received, by field name."""

    def __init__(self, values: dict[str, Any]):
        self.values = values

    def __getitem__(self, path: str) -> Any:
        return self.values[path]

    def overrides(self) -> dict[str, Any]:
        """{"train.lr": 1e-4, ...}: the run-config fields given, for load_config (None changes nothing)."""
        return {path: value for path, value in self.values.items() if not path[0].isupper()}

    def of(self, cls: type) -> dict[str, Any]:
        """The fields of `cls` among the options, as its constructor takes them (comma-separated lists split)."""
        hints = get_type_hints(cls)
        found = {}
        for path, value in self.values.items():
            cls_name, _, name = path.partition(".")
            if cls_name != cls.__name__:
                continue
            kind = hints[name]
            if isinstance(value, str) and list in (get_origin(kind), *map(get_origin, get_args(kind))):
                value = _ints(value, flag_name(_source(path)[1])) if int in _item_types(kind) else value.split(",")
            found[name] = value
        return found


def _item_types(hint) -> tuple:
    lists = [hint] if get_origin(hint) is list else [a for a in get_args(hint) if get_origin(a) is list]
    return get_args(lists[0])


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(ValueError(f"{flag} {text!r}: comma-separated whole numbers, e.g. 32,128"))


def options(*paths: str) -> Callable:
    """Give the decorated command one option per field in `paths`, in this order, after its own parameters (its
    arguments); it receives them as `given`, a Given."""

    def decorate(body: Callable) -> Callable:
        own = [p for p in inspect.signature(body, eval_str=True).parameters.values() if p.name != "given"]
        by_name = {param_name(path): path for path in paths}

        def command(**kwargs):
            given = Given({by_name[name]: kwargs.pop(name) for name in list(kwargs) if name in by_name})
            return body(**kwargs, given=given)

        for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(command, attr, getattr(body, attr))
        command.__signature__ = inspect.Signature(own + [_parameter(path) for path in paths])
        return command

    return decorate
