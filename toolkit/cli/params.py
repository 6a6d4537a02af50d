"""What the commands share: the STORE argument, comma lists, and the flags plugins contribute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.options import describe_options
from toolkit.store.location import refuse_process_local, store_target


class StoreParam(click.ParamType):
    """A click argument type for STORE: a local path or an fsspec URL (``click.Path`` would mangle ``s3://``)."""

    name = "store"

    def convert(self, value, param, ctx):
        return value if isinstance(value, Path) else store_target(value)


STORE = StoreParam()


def store_argument(f):
    """A positional STORE, with the older ``--store STORE`` spelling still accepted (``pick_store`` reads both)."""
    f = click.option("--store", "store_option", type=STORE,
                     help="The store (older spelling of the positional STORE).")(f)
    return click.argument("store", required=False, type=STORE, metavar="STORE")(f)


def pick_store(positional: Path | str | None, option: Path | str | None, default: Path | None = None) -> Path | str:
    """The store given positionally or with ``--store`` (not two different ones), else ``default``: a ``Path``,
    or the URL of an object-store prefix (``s3://bucket/prefix``)."""
    if positional is not None and option is not None and store_target(positional) != store_target(option):
        raise ToolkitError(f"two stores given ({positional} and --store {option}): give the store once, positionally")
    store = positional if positional is not None else option
    if store is None:
        if default is None:
            raise ToolkitError("missing STORE: give the store's path, e.g. `toolkit COMMAND stores/libero.zarr`")
        return Path(default)
    refuse_process_local(store, "a command cannot reach it (and one it writes vanishes when the command ends)")
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


# --------------------------------------------------------------------------- flags from the run specification


def _click_type(annotation: Any) -> tuple[Any, bool, int | None]:
    """(click type, multiple, nargs) of a spec field's annotation."""
    import types
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _click_type(args[0])
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False, None
    if origin is tuple:
        return _click_type(args[0])[0], False, len(args)
    if origin in (list, dict):  # repeated text values; the spec's validators parse them (comma lists, KEY=VALUE)
        return str, True, None
    return (annotation if annotation in (int, float, str, bool) else str), False, None


def spec_params(spec_cls: type, command: str) -> list[click.Option]:
    """Click options for every field of a run specification (``toolkit.run.spec``) offered to ``command``: flags,
    help, defaults, choices and types all come from the spec, so an option is declared once."""
    out = []
    for name, info in spec_cls.model_fields.items():
        extra = info.json_schema_extra or {}
        if command not in extra.get("commands", ()) or not extra.get("flags"):
            continue
        kind, multiple, nargs = _click_type(info.annotation)
        multiple = multiple and extra.get("repeat", True)
        default = info.get_default(call_default_factory=True)
        kw: dict[str, Any] = {"help": info.description, "metavar": extra.get("metavar")}
        if kind is bool:
            kw.update(is_flag=True, default=bool(default))
        elif multiple:
            kw.update(multiple=True, type=kind)
            if isinstance(default, list) and default:
                kw.update(default=[str(v) for v in default], show_default=",".join(map(str, default)))
        else:
            kw.update(type=kind, default=default, show_default=default is not None, nargs=nargs or 1)
        out.append(click.Option([*extra["flags"], name], **kw))
    return out


def spec_options(spec_cls: type, command: str):
    """A decorator adding ``spec_params(spec_cls, command)`` to a command, in the spec's field order."""

    def decorate(f):
        params = getattr(f, "__click_params__", [])
        params.extend(reversed(spec_params(spec_cls, command)))  # click reverses the decorators' list
        f.__click_params__ = params
        return f

    return decorate


def spec_values(spec_cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The spec's fields among a command's parsed ``values`` (click passes every option by its field name)."""
    return {k: v for k, v in values.items() if k in spec_cls.model_fields}
