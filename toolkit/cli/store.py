"""`toolkit info` and `toolkit verify`: what a store holds, from its own metadata, and whether every committed
chunk is intact (no model, no torch; `verify --repair` reruns the store's recorded run)."""

from __future__ import annotations

import json
import sys

import click

from toolkit.cli.params import STORE


@click.command("info")
@click.argument("store", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def info_command(store, as_json):
    """Summarise a store: provenance, samples, episodes, sites, streams, shapes and sizes."""
    from toolkit.sdk.names import format_indices
    from toolkit.store.reader import human_bytes, open_store

    opened = open_store(store, warn_incomplete=False)  # its own line says INCOMPLETE
    s = opened.summary()
    weights = opened.weights  # random, loaded from a checkpoint, or imported: the one answer (store/reader.py)
    s["weights"] = weights.to_dict()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    model = s.get("model") or {}
    ds = s.get("dataset") or {}
    click.echo(f"store     {s['path']}  ({'complete' if s['complete'] else 'INCOMPLETE: resume with --resume'})")
    ckpt = weights.checkpoint or ("random init" if weights.random else "none")
    click.echo(f"model     {model.get('name')}  checkpoint={ckpt}  dtype={model.get('dtype', '-')}")
    click.echo(f"weights   {weights}")
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
                       f"{a['dtype']}  {human_bytes(a['stored_bytes'])} on disk  ({a['codec']}, "
                       f"compression {a['compression_ratio']:.2f}x)")


@click.command("verify", epilog="""
\b
Examples:
  toolkit verify stores/libero.zarr             # metadata, and every committed chunk: present, whole, checksum right
  toolkit verify stores/libero.zarr --quick     # metadata, and every committed chunk present (contents not read)
  toolkit verify stores/libero.zarr --json
  toolkit verify stores/libero.zarr --repair    # re-extract from the first bad chunk on (data and model at hand)
""")
@click.argument("store", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--quick", is_flag=True, help="Check the metadata and that every committed chunk exists with a "
                                            "plausible size, without reading, decoding or checksumming chunks.")
@click.option("--repair", is_flag=True, help="Re-extract the samples from the first bad chunk on, with the run "
                                             "recorded in the store (needs its data and model; the store is left "
                                             "unchanged when they do not give its samples).")
@click.option("--trust-remote-code", is_flag=True, help="With --repair: allow the checkpoint's own Python code.")
def verify_command(store, as_json, quick, repair, trust_remote_code):
    """Check a store's metadata and that every committed chunk is present and intact; exit 1 if anything is
    not (2 if it cannot be opened at all)."""
    from toolkit.sdk.errors import ToolkitError
    from toolkit.store.verify import summary_line, verify

    if quick and repair:
        raise ToolkitError("--quick and --repair exclude each other: a repair needs the full check (drop --quick)")
    report = verify(store, quick=quick)
    if repair and report["bad"]:
        from toolkit.run.repair import repair as do_repair

        start = do_repair(store, report, trust_remote_code=trust_remote_code)
        before = report
        report = verify(store)
        report["repaired"] = {"from_sample": start, "bad_before": before["bad"]}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for b in (report.get("repaired") or {}).get("bad_before", []):
            click.echo(f"repaired {b['chunk']}: {b['problem']}")
        for b in report["bad"]:
            where = f" (samples {b['samples'][0]}-{b['samples'][1]})" if b["samples"] else ""
            click.echo(f"bad {b['chunk']}{where}: {b['problem']}")
        click.echo(summary_line(report))
    if report["bad"]:
        sys.exit(1)
