"""Plugin manager: loads every plugin of the ``toolkit`` entry-point group, built-ins included.

The built-in adapters in ``plugins/`` (import name ``toolkit_plugins``) are registered through the
same entry-point group as third-party ones; the core never imports them by name.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pluggy

from toolkit.sdk import hookspecs
from toolkit.sdk.errors import ToolkitError

ENTRY_POINT_GROUP = "toolkit"


@dataclass(frozen=True)
class Registered:
    """One registered adapter or target and the plugin distribution it came from."""

    kind: str  # "model" | "dataset" | "target"
    name: str
    obj: type
    plugin: str
    description: str


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("toolkit")
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def _plugin_label(pm: pluggy.PluginManager, plugin) -> str:
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return f"{dist.project_name} {dist.version}"
    return pm.get_name(plugin) or getattr(plugin, "__name__", "?")


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, dict[str, Registered]]:
    """All registered adapters and targets, by kind and name."""
    pm = plugin_manager()
    found: dict[str, dict[str, Registered]] = {"model": {}, "dataset": {}, "target": {}}
    hooks = {"model": "register_models", "dataset": "register_datasets", "target": "register_targets"}
    for kind, hook_name in hooks.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            label = _plugin_label(pm, impl.plugin)

            def register(obj, _kind=kind, _label=label):
                name = getattr(obj, "name", None)
                if not name:
                    raise ToolkitError(f"plugin {_label} registered a {_kind} without a `name` attribute")
                doc = (getattr(obj, "description", None) or (obj.__doc__ or "")).strip().splitlines()
                found[_kind][name] = Registered(_kind, name, obj, _label, doc[0] if doc else "")

            impl.function(register=register)
    return found


def cli_options(command: str) -> tuple:
    """The ``CliOption`` flags plugins contribute to ``command`` ("extract", "import"), in registration order."""
    pm = plugin_manager()
    found: dict[str, tuple] = {}
    for impl in pm.hook.register_cli_options.get_hookimpls():
        label = _plugin_label(pm, impl.plugin)

        def register(to, option, _label=label):
            if to != command:
                return
            if option.flag in found:
                raise ToolkitError(f"plugins {found[option.flag][0]} and {_label} both add {option.flag} to "
                                   f"`toolkit {command}`")
            found[option.flag] = (_label, option)

        impl.function(register=register)
    return tuple(option for _, option in found.values())


def _lookup(kind: str, name: str) -> type:
    entries = registry()[kind]
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise ToolkitError(f"unknown {kind} {name!r}; known {kind}s: {known} (see `toolkit plugins`)")
    return entries[name].obj


def get_model(name: str) -> type:
    return _lookup("model", name)


def get_dataset(name: str) -> type:
    return _lookup("dataset", name)


def get_target(name: str) -> type:
    return _lookup("target", name)
