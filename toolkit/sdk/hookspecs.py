"""Plugin hook specifications: the whole registration surface a plugin implements.

Built-in models, datasets, targets and commands are plugins too, registered through the same hooks.

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
    """Register model adapters: ``register(AdapterClass)`` for each ModelAdapter subclass, or
    ``register("package.module:AdapterClass", name=..., description=...)`` to import it only when used."""


@hookspec
def register_datasets(register):
    """Register dataset adapters: ``register(AdapterClass)`` for each DatasetAdapter subclass (or lazily by
    ``"module:Class"`` with ``name`` and ``description``, as for models)."""


@hookspec
def register_targets(register):
    """Register probe targets (label encoders): ``register(TargetClass)`` for each one."""


@hookspec
def register_commands(cli):
    """Add commands to the ``toolkit`` command line: ``cli.add_command(click_command)`` (or ``@cli.command()``)."""


@hookspec
def register_cli_options(register):
    """Add flags to a command: call ``register("extract", CliOption(...))`` (or ``"import"``) for each one;
    a ``toolkit.sdk.options.CliOption`` feeds one dataset or model option, so the core CLI names no plugin."""
