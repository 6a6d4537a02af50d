"""`toolkit stats`, `toolkit compare`, `toolkit projection` and `toolkit dataset-stats` (no model needed)."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import click
import numpy as np

from toolkit.sdk.options import key_values
from toolkit.sdk.errors import ToolkitError
from toolkit.cli.params import STORE
from toolkit.store.location import store_name

STATS_EXAMPLES = """
\b
Examples:
  toolkit stats stores/robovlms.zarr                       # the store's first site (context), every layer
  toolkit stats stores/robovlms.zarr --site text --layer 23 --json
  toolkit stats stores/libero.zarr --hook 'vlm.layers.-4-.resid_post'   # the last four stored vlm layers
  toolkit stats stores/robovlms.zarr --out reports/ctx     # stats.json + stats.md (+ per-feature arrays)
"""
COMPARE_EXAMPLES = """
\b
Examples:
  toolkit compare stores/kosmos_ph.zarr stores/finetuned.zarr --site context --out reports/ctx_compare
  toolkit compare A.zarr B.zarr --site text --layer 23 --bins 128 --exact-samples 2000
"""
PROJECTION_EXAMPLES = """
\b
Examples:
  toolkit projection stores/robovlms.zarr --method pca --color task
  toolkit projection stores/robovlms.zarr --site text --layer -1 --method tsne --color episode --out proj.png
  toolkit projection stores/pi0.zarr --site action --layer 8 --denoise -1    # the last denoising step only
"""
DATASET_EXAMPLES = """
\b
Examples:
  toolkit dataset-stats --dataset h5 --data data/mobile_vla
  toolkit dataset-stats --dataset h5 --data data/mobile_vla --dataset-option stratify_by=direction \\
      --dataset-option max_episodes=100 --dataset-option frames_per_episode=5 --json
"""


HOOK_HELP = "Instead of --site/--stream/--layer: one hook name, e.g. vlm.layers.-1.resid_post (globs allowed)."


def _layers(values: tuple[str, ...]) -> str | None:
    return ",".join(values) if values else None


def _from_hook(store: Path, hook: str | None, site: str | None, stream: str | None, layers: str | None):
    """``--hook NAME`` as the (site, stream, layers) of a command that reads one site and stream."""
    if hook is None:
        return site, stream, layers
    if site or stream or layers:
        raise ToolkitError("give either --hook or --site/--stream/--layer, not both")
    from toolkit.sdk.names import store_hook
    from toolkit.store.reader import open_store

    site, stream, picked = store_hook(open_store(store), hook)
    return site, stream, ",".join(map(str, picked))


def _read_options(f):
    """The selection options of the commands that read one site and stream of a store (stats, compare)."""
    for option in reversed([
        click.option("--site", "--sites", "site", help="Capture site (default: the (first) store's first site)."),
        click.option("--stream", "--streams", "stream", help="Stream (default resid_post, else the site's first)."),
        click.option("--layer", "--layers", "layers", multiple=True,
                     help="Layers: all (default) | 0,5 | 0-5 | 3- | -1 (the last stored)."),
        click.option("--hook", help=HOOK_HELP),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar (shown on a terminal)."),
        click.option("--scheduler", help="Reduce chunk by chunk on Dask: threads | processes | tcp://HOST:PORT "
                                         "(default: in this process)."),
    ]):
        f = option(f)
    return f


def _write(out: Path, name: str, text: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text)
    return out / name


# --------------------------------------------------------------------------- stats


@click.command(epilog=STATS_EXAMPLES)
@click.argument("store", type=STORE)
@_read_options
@click.option("--dead-eps", default=1e-6, show_default=True, help="|x| at or below this counts as zero.")
@click.option("--outlier-z", default=6.0, show_default=True, help="Robust z-score (median/MAD) of an outlier feature.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the Markdown report.")
@click.option("--out", type=click.Path(path_type=Path), help="Write stats.json, stats.md and features.npz here.")
def stats_command(store, site, stream, layers, hook, no_progress, scheduler, dead_eps, outlier_z, as_json, out):
    """Shape, dtype, global and per-feature mean/std/min/max, dead/constant/outlier features of a site."""
    from toolkit.analysis.stats import stats_markdown, store_stats

    site, stream, layers = _from_hook(store, hook, site, stream, _layers(layers))
    rep = store_stats(str(store), site, stream, layers, progress=False if no_progress else None,
                      dead_eps=dead_eps, outlier_z=outlier_z, per_feature=out is not None, scheduler=scheduler)
    features = {k: v.pop("features") for k, v in rep["layers"].items() if "features" in v}
    md = stats_markdown(rep)
    if out is not None:
        _write(out, "stats.json", json.dumps(rep, indent=2))
        _write(out, "stats.md", md)
        np.savez(out / "features.npz", **{f"layer{k}_{n}": np.asarray(v) for k, f in features.items()
                                           for n, v in f.items()})
    click.echo(json.dumps(rep, indent=2) if as_json else md)
    if out is not None:
        click.echo(f"wrote {out}/stats.json, stats.md, features.npz", err=True)


# --------------------------------------------------------------------------- compare


@click.command(epilog=COMPARE_EXAMPLES)
@click.argument("store_a", type=STORE)
@click.argument("store_b", type=STORE)
@_read_options
@click.option("--bins", default=64, show_default=True, help="Histogram bins for KL and Wasserstein.")
@click.option("--exact-samples", default=0, show_default=True,
              help="Also compute per-feature Wasserstein with scipy on this many sampled rows per store.")
@click.option("--seed", default=0, show_default=True, help="Seed of the row sampling.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Report folder (default reports/compare_<A>_vs_<B>): compare.json, compare.md, figures.")
@click.option("--no-figures", is_flag=True, help="Skip the figures.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the Markdown report.")
def compare_command(store_a, store_b, site, stream, layers, hook, no_progress, scheduler, bins, exact_samples, seed,
                    out, no_figures, as_json):
    """Compare one site of two stores: KL, Wasserstein, mean/std shifts, dead-neuron overlap, figures."""
    from toolkit.analysis.stats import compare_figures, compare_markdown, compare_stores, strip_arrays

    if bins < 2:
        raise ToolkitError(f"--bins must be at least 2, got {bins}")
    site, stream, layers = _from_hook(store_a, hook, site, stream, _layers(layers))
    rep = compare_stores(str(store_a), str(store_b), site, stream, layers, bins=bins,
                         exact_samples=exact_samples, seed=seed, progress=False if no_progress else None,
                         scheduler=scheduler)
    out = out or Path("reports") / f"compare_{store_name(store_a)}_vs_{store_name(store_b)}"
    out.mkdir(parents=True, exist_ok=True)
    figures = {} if no_figures else compare_figures(rep, out)
    data = strip_arrays(rep)
    data["figures"] = figures
    md = compare_markdown(rep, figures)
    _write(out, "compare.json", json.dumps(data, indent=2))
    _write(out, "compare.md", md)
    click.echo(json.dumps(data, indent=2) if as_json else md)
    click.echo(f"wrote {out}/compare.json, compare.md" + ("" if no_figures else " and figures"), err=True)


# --------------------------------------------------------------------------- projection


@click.command(epilog=PROJECTION_EXAMPLES)
@click.argument("store", type=STORE)
@click.option("--site", "--sites", "site", help="Capture site (default: the store's first site).")
@click.option("--stream", "--streams", "stream", help="Stream (default resid_post, else the site's first).")
@click.option("--layer", "--layers", "layer", help="One layer (default -1: the last stored).")
@click.option("--hook", help=HOOK_HELP)
@click.option("--method", type=click.Choice(["pca", "tsne", "umap"]), default="pca", show_default=True,
              help="umap needs umap-learn (pip install 'toolkit[umap]').")
@click.option("--color", type=click.Choice(["task", "episode", "success"]), default="task", show_default=True)
@click.option("--max-samples", default=5000, show_default=True, help="Seeded subset of samples to project.")
@click.option("--denoise", default=None, help="Action expert: one denoising step (index; -1 the last) instead of "
                                              "the mean over them.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Figure path (default reports/projection_<store>_<method>.png).")
def projection_command(store, site, stream, layer, hook, method, color, max_samples, denoise, seed, out):
    """2-D projection (PCA, t-SNE, UMAP) of one vector per sample (mean over its stored tokens)."""
    from toolkit.analysis.figures import pyplot, save_figure
    from toolkit.sdk.names import store_layers, store_site_stream
    from toolkit.analysis.stats import project, sample_vectors
    from toolkit.store.reader import open_store

    if method == "umap":
        import importlib.util

        if importlib.util.find_spec("umap") is None:
            raise ToolkitError("--method umap needs umap-learn, which is not installed: pip install 'toolkit[umap]' "
                               "(or use --method pca or tsne)")
    site, stream, layer = _from_hook(store, hook, site, stream, layer)
    s = open_store(store)
    site, stream = store_site_stream(s, site, stream)
    picked = store_layers(s, site, "-1" if layer in (None, "last") else layer)
    if len(picked) != 1:
        raise ToolkitError(f"--layer {layer!r} selects {len(picked)} layers; a projection takes one (e.g. -1)")
    chosen = picked[0]
    step, at = _denoise_step(s, site, stream, denoise)
    idx, x = sample_vectors(s, site, stream, chosen, max_samples, seed, denoise=step)
    y = project(x, method, seed)
    labels = s.coord(color)[idx]
    out = out or Path("reports") / f"projection_{store_name(store)}_{site}_{method}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    values = [str(v) for v in labels]
    groups = sorted(set(values), key=lambda v: (len(v), v))
    cmap = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")
    for k, g in enumerate(groups):
        m = np.array([v == g for v in values])
        ax.scatter(y[m, 0], y[m, 1], s=12, alpha=0.8, color=cmap(k % cmap.N),
                   label=g[:40] if len(groups) <= 20 else None)
    if len(groups) <= 20:
        ax.legend(fontsize=7, markerscale=1.5, loc="best")
    ax.set_title(f"{site}/{stream} layer {chosen}{at}: {method.upper()} by {color} ({len(y)} samples)")
    save_figure(fig, out, dpi=120)
    np.savez(out.with_suffix(".npz"), sample=idx, xy=y, label=np.array(values))
    click.echo(f"wrote {out} and {out.with_suffix('.npz')}  ({site}/{stream} layer {chosen}, {len(y)} samples, "
               f"{len(groups)} {color} groups)")


def _denoise_step(store: Any, site: str, stream: str, spec: str | None) -> tuple[int | None, str]:
    """--denoise: the position of one denoising step along the site's denoise axis, and a label naming its t."""
    if spec is None:
        return None, ""
    from toolkit.sdk.names import resolve_indices

    dims = tuple(store.array(site, stream).metadata.dimension_names or ())
    if "denoise" not in dims:
        raise ToolkitError(f"site {site!r} has no denoising steps (dims {', '.join(dims)}); drop --denoise")
    picked = resolve_indices(spec, store.array(site, stream).shape[dims.index("denoise")], "denoising step",
                             where=f"at site {site!r}")
    if len(picked) != 1:
        raise ToolkitError(f"--denoise {spec!r} selects {len(picked)} denoising steps; a projection takes one (e.g. -1)")
    t = store.static(f"{site}/t")[picked[0]] if f"{site}/t" in store.root else None
    return picked[0], f" denoise {picked[0]}" + ("" if t is None else f" (t={float(t):g})")


# --------------------------------------------------------------------------- dataset-stats


def dataset_summary(ds: Any) -> dict[str, Any]:
    """A dataset adapter's own ``summary()`` if it has one, else episodes by task and their step counts."""
    if hasattr(ds, "summary"):
        return ds.summary()
    tasks: Counter = Counter()
    instructions: Counter = Counter()
    steps = []
    for ep in ds.episodes():
        tasks[ep.task] += 1
        instructions[ep.instruction] += 1
        steps.append(ep.n_steps if ep.n_steps is not None else sum(1 for _ in ep.steps()))
    s = np.array(steps or [0])
    return {"dataset": ds.name, "data": ds.data, "n_episodes": len(steps),
            "frames": {"total": int(s.sum()), "min": int(s.min()), "max": int(s.max()), "mean": round(float(s.mean()), 3)},
            "by_task": dict(sorted(tasks.items())), "instructions": dict(instructions.most_common())}


# The keys `dataset_summary` itself writes (the header); every other key a dataset's ``summary()`` returns is
# printed generically, so a new dataset adapter needs no change here.
HEADER_KEYS = ("dataset", "data", "n_episodes", "n_bad_files", "frames")


def _title(key: str) -> str:
    words = key.replace("_", " ")
    return f"episodes {words}" if key.startswith("by_") else words


def _section(title: str, value: Any, indent: str = "") -> list[str]:
    """One summary entry: a scalar on one line, a dict as an aligned table (nested dicts indented), a list as rows."""
    if isinstance(value, dict):
        if not value:
            return []
        width = max(len(str(k)) for k in value)
        lines = ["", f"{indent}{title}:"] if not indent else [f"{indent}{title}:"]
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines += _section(_title(str(k)), v, indent + "  ")
            else:
                lines.append(f"{indent}  {str(k):<{width}}  {v}")
        return lines
    if isinstance(value, list):
        return ["", f"{indent}{title}:", *(f"{indent}  {v}" for v in value)] if value else []
    return [f"{indent}{title}: {value}"]


def summary_text(rep: dict[str, Any]) -> str:
    f = rep.get("frames", {})
    lines = [f"dataset {rep.get('dataset')} at {rep.get('data')}: {rep.get('n_episodes')} episodes"
             + (f" ({rep['n_bad_files']} bad files skipped)" if rep.get("n_bad_files") else ""),
             f"frames: total {f.get('total')}, per episode min {f.get('min')} / mean {f.get('mean')} / max {f.get('max')}"]
    for key, value in rep.items():
        if key not in HEADER_KEYS and value is not None:
            lines += _section(_title(key), value)
    return "\n".join(lines)


@click.command(epilog=DATASET_EXAMPLES)
@click.option("--dataset", default="h5", show_default=True, help="Dataset adapter (see `toolkit plugins`).")
@click.option("--data", help="Dataset path.")
@click.option("--dataset-option", multiple=True, help="Dataset-specific KEY=VALUE option.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--out", type=click.Path(path_type=Path), help="Also write the JSON summary to this file.")
def dataset_stats_command(dataset, data, dataset_option, as_json, out):
    """Summarise a dataset without any model: episodes by type, frames, instructions, sampling plan."""
    from toolkit.sdk.plugins import get_dataset

    ds = get_dataset(dataset)(data, **key_values(dataset_option, "--dataset-option"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = dataset_summary(ds)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=2))
    click.echo(json.dumps(rep, indent=2) if as_json else summary_text(rep))


@click.command(epilog="""
\b
Examples:
  toolkit separation stores/pi0_libero.zarr                      # every VLM site vs the action expert
  toolkit separation stores/pi0_libero.zarr --vlm-site text_only --layers 0,8,17 --out reports/separation
  toolkit separation stores/pi0_libero.zarr --measure all       # the raw cosine and L2 beside the centred ones
""")
@click.argument("store", type=STORE)
@click.option("--vlm-site", "vlm_sites", multiple=True, help="VLM-expert site(s) (default: every site without a "
                                                             "denoising axis).")
@click.option("--action-site", "action_sites", multiple=True, help="Action-expert site(s) (default: sites with one).")
@click.option("--layers", default=None, help="Layers (the spec grammar: all, 0,8,17, -1); default every matched one.")
@click.option("--stream", default="resid_post", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), help="Folder (default reports/separation_<store>).")
@click.option("--measure", type=click.Choice(["centred", "raw", "all"]), default="centred", show_default=True,
              help="centred: linear CKA and the cosine after subtracting each expert's mean; raw: cosine and L2 of "
                   "the stored vectors, which a constant offset (a bias, a norm's shift) makes look alike with no "
                   "shared structure; all: both.")
@click.option("--no-figures", is_flag=True)
def separation_command(store, vlm_sites, action_sites, layers, stream, out, measure, no_figures):
    """Expert separation: linear CKA and centred cosine (raw cosine and L2 with --measure) between the VLM and the
    action expert at matched layers, per token span and denoising step, streamed over a store."""
    from toolkit.analysis.separation import expert_separation, measure_note, save, summary_lines

    rows = expert_separation(store, list(vlm_sites) or None, list(action_sites) or None, layers, stream, measure)
    out = out or Path("reports") / f"separation_{store_name(store)}"
    figs = save(rows, out, str(store), figures=not no_figures, measure=measure)
    click.echo(measure_note(measure))
    for line in summary_lines(rows, measure):
        click.echo(line)
    click.echo(f"wrote {out / 'separation.csv'} ({len(rows)} rows) and {len(figs)} figures")
