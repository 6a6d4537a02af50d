"""`toolkit plugins`: what models, datasets, probe targets and commands are installed, and from which plugin."""

from __future__ import annotations

import json

import click


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--verbose", "-v", "verbose", is_flag=True, help="Also list each adapter's options and plugin flags.")
@click.pass_context
def plugins_command(ctx: click.Context, as_json: bool, verbose: bool) -> None:
    """List model adapters, dataset adapters, probe targets and commands, and the plugin providing each."""
    from toolkit.sdk.options import describe_options
    from toolkit.sdk.plugins import cli_options, registry

    reg = registry()
    group = ctx.parent.command if ctx.parent is not None else None
    commands = dict(sorted(getattr(group, "command_plugins", {}).items()))
    if as_json:
        def entry(r):
            out = {"name": r.name, "plugin": r.plugin, "description": r.description}
            if verbose and r.kind != "target":
                out["options"] = [{"name": d.name, "type": d.type, "default": d.default, "help": d.help}
                                  for d in describe_options(r.obj)]
            return out

        out = {kind: [entry(r) for r in entries.values()] for kind, entries in reg.items()}
        out["command"] = [{"name": name, "plugin": plugin} for name, plugin in commands.items()]
        click.echo(json.dumps(out, indent=2, default=str))
        return
    for kind, entries in reg.items():
        click.echo(f"{kind}s:")
        if not entries:
            click.echo("  (none)")
        for r in sorted(entries.values(), key=lambda r: r.name):
            click.echo(f"  {r.name:<14} {r.description}  [{r.plugin}]")
            if verbose and kind != "target":
                for d in describe_options(r.obj):
                    default = "" if d.default is None else f" (default {d.default})"
                    click.echo(f"      {d.name}={d.type}{default}" + (f"  {d.help}" if d.help else ""))
    click.echo("commands:")
    for name, plugin in commands.items():
        click.echo(f"  {name:<14} [{plugin}]")
    if verbose:
        for command in ("extract", "import"):
            for o in cli_options(command):
                click.echo(f"plugin flag: toolkit {command} {o.flag}  -> {o.target} option {o.key}: {o.help}")
