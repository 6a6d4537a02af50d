"""The `toolkit` command line: plugins, extract, import, info (and probe/report when installed)."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import click

from toolkit.cli_options import key_values
from toolkit.errors import ToolkitError

EXTRACT_EXAMPLES = """
\b
Examples:
  toolkit extract --model pi0 --dataset libero --store stores/libero.zarr
  toolkit extract --model pi0 --dataset libero --data data/inference_latents \\
      --checkpoint lerobot/pi0 --device cuda --model-dtype bfloat16 \\
      --sites vlm,action --layers all --layers action=0,8,17 --tokens vlm=text --pool mean \\
      --store stores/pi0_libero.zarr
  toolkit extract ... --resume      # continue a run that was interrupted
"""


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


class ToolkitGroup(click.Group):
    """Turns ToolkitError into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ToolkitError as e:
            _fail(e)


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="toolkit")
@click.option("-v", "--verbose", is_flag=True, help="Log debug information.")
def cli(verbose: bool) -> None:
    """Look inside Vision-Language-Action robot policies: capture hidden states into Zarr stores, probe them.

    \b
    toolkit plugins                                          what models and datasets are installed
    toolkit extract --model pi0 --dataset libero --store stores/libero.zarr
    toolkit info stores/libero.zarr                          what a store holds
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(as_json: bool) -> None:
    """List model adapters, dataset adapters and probe targets, and the plugin providing each."""
    from toolkit.plugins import registry

    reg = registry()
    if as_json:
        click.echo(json.dumps({kind: [{"name": r.name, "plugin": r.plugin, "description": r.description}
                                      for r in entries.values()] for kind, entries in reg.items()}, indent=2))
        return
    for kind, entries in reg.items():
        click.echo(f"{kind}s:")
        if not entries:
            click.echo("  (none)")
        for r in sorted(entries.values(), key=lambda r: r.name):
            click.echo(f"  {r.name:<14} {r.description}  [{r.plugin}]")


def _selection_options(f):
    opts = [
        click.option("--sites", help="Comma-separated capture sites (default: all of the model's sites)."),
        click.option("--layers", multiple=True, help="Layers: all | 0,5,17 | 0-5 | -1; SITE=SPEC for one site."),
        click.option("--tokens", multiple=True,
                     help="Tokens: all | last | span (image, text, state, actions, ...) | 0,5,-1; SITE=SPEC."),
        click.option("--pool", multiple=True, help="Pooling over the kept tokens: none | mean | last; SITE=SPEC."),
        click.option("--streams", multiple=True,
                     help="Streams: resid_post (hidden_states), resid_mid (post_attn), resid_pre, attn_out, "
                          "mlp_out, pre_attn_norm_scale, pre_mlp_norm_scale, all; SITE=SPEC."),
        click.option("--dtype", "dtype", default="float16", show_default=True,
                     type=click.Choice(["float32", "float16", "bfloat16"]), help="Storage dtype."),
        click.option("--codec", default="zstd", show_default=True, type=click.Choice(["zstd", "blosc", "none"]),
                     help="Chunk compression."),
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


@cli.command("extract", epilog=EXTRACT_EXAMPLES)
@click.option("--model", default="pi0", show_default=True, help="Model adapter (see `toolkit plugins`).")
@click.option("--dataset", default="libero", show_default=True, help="Dataset adapter (see `toolkit plugins`).")
@click.option("--store", default="stores/libero.zarr", show_default=True, type=click.Path(path_type=Path),
              help="Zarr store to create.")
@click.option("--checkpoint", help="Checkpoint path or hub id (default: a small random model, for smoke tests).")
@click.option("--data", help="Dataset path (default: the dataset adapter's embedded sample).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda, cuda:1.")
@click.option("--model-dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "float16", "bfloat16"]), help="dtype the model runs in.")
@click.option("--batch-size", default=1, show_default=True, help="Policy calls batched together.")
@click.option("--seed", default=0, show_default=True, help="Seed for random weights and sampling noise.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own Python code to run.")
@click.option("--model-option", multiple=True, help="Adapter-specific KEY=VALUE option.")
@click.option("--dataset-option", multiple=True, help="Dataset-specific KEY=VALUE option.")
@click.option("--suite", help="Simulator datasets (libero-sim): LIBERO suite, e.g. libero_object "
                              "(= --dataset-option suite=...).")
@click.option("--tasks", help="Task ids, e.g. 0-4 or 0,2 (= --dataset-option tasks=...).")
@click.option("--trials", type=int, help="libero-sim: episodes per task, trial i from init state i.")
@click.option("--replan-steps", type=int, help="libero-sim: actions of each chunk executed before the next call.")
@click.option("--save-video", is_flag=True, help="libero-sim: one MP4 per episode in STORE's stem + '_videos/'.")
@_selection_options
def extract_command(model, dataset, store, checkpoint, data, device, model_dtype, batch_size, seed, trust_remote_code,
                    model_option, dataset_option, suite, tasks, trials, replan_steps, save_video, sites, layers,
                    tokens, pool, streams, dtype, codec, chunk_samples, max_episodes, max_steps, stride, resume,
                    overwrite, no_progress):
    """Run a policy over a dataset and stream the chosen hidden states into a Zarr store.

    For a closed-loop dataset (libero-sim: the policy acts in the simulator) --max-steps counts environment
    steps per episode and --stride keeps every N-th policy call (the policy runs at every call).
    """
    from toolkit.extract import extract

    # first-class shorthands for dataset options
    shorthand = {"suite": suite, "tasks": tasks, "trials": trials, "replan_steps": replan_steps,
                 "video_dir": str(store.parent / f"{store.name.removesuffix('.zarr')}_videos") if save_video else None}
    dataset_options = {k: v for k, v in shorthand.items() if v is not None}
    dataset_options.update(key_values(dataset_option, "--dataset-option"))

    path = extract(
        model=model, dataset=dataset, store=store, checkpoint=checkpoint, data=data, device=device,
        model_dtype=model_dtype, sites=sites.split(",") if sites else None, layers=_multi(layers),
        tokens=_multi(tokens), pool=_multi(pool), streams=_multi(streams), dtype=dtype, codec=codec,
        batch_size=batch_size, seed=seed, max_episodes=max_episodes, max_steps=max_steps, stride=stride,
        chunk_samples=chunk_samples, resume=resume, overwrite=overwrite, progress=not no_progress,
        trust_remote_code=trust_remote_code, model_options=key_values(model_option, "--model-option"),
        dataset_options=dataset_options,
    )
    click.echo(f"wrote {path}  (look inside: toolkit info {path})")


@cli.command("import", epilog="""
\b
Example:
  toolkit import --dataset libero --data data/inference_latents --store stores/latents.zarr --tokens vlm=text
""")
@click.option("--dataset", default="libero", show_default=True, help="Dataset adapter whose data carries latents.")
@click.option("--data", help="Dataset path (default: the adapter's embedded sample).")
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Zarr store to create.")
@click.option("--dataset-option", multiple=True, help="Dataset-specific KEY=VALUE option.")
@_selection_options
def import_command(dataset, data, store, dataset_option, sites, layers, tokens, pool, streams, dtype, codec,
                   chunk_samples, max_episodes, max_steps, stride, resume, overwrite, no_progress):
    """Store activations a dataset already carries (e.g. LIBERO latent pickles) without running a model."""
    from toolkit.extract import import_latents

    path = import_latents(
        dataset=dataset, store=store, data=data, sites=sites.split(",") if sites else None, layers=_multi(layers),
        tokens=_multi(tokens), pool=_multi(pool), streams=_multi(streams), dtype=dtype, codec=codec,
        max_episodes=max_episodes, max_steps=max_steps, stride=stride, chunk_samples=chunk_samples,
        resume=resume, overwrite=overwrite, progress=not no_progress,
        dataset_options=key_values(dataset_option, "--dataset-option"),
    )
    click.echo(f"wrote {path}  (look inside: toolkit info {path})")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@cli.command("info")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def info_command(store, as_json):
    """Summarise a store: provenance, samples, episodes, sites, streams, shapes and sizes."""
    from toolkit.store import open_store

    s = open_store(store).summary()
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
        click.echo(f"site {site:<9} expert={info.get('expert')}  layers={_compact(layers)}{extra}")
        for stream, a in info["streams"].items():
            raw = 1
            for d in a["shape"]:
                raw *= d
            click.echo(f"  {stream:<20} {' x '.join(f'{n}={d}' for n, d in zip(a['dims'], a['shape']))}  "
                       f"{a['dtype']}  {_human_bytes(a['stored_bytes'])} on disk")


def _compact(values: list[int]) -> str:
    if values and values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{values[0]}-{values[-1]}"
    return ",".join(map(str, values))


# Commands that live in their own modules: (module, function, command name).
COMMAND_MODULES = [
    ("toolkit.probe_cli", "probe_command", "probe"),
    ("toolkit.probe_cli", "report_command", "report"),
    ("toolkit.export_cli", "export_command", "export"),
    ("toolkit.analysis_cli", "stats_command", "stats"),
    ("toolkit.analysis_cli", "compare_command", "compare"),
    ("toolkit.analysis_cli", "projection_command", "projection"),
    ("toolkit.analysis_cli", "dataset_stats_command", "dataset-stats"),
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
