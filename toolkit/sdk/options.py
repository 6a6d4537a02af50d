"""Adapters' typed options, declared once, and the flags plugins contribute to the CLI (as data: no click here).

An adapter declares its options as a nested ``Options`` class (a pydantic model deriving from
``AdapterOptions``): names, types, defaults, help text and validation in one place.  The same
declaration validates ``--model-option``/``--dataset-option`` KEY=VALUE text and Python keywords, and
is what ``toolkit plugins --verbose`` and ``toolkit extract --model X --help`` print.  The older
``option_defaults`` dict (names and defaults, values passed through as given) keeps working.

A plugin adds flags to ``toolkit extract``/``import`` through the ``register_cli_options`` hook with
``CliOption`` objects, each feeding one adapter option, so the core CLI names no plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from toolkit.sdk.errors import ToolkitError


class AdapterOptions(pydantic.BaseModel):
    """Base of an adapter's typed ``Options``: unknown names are errors, text values are converted
    (``"5"`` -> 5, ``"true"`` -> True), numbers are accepted for text fields."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True,
                                       protected_namespaces=())


@dataclass(frozen=True)
class OptionDoc:
    """One option as shown to users."""

    name: str
    type: str
    default: Any
    help: str


def _typed(cls: type) -> type[pydantic.BaseModel] | None:
    model = getattr(cls, "Options", None)
    return model if isinstance(model, type) and issubclass(model, pydantic.BaseModel) else None


def parse_options(cls: type, given: dict[str, Any], owner: str) -> dict[str, Any]:
    """``given`` (None values = not given) checked against ``cls``'s declared options, with defaults filled in.

    Typed ``Options``: validated and converted.  ``option_defaults``: unknown names rejected, values as
    given.  Neither: accepted as given (the adapter checks them itself).
    """
    given = {k: v for k, v in given.items() if v is not None}
    model = _typed(cls)
    declared = list(model.model_fields) if model is not None else getattr(cls, "option_defaults", None)
    if declared is None:
        return dict(given)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ToolkitError(f"{owner} has no option {unknown[0]!r}; options: {', '.join(declared) or 'none'}")
    if model is None:
        return {**cls.option_defaults, **given}
    try:
        return model(**given).model_dump()
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "?"
        key = str(err["loc"][0]) if err["loc"] else None
        shown = f"={given[key]!r}" if key in given else ""
        raise ToolkitError(f"{owner} option {name}{shown}: {err['msg']}") from None


def _type_name(annotation: Any) -> str:
    import typing

    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(map(str, typing.get_args(annotation)))
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def describe_options(cls: type) -> list[OptionDoc]:
    """The options ``cls`` declares, for help output (empty when it declares none)."""
    model = _typed(cls)
    if model is not None:
        return [OptionDoc(name, _type_name(f.annotation), f.get_default(call_default_factory=True),
                          f.description or "") for name, f in model.model_fields.items()]
    return [OptionDoc(name, "text", default, "") for name, default in (getattr(cls, "option_defaults", None)
                                                                         or {}).items()]


@dataclass(frozen=True)
class CliOption:
    """A flag a plugin adds to `toolkit extract`/`toolkit import`, feeding one adapter option.

    ``target`` is ``"dataset"`` or ``"model"``: the value becomes ``dataset_options[key]`` or
    ``model_options[key]`` (unless None).  ``convert(value, store)`` may turn the flag's value into the
    option's (e.g. a ``--save-video`` flag into a folder next to the store)."""

    flag: str
    key: str
    help: str
    target: str = "dataset"
    type: Any = None
    is_flag: bool = False
    convert: Callable[[Any, Path], Any] | None = None

    @property
    def param(self) -> str:
        return "plugin_" + self.flag.lstrip("-").replace("-", "_")

    def value(self, raw: Any, store: Path) -> Any:
        if raw is None or (self.is_flag and not raw):
            return None
        return self.convert(raw, store) if self.convert is not None else raw


def key_values(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    """``--model-option``/``--dataset-option`` style KEY=VALUE pairs as a dict (dashes in keys become _)."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ToolkitError(f"{option} takes KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.replace("-", "_")] = v
    return out


def int_option(value: Any, owner: str, name: str, minimum: int = 0, required: bool = False) -> int | None:
    """An adapter option that must be an integer >= minimum; None (or "") means not given, unless required."""
    if (value is None or value == "") and not required:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ToolkitError(f"{owner} option {name}={value!r} is not an integer") from None
    if n < minimum:
        raise ToolkitError(f"{owner} option {name} must be at least {minimum}, got {n}")
    return n
