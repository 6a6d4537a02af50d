"""The `toolkit` command group.  Its commands, built-in or a plugin's, register through the ``register_commands``
hook (``toolkit.cli.commands`` is the built-in plugin), so importing this module loads no model code and no torch."""

from __future__ import annotations

import logging
import sys
import warnings

import click

from toolkit.sdk.errors import ToolkitError


def _resume_command() -> str:
    """The command line that was run, with --resume instead of --overwrite."""
    import shlex

    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    return shlex.join(["toolkit", *args, *([] if "--resume" in args else ["--resume"])])


class ToolkitGroup(click.Group):
    """Turns ToolkitError into one line on stderr and exit code 2; an interrupted run (SIGINT, SIGTERM, SIGHUP)
    into one line with the committed count and the --resume command, exit code 128 + the signal number.
    Its commands are registered by the plugins (``register_commands``) the first time one is looked up."""

    registered = False

    def _register(self) -> None:
        if not self.registered:
            self.registered = True
            register_commands(self)

    def list_commands(self, ctx):
        self._register()
        return super().list_commands(ctx)

    def get_command(self, ctx, name):
        self._register()
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ToolkitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt as e:
            msg = str(e) or "interrupted"
            if hasattr(e, "signum"):  # toolkit.run.signals.Interrupted: the store is resumable
                msg += f"; continue with: {_resume_command()}"
            click.echo(f"error: {msg}", err=True)
            sys.exit(getattr(e, "exit_code", 130))


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="toolkit")
@click.option("-v", "--verbose", is_flag=True, help="Log debug information.")
@click.option("--threads", type=int, help="CPU threads for torch and BLAS (default: OMP_NUM_THREADS, else the "
                                            "usable CPUs less the busy ones, at least 1).")
def cli(verbose: bool, threads: int | None) -> None:
    """Look inside Vision-Language-Action robot policies: capture hidden states into Zarr stores, probe them.

    \b
    toolkit plugins                                          what models and datasets are installed
    toolkit extract stores/libero.zarr --model pi0 --dataset libero
    toolkit info stores/libero.zarr                          what a store holds
    toolkit probe stores/libero.zarr                         linear probes, layer by layer
    """
    from toolkit.sdk.compute import set_threads

    set_threads(threads)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


class _Registrar:
    """What a plugin's ``register_commands`` receives: the group, refusing a command name already taken."""

    def __init__(self, group: click.Group, plugin: str, owners: dict[str, str]):
        self.group, self.plugin, self.owners = group, plugin, owners

    def add_command(self, command: click.Command, name: str | None = None) -> None:
        name = name or command.name
        if name in self.owners and self.owners[name] != self.plugin:
            raise ToolkitError(f"plugins {self.owners[name]} and {self.plugin} both add the command `toolkit {name}`")
        self.owners[name] = self.plugin
        self.group.add_command(command, name)

    def command(self, *args, **kwargs):
        def decorate(f):
            cmd = click.command(*args, **kwargs)(f)
            self.add_command(cmd)
            return cmd

        return decorate

    def __getattr__(self, name: str):
        return getattr(self.group, name)


def register_commands(group: click.Group) -> None:
    """Let every plugin add its commands (``register_commands(cli)``), the built-in ones included."""
    from toolkit.sdk.plugins import call_hook

    owners: dict[str, str] = {}
    call_hook("register_commands", lambda plugin: {"cli": _Registrar(group, plugin, owners)})
    group.command_plugins = owners  # command name -> the plugin that added it (`toolkit plugins` lists them)


def main() -> None:
    try:
        cli._register()
    except ToolkitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    cli(prog_name="toolkit")
