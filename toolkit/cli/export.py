"""`toolkit export STORE --format npy|pt --out DIR [--visualize]` (wired into toolkit.cli.main as `export`)."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli.params import STORE, split_csv
from toolkit.analysis.export import FORMATS, export


@click.command("export", epilog="""
\b
Examples:
  toolkit export stores/openvla.zarr --format npy --out embeddings/
  toolkit export stores/openvla.zarr --format pt --out emb_pt/ --site llm --stream resid_post --layers 0,-1 --visualize
""")
@click.argument("store", type=STORE)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder to create: OUT/<episode>/step_NNNN/<site>.layers.<L>.<stream>.<format> + step_metadata.json.")
@click.option("--format", "fmt", default="npy", show_default=True, type=click.Choice(FORMATS), help="File format.")
@click.option("--site", "--sites", "site", multiple=True, help="Sites to export (default: all).")
@click.option("--stream", "--streams", "stream", multiple=True,
              help="Streams to export, e.g. resid_post,resid_pre (default: all).")
@click.option("--layer", "--layers", "layers",
              help="Layers to export: all | 0,5,-1 | 3- (stored layer numbers; -1 = the last stored).")
@click.option("--hook", "hooks", multiple=True,
              help="Instead of --site/--stream/--layer: hook names, e.g. 'llm.layers.*.resid_post'; repeat for more.")
@click.option("--visualize", is_flag=True, help="Also write PCA plots per step and per episode (PNG).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def export_command(store, out, fmt, site, stream, layers, hooks, visualize, overwrite):
    """Write a store's activations as one file per step, layer and stream (the OpenVLA cache script's layout)."""
    path = export(store, out, format=fmt, sites=split_csv(site), streams=split_csv(stream), layers=layers,
                  visualize=visualize, overwrite=overwrite, hooks=list(hooks) or None)
    click.echo(f"exported {path}")
