"""The `toolkit` command line: plugins, extract, import, info (and probe/report when installed)."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import click

from toolkit.store.location import STORE

from toolkit.sdk.options import (
    PluginOptionsCommand,
    key_values,
    pick_store,
    plugin_option_values,
    split_csv,
    store_argument,
)
from toolkit.sdk.errors import ToolkitError

EXTRACT_EXAMPLES = """
\b
Examples:
  toolkit extract stores/libero.zarr --model pi0 --dataset libero
  toolkit extract stores/pi0_libero.zarr --model pi0 --dataset libero --data data/inference_latents \\
      --checkpoint lerobot/pi0 --device cuda --model-dtype bfloat16 \\
      --site vlm,action --layer all --layer action=0,8,17 --tokens vlm=text --pool mean
  toolkit extract ... --resume      # continue a run that was interrupted
  toolkit extract --model pi0 --help   # also list pi0's --model-option names
"""


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


def _resume_command() -> str:
    """The command line that was run, with --resume instead of --overwrite."""
    import shlex

    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    return shlex.join(["toolkit", *args, *([] if "--resume" in args else ["--resume"])])


class ToolkitGroup(click.Group):
    """Turns ToolkitError into one line on stderr and exit code 2; an interrupted run (SIGINT, SIGTERM, SIGHUP)
    into one line with the committed count and the --resume command, exit code 128 + the signal number."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ToolkitError as e:
            _fail(e)
        except KeyboardInterrupt as e:
            msg = str(e) or "interrupted"
            if hasattr(e, "signum"):  # toolkit.run.pipeline.Interrupted: the store is resumable
                msg += f"; continue with: {_resume_command()}"
            click.echo(f"error: {msg}", err=True)
            sys.exit(getattr(e, "exit_code", 130))


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="toolkit")
@click.option("-v", "--verbose", is_flag=True, help="Log debug information.")
@click.option("--threads", type=int, help="CPU threads for torch and BLAS (default: OMP_NUM_THREADS, else the "
                                            "container's CPU quota).")
def cli(verbose: bool, threads: int | None) -> None:
    """Look inside Vision-Language-Action robot policies: capture hidden states into Zarr stores, probe them.

    \b
    toolkit plugins                                          what models and datasets are installed
    toolkit extract stores/libero.zarr --model pi0 --dataset libero
    toolkit info stores/libero.zarr                          what a store holds
    """
    from toolkit.sdk.compute import set_threads

    set_threads(threads)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--verbose", "-v", "verbose", is_flag=True, help="Also list each adapter's options and plugin flags.")
def plugins_command(as_json: bool, verbose: bool) -> None:
    """List model adapters, dataset adapters and probe targets, and the plugin providing each."""
    from toolkit.sdk.options import describe_options
    from toolkit.sdk.plugins import cli_options, registry

    reg = registry()
    if as_json:
        def entry(r):
            out = {"name": r.name, "plugin": r.plugin, "description": r.description}
            if verbose and r.kind != "target":
                out["options"] = [{"name": d.name, "type": d.type, "default": d.default, "help": d.help}
                                  for d in describe_options(r.obj)]
            return out

        click.echo(json.dumps({kind: [entry(r) for r in entries.values()] for kind, entries in reg.items()},
                              indent=2, default=str))
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
    if verbose:
        for command in ("extract", "import"):
            for o in cli_options(command):
                click.echo(f"plugin flag: toolkit {command} {o.flag}  -> {o.target} option {o.key}: {o.help}")


def _selection_options(f):
    opts = [
        click.option("--site", "--sites", "sites", multiple=True,
                     help="Capture sites, comma-separated (default: all of the model's sites)."),
        click.option("--layer", "--layers", "layers", multiple=True,
                     help="Layers: all | 0,5,17 | 0-5 | 3- | -1 (the last); SITE=SPEC for one site."),
        click.option("--hook", "hooks", multiple=True,
                     help="Instead of --site/--layer/--stream: hook names such as vlm.layers.*.resid_post or "
                          "action.layers.0-5.resid_mid (globs allowed; TransformerLens' blocks.5.hook_resid_post "
                          "for a one-site model); repeat for more."),
        click.option("--tokens", multiple=True,
                     help="Tokens: all | last | span (image, text, state, actions, ...) | 0,5,-1; SITE=SPEC."),
        click.option("--pool", multiple=True, help="Pooling over the kept tokens: none | mean | last; SITE=SPEC."),
        click.option("--stream", "--streams", "streams", multiple=True,
                     help="Streams: resid_post (hidden_states), resid_mid (post_attn), resid_pre, attn_out, "
                          "mlp_out, pre_attn_norm_scale, pre_mlp_norm_scale, all; SITE=SPEC."),
        click.option("--dtype", "dtype", default="float16", show_default=True,
                     type=click.Choice(["float32", "float16", "bfloat16"]), help="Storage dtype."),
        click.option("--codec", default="auto", show_default=True,
                     type=click.Choice(["auto", "zstd", "blosc", "blosc-lz4", "none"]),
                     help="Chunk compression. auto: blosc-lz4 + bitshuffle for bfloat16/float32, none for float16 "
                          "(measured fastest at no larger size), zstd for small fields; on --resume, the store's own."),
        click.option("--chunk-samples", type=int, help="Samples per chunk (default: ~4 MiB per layer chunk)."),
        click.option("--max-episodes", type=int, help="Process at most this many episodes."),
        click.option("--max-steps", type=int, help="Process at most this many steps per episode."),
        click.option("--stride", default=1, show_default=True, help="Keep every N-th step of each episode."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run in an existing store."),
        click.option("--overwrite", is_flag=True, help="Replace an existing store."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _multi(values):
    return list(values) if values else None


@cli.command("extract", cls=PluginOptionsCommand, epilog=EXTRACT_EXAMPLES)
@store_argument
@click.option("--model", default="pi0", show_default=True, help="Model adapter (see `toolkit plugins --verbose`).")
@click.option("--dataset", default="libero", show_default=True, help="Dataset adapter (see `toolkit plugins`).")
@click.option("--checkpoint", help="Checkpoint path or hub id (default: a small random model, for smoke tests).")
@click.option("--data", help="Dataset path (default: the dataset adapter's embedded sample).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda, cuda:1.")
@click.option("--model-dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "float16", "bfloat16"]), help="dtype the model runs in.")
@click.option("--batch-size", default=1, show_default=True, help="Policy calls batched together.")
@click.option("--seed", default=0, show_default=True, help="Seed for random weights and sampling noise.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own Python code to run.")
@click.option("--allow-missing", is_flag=True,
              help="Run although the checkpoint lacks model weights (they stay random; their names are stored).")
@click.option("--random-weights", is_flag=True,
              help="Use the checkpoint's architecture with seeded random weights (a baseline; store says random_init).")
@click.option("--model-option", multiple=True, help="Adapter-specific KEY=VALUE option.")
@click.option("--dataset-option", multiple=True, help="Dataset-specific KEY=VALUE option.")
@click.option("--workers", default=0, show_default=True,
              help="Run on this many Ray actors, one model each (0: in this process); same store as one process.")
@click.option("--ray-address", help="Join a Ray cluster (auto, ray://host:port); default: a local one.")
@click.option("--gpus-per-worker", default=0.0, show_default=True, help="GPUs Ray reserves for each worker.")
@_selection_options
def extract_command(model, dataset, store, store_option, checkpoint, data, device, model_dtype, batch_size, seed,
                    trust_remote_code, allow_missing, random_weights, model_option, dataset_option, workers,
                    ray_address, gpus_per_worker, sites, layers, hooks, tokens, pool, streams, dtype, codec,
                    chunk_samples, max_episodes, max_steps, stride, resume, overwrite, no_progress, **plugin_flags):
    """Run a policy over a dataset and stream the chosen hidden states into the Zarr STORE
    (default stores/libero.zarr).

    For a closed-loop dataset (libero-sim: the policy acts in the simulator) --max-steps counts environment
    steps per episode and --stride keeps every N-th policy call (the policy runs at every call).
    `toolkit extract --model NAME --dataset NAME --help` also lists those adapters' options.
    """
    from toolkit.run.pipeline import extract

    store = pick_store(store, store_option, default=Path("stores/libero.zarr"))
    flags = plugin_option_values("extract", plugin_flags, store)
    path = extract(
        model=model, dataset=dataset, store=store, checkpoint=checkpoint, data=data, device=device,
        model_dtype=model_dtype, sites=split_csv(sites), layers=_multi(layers), hooks=_multi(hooks),
        tokens=_multi(tokens), pool=_multi(pool), streams=_multi(streams), dtype=dtype, codec=codec,
        batch_size=batch_size, seed=seed, max_episodes=max_episodes, max_steps=max_steps, stride=stride,
        chunk_samples=chunk_samples, resume=resume, overwrite=overwrite, progress=not no_progress,
        trust_remote_code=trust_remote_code, allow_missing=allow_missing, random_weights=random_weights,
        model_options={**flags["model"], **key_values(model_option, "--model-option")},
        dataset_options={**flags["dataset"], **key_values(dataset_option, "--dataset-option")},
        workers=workers, ray_address=ray_address, gpus_per_worker=gpus_per_worker,
    )
    click.echo(f"wrote {path}  (look inside: toolkit info {path})")


@cli.command("import", cls=PluginOptionsCommand, epilog="""
\b
Example:
  toolkit import stores/latents.zarr --dataset libero --data data/inference_latents --tokens vlm=text
""")
@store_argument
@click.option("--dataset", default="libero", show_default=True, help="Dataset adapter whose data carries latents.")
@click.option("--data", help="Dataset path (default: the adapter's embedded sample).")
@click.option("--dataset-option", multiple=True, help="Dataset-specific KEY=VALUE option.")
@_selection_options
def import_command(store, store_option, dataset, data, dataset_option, sites, layers, hooks, tokens, pool, streams,
                   dtype, codec, chunk_samples, max_episodes, max_steps, stride, resume, overwrite, no_progress,
                   **plugin_flags):
    """Store activations a dataset already carries (e.g. LIBERO latent pickles) in the new Zarr STORE,
    without running a model."""
    from toolkit.run.pipeline import import_latents

    store = pick_store(store, store_option)
    flags = plugin_option_values("import", plugin_flags, store)
    path = import_latents(
        dataset=dataset, store=store, data=data, sites=split_csv(sites), layers=_multi(layers), hooks=_multi(hooks),
        tokens=_multi(tokens), pool=_multi(pool), streams=_multi(streams), dtype=dtype, codec=codec,
        max_episodes=max_episodes, max_steps=max_steps, stride=stride, chunk_samples=chunk_samples,
        resume=resume, overwrite=overwrite, progress=not no_progress,
        dataset_options={**flags["dataset"], **key_values(dataset_option, "--dataset-option")},
    )
    click.echo(f"wrote {path}  (look inside: toolkit info {path})")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@cli.command("info")
@click.argument("store", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def info_command(store, as_json):
    """Summarise a store: provenance, samples, episodes, sites, streams, shapes and sizes."""
    from toolkit.sdk.names import format_indices
    from toolkit.store.core import open_store

    s = open_store(store, warn_incomplete=False).summary()  # its own line says INCOMPLETE
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    model = s.get("model") or {}
    ds = s.get("dataset") or {}
    click.echo(f"store     {s['path']}  ({'complete' if s['complete'] else 'INCOMPLETE: resume with --resume'})")
    click.echo(f"model     {model.get('name')}  checkpoint={model.get('checkpoint') or 'random init'}  "
               f"dtype={model.get('dtype', '-')}")
    opts = " ".join(f"{k}={v}" for k, v in (ds.get("options") or {}).items() if v is not None)
    click.echo(f"dataset   {ds.get('name')}  data={ds.get('data') or '(adapter default)'}" + (f"  {opts}" if opts else ""))
    click.echo(f"samples   {s['n_samples']}  episodes={s.get('n_episodes', 0)}  tasks={s.get('n_tasks', 0)}  "
               f"chunk={s['chunk_samples']} samples  codec={s['codec']}  toolkit {s['toolkit_version']}")
    click.echo("fields    " + ", ".join(f"{k}{tuple(v['shape'][1:]) or ''}" for k, v in s["fields"].items()))
    for site, info in s["sites"].items():
        layers = info["layers"]
        extra = f"  t={info['denoise_t']}" if "denoise_t" in info else ""
        click.echo(f"site {site:<9} expert={info.get('expert')}  layers={format_indices(layers)}{extra}")
        for stream, a in info["streams"].items():
            raw = 1
            for d in a["shape"]:
                raw *= d
            click.echo(f"  {stream:<20} {' x '.join(f'{n}={d}' for n, d in zip(a['dims'], a['shape']))}  "
                       f"{a['dtype']}  {_human_bytes(a['stored_bytes'])} on disk  ({a['codec']}, "
                       f"compression {a['compression_ratio']:.2f}x)")


# Commands that live in their own modules: (module, function, command name).
COMMAND_MODULES = [
    ("toolkit.cli.probe", "probe_command", "probe"),
    ("toolkit.cli.probe", "report_command", "report"),
    ("toolkit.cli.export", "export_command", "export"),
    ("toolkit.cli.verify", "verify_command", "verify"),
    ("toolkit.cli.analysis", "stats_command", "stats"),
    ("toolkit.cli.analysis", "compare_command", "compare"),
    ("toolkit.cli.analysis", "projection_command", "projection"),
    ("toolkit.cli.analysis", "dataset_stats_command", "dataset-stats"),
    ("toolkit.cli.intervene", "intervene_command", "intervene"),
    ("toolkit.analysis.separation", "separation_command", "separation"),
]


def _add_commands() -> None:
    import importlib

    for module, attr, name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        if hasattr(mod, attr):
            cli.add_command(getattr(mod, attr), name)


_add_commands()


def main() -> None:
    cli(prog_name="toolkit")
