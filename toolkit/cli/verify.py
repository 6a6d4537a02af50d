"""`toolkit verify STORE [--json] [--repair]` (wired into toolkit.cli.main as `verify`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from toolkit.store.location import STORE


@click.command("verify", epilog="""
\b
Examples:
  toolkit verify stores/libero.zarr             # every committed chunk: present, whole, checksum matches
  toolkit verify stores/libero.zarr --json
  toolkit verify stores/libero.zarr --repair    # re-extract from the first bad chunk on (data and model at hand)
""")
@click.argument("store", type=STORE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--repair", is_flag=True, help="Re-extract the samples from the first bad chunk on, with the run "
                                             "recorded in the store (needs its data and model).")
@click.option("--trust-remote-code", is_flag=True, help="With --repair: allow the checkpoint's own Python code.")
def verify_command(store, as_json, repair, trust_remote_code):
    """Check that every committed chunk of a store is present and intact; exit 1 if any is not."""
    from toolkit.store.verify import repair as do_repair
    from toolkit.store.verify import summary_line, verify

    report = verify(store)
    if repair and report["bad"]:
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
