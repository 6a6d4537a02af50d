"""Options, declared once: adapters' typed options, plugin-contributed CLI flags, and the CLI's shared parsing.

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

import click
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


def store_argument(f):
    """A positional STORE, with the older ``--store STORE`` spelling still accepted (``pick_store`` reads both)."""
    from toolkit.store.location import STORE

    f = click.option("--store", "store_option", type=STORE,
                     help="The store (older spelling of the positional STORE).")(f)
    return click.argument("store", required=False, type=STORE, metavar="STORE")(f)


def pick_store(positional: Path | str | None, option: Path | str | None, default: Path | None = None) -> Path | str:
    """The store given positionally or with ``--store`` (not two different ones), else ``default``: a ``Path``,
    or the URL of an object-store prefix (``s3://bucket/prefix``)."""
    from toolkit.store.location import store_target

    if positional is not None and option is not None and store_target(positional) != store_target(option):
        raise ToolkitError(f"two stores given ({positional} and --store {option}): give the store once, positionally")
    store = positional if positional is not None else option
    if store is None:
        if default is None:
            raise ToolkitError("missing STORE: give the store's path, e.g. `toolkit COMMAND stores/libero.zarr`")
        return Path(default)
    return store_target(store)


def split_csv(values: tuple[str, ...] | list[str] | str | None) -> list[str] | None:
    """Repeated and/or comma-separated CLI values as one list (None when none given)."""
    if values is None:
        return None
    items = [values] if isinstance(values, str) else values
    out = [v.strip() for item in items for v in str(item).split(",") if v.strip()]
    return out or None


def _peek(args: list[str], names: tuple[str, ...]) -> dict[str, str]:
    """Values of ``--name X``/``--name=X`` in raw arguments, before click parses them (for --help)."""
    out = {}
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                out[n] = args[i + 1]
            elif a.startswith(n + "="):
                out[n] = a.split("=", 1)[1]
    return out


class PluginOptionsCommand(click.Command):
    """A command that carries the flags plugins contribute (``register_cli_options``), and whose --help
    lists the options of the ``--model``/``--dataset`` named on the same command line."""

    def _plugin_params(self) -> list:
        """Built on each use, not cached: plugins registered later in the process (tests) must show up."""
        from toolkit.sdk.plugins import cli_options

        return [click.Option([o.flag, o.param], is_flag=o.is_flag, type=o.type,
                             help=f"{o.help} (= --{o.target}-option {o.key}=...)") for o in cli_options(self.name)]

    def get_params(self, ctx):
        params = [*self.params, *self._plugin_params()]
        help_option = self.get_help_option(ctx)
        return [*params, help_option] if help_option is not None else params

    def parse_args(self, ctx, args):
        ctx.meta["toolkit.peek"] = _peek(list(args), ("--model", "--dataset"))
        return super().parse_args(ctx, args)

    def format_epilog(self, ctx, formatter):
        super().format_epilog(ctx, formatter)
        from toolkit.sdk.plugins import get_dataset, get_model

        peek = ctx.meta.get("toolkit.peek") or {}
        for flag, lookup, option in (("--model", get_model, "--model-option"),
                                     ("--dataset", get_dataset, "--dataset-option")):
            if flag not in peek:
                continue
            try:
                cls = lookup(peek[flag])
            except ToolkitError as e:
                formatter.write_paragraph()
                formatter.write_text(str(e))
                continue
            docs = describe_options(cls)
            with formatter.section(f"{option} KEY=VALUE of {cls.name}"):
                if not docs:
                    formatter.write_text("declares no options (any KEY=VALUE is passed to it)")
                    continue
                formatter.write_dl([(f"{d.name}={d.type}", d.help + ("" if d.default is None else
                                                                      f"  [default: {d.default}]"))
                                    for d in docs])



def plugin_option_values(command: str, values: dict[str, Any], store: Path) -> dict[str, dict[str, Any]]:
    """The plugin flags' values of one invocation as ``{"dataset": {...}, "model": {...}}`` adapter options."""
    from toolkit.sdk.plugins import cli_options

    out: dict[str, dict[str, Any]] = {"dataset": {}, "model": {}}
    for o in cli_options(command):
        v = o.value(values.get(o.param), store)
        if v is not None:
            out[o.target][o.key] = v
    return out
