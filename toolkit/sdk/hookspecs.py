"""Plugin hook specifications: the whole registration surface a plugin implements.

A plugin is a module (or package) with one or more ``@hookimpl`` functions, exposed through the
``toolkit`` entry-point group, e.g. in the plugin's pyproject.toml::

    [project.entry-points.toolkit]
    myvla = "toolkit_myvla"
"""

import pluggy

hookspec = pluggy.HookspecMarker("toolkit")
hookimpl = pluggy.HookimplMarker("toolkit")


@hookspec
def register_models(register):
    """Register model adapters: call ``register(AdapterClass)`` for each ModelAdapter subclass."""


@hookspec
def register_datasets(register):
    """Register dataset adapters: call ``register(AdapterClass)`` for each DatasetAdapter subclass."""


@hookspec
def register_targets(register):
    """Register probe targets (label encoders): call ``register(TargetClass)`` for each one."""


@hookspec
def register_cli_options(register):
    """Add flags to a command: call ``register("extract", CliOption(...))`` (or ``"import"``) for each one;
    a ``toolkit.sdk.options.CliOption`` feeds one dataset or model option, so the core CLI names no plugin."""
