"""Plugin manager: loads every plugin of the ``toolkit`` entry-point group, built-ins included.

The built-in adapters in ``plugins/`` (import name ``toolkit_plugins``) and the built-in commands
(``toolkit.cli.commands``) are registered through the same entry-point group as third-party ones; the core never
imports them by name.  A plugin module stays light to import (``toolkit --help`` loads every plugin): it may
register an adapter by reference, ``register("pkg.module:Class", name=...)``, which is imported only when that
adapter is used.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import pluggy

from toolkit.sdk import hookspecs
from toolkit.sdk.errors import ToolkitError

ENTRY_POINT_GROUP = "toolkit"
KINDS = {"model": "register_models", "dataset": "register_datasets", "target": "register_targets"}


class Registered:
    """One registered adapter or target, the plugin distribution it came from, and its class (``obj``), imported
    on first use when it was registered by reference."""

    def __init__(self, kind: str, name: str, obj: type | str, plugin: str, description: str | None = None):
        self.kind, self.name, self.plugin = kind, name, plugin
        self._obj, self._description = obj, description

    @property
    def description(self) -> str:
        """The first line of what it says of itself (its ``description``, else its docstring)."""
        if self._description is None:
            doc = getattr(self.obj, "description", None) or getattr(self.obj, "__doc__", None) or ""
            lines = str(doc).strip().splitlines()
            self._description = lines[0] if lines else ""
        return self._description

    @property
    def obj(self) -> type:
        if isinstance(self._obj, str):
            module, _, attr = self._obj.partition(":")
            try:
                self._obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ToolkitError(f"{self.kind} {self.name!r} of plugin {self.plugin} cannot be loaded from "
                                   f"{self._obj}: {e}") from None
        return self._obj

    def __repr__(self) -> str:
        return f"Registered({self.kind} {self.name!r} from {self.plugin})"


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


def call_hook(hook: str, arguments: Callable[[str], dict[str, Any]]) -> None:
    """Call every plugin's implementation of ``hook`` with ``arguments(plugin label)``, so what a plugin registers
    can be traced to it."""
    pm = plugin_manager()
    for impl in getattr(pm.hook, hook).get_hookimpls():
        impl.function(**arguments(_plugin_label(pm, impl.plugin)))


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, dict[str, Registered]]:
    """All registered adapters and targets, by kind and name."""
    found: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
    for kind, hook in KINDS.items():
        def registrar(label: str, _kind: str = kind) -> dict[str, Any]:
            def register(obj: type | str, name: str | None = None, description: str | None = None) -> None:
                if isinstance(obj, str) and (":" not in obj or not name):
                    raise ToolkitError(f"plugin {label} registered a {_kind} by reference ({obj!r}): write "
                                       "register('package.module:Class', name=...)")
                name = name or getattr(obj, "name", None)
                if not name:
                    raise ToolkitError(f"plugin {label} registered a {_kind} without a `name` attribute")
                found[_kind][name] = Registered(_kind, name, obj, label, description)

            return {"register": register}

        call_hook(hook, registrar)
    return found


def cli_options(command: str) -> tuple:
    """The ``CliOption`` flags plugins contribute to ``command`` ("extract", "import"), in registration order."""
    found: dict[str, tuple] = {}

    def registrar(label: str) -> dict[str, Any]:
        def register(to, option):
            if to != command:
                return
            if option.flag in found:
                raise ToolkitError(f"plugins {found[option.flag][0]} and {label} both add {option.flag} to "
                                   f"`toolkit {command}`")
            found[option.flag] = (label, option)

        return {"register": register}

    call_hook("register_cli_options", registrar)
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
