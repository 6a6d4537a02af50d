"""The command line: the `toolkit` group (``toolkit.cli.main``) and the built-in commands, one module per group,
registered through the same ``register_commands`` hook a plugin uses (``toolkit.cli.commands``)."""

from toolkit.cli.main import cli, main, register_commands

__all__ = ["cli", "main", "register_commands"]
