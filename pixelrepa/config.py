"""The config idiom every dataclass config of pixelrepa follows.

- A field's annotation is its type: ``check_types`` refuses (or normalises: ints for floats, sequences
  for tuples, paths for strings) what does not fit, before any range check sees it.
- ``None`` means "the registry's or the paper's value" (``attn_drop: float | None = None``).
- A bad value raises `ConfigError` naming ``Class.field=value``, the class being the config the user
  wrote: checks shared between configs (flow.check_flow, align.check_align) take that config itself,
  read the fields by their shared names, and so name it without any rewriting of messages.
- A config built from another (a study's runs from its profile) takes the fields the two share by
  name (``shared``), plus the few it sets explicitly.
- ``config_parser`` gives every field a ``--field`` typed from its annotation, ``None`` included, and
  ``cli_errors`` ends a command whose input is wrong with one line naming what is wrong.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import numbers
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping


class ConfigError(ValueError):
    """``owner.field=value: why``; the parts are kept (``field``, ``why``) so that a config derived from
    another can report the field of the config its user wrote."""

    def __init__(self, owner: str, field: str, value, why: str):
        super().__init__(f"{owner}.{field}={value!r}: {why}")
        self.owner, self.field, self.value, self.why = owner, field, value, why


_UNSET = object()


def refuse(cfg, field: str, why: str, value=_UNSET) -> typing.NoReturn:
    """Raise `ConfigError` for ``cfg``'s ``field`` (its current value unless ``value`` is given)."""
    raise ConfigError(type(cfg).__name__, field, getattr(cfg, field) if value is _UNSET else value, why)


def _optional(tp) -> tuple[object, bool]:
    """(the type, whether None is allowed) of an annotation ``X`` or ``X | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _element(tp):
    """The element type of ``tuple[X, ...]``, or None for any other annotation."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return args[0] if args else object
    return None


_WHAT = {bool: "True or False", int: "an integer", float: "a finite number", str: "a string"}
_WHAT_MANY = {bool: "bools", int: "integers", float: "finite numbers", str: "strings"}


def _scalar(v, tp):
    """``v`` as type ``tp`` (ints accepted for floats, path objects for strings), or _UNSET if it is not."""
    if tp is bool:
        return v if isinstance(v, bool) else _UNSET
    if isinstance(v, bool):  # a bool is an int to Python, never a count or a rate here
        return _UNSET
    if tp is int:
        return int(v) if isinstance(v, numbers.Integral) else _UNSET
    if tp is float:
        return float(v) if isinstance(v, numbers.Real) and math.isfinite(v) else _UNSET
    if tp is str:
        v = os.fspath(v) if isinstance(v, os.PathLike) else v
        return v if isinstance(v, str) else _UNSET
    return v


def check_types(cfg) -> None:
    """Give each field of the dataclass ``cfg`` its annotated type, or refuse it naming the field: a
    string, a NaN or a bool where a count belongs is refused here, not deep inside training."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        tp, optional = _optional(hints[f.name])
        if optional and v is None:
            continue
        elem = _element(tp)
        if elem is not None:
            items = None if isinstance(v, (str, bytes)) or not isinstance(v, Iterable) else list(v)
            got = [_scalar(x, elem) for x in items or ()]
            if not items or any(x is _UNSET for x in got):
                refuse(cfg, f.name, f"must be a non-empty sequence of {_WHAT_MANY.get(elem, elem)}")
            object.__setattr__(cfg, f.name, tuple(got))  # frozen configs too
            continue
        got = _scalar(v, tp)
        if got is _UNSET:
            refuse(cfg, f.name, f"must be {_WHAT.get(tp, tp)}" + (" or None" if optional else ""))
        object.__setattr__(cfg, f.name, got)


def shared(src, cls) -> dict:
    """The fields of dataclass ``cls`` that ``src`` (a dataclass instance or a mapping, e.g. a config
    saved in a checkpoint) also has, by name: how one config is derived from another."""
    have = src if isinstance(src, Mapping) else {f.name: getattr(src, f.name) for f in dataclasses.fields(src)}
    return {f.name: have[f.name] for f in dataclasses.fields(cls) if f.name in have}


def _parse_bool(s: str) -> bool:
    return s.lower() in ("1", "true", "yes")


def config_parser(cls, prog: str) -> argparse.ArgumentParser:
    """``--field value`` for every field of the dataclass ``cls``, typed from its annotation; a field
    that may be None takes ``none`` for it (the default value)."""
    p = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp, optional = _optional(hints[f.name])
        elem = _element(tp)
        parse = _parse_bool if (elem or tp) is bool else (elem or tp)
        if optional:
            parse = _or_none(parse)
        p.add_argument(f"--{f.name}", type=parse, default=default, nargs="+" if elem else None,
                       metavar="BOOL" if tp is bool else None)
    return p


def _or_none(parse):
    def value(s: str):
        return None if s.lower() == "none" else parse(s)
    value.__name__ = f"{parse.__name__} or none"  # argparse names the type in its errors
    return value


@contextlib.contextmanager
def cli_errors(prog: str, errors: tuple[type[BaseException], ...]):
    """A command line's user errors: an exception of ``errors`` (the input is wrong: configuration,
    data, checkpoints) ends the process with status 1 and the one line ``prog: error: message``;
    set PIXELREPA_TRACEBACK=1 for the traceback instead."""
    try:
        yield
    except errors as err:
        if os.environ.get("PIXELREPA_TRACEBACK"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
