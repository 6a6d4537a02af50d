"""`toolkit intervene`: run a policy with and without an intervention on a named stream and measure the effect.
Its flags come from ``InterveneSpec`` (the run specification, extended)."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli.params import spec_params, spec_values
from toolkit.run.spec import INTERVENE

INTERVENE_EXAMPLES = """
\b
Examples:
  # steer towards a probe's class at the probe's own layer, three strengths (open loop)
  toolkit intervene --model pi0 --dataset libero --out results/steer \\
      --direction results/probe --class "pick up the ketchup" --alpha 0,2,4,8
  # remove the probe's directions (all classes); re-test the same probe and retrain one (amnesic check)
  toolkit intervene --model pi0 --dataset libero --out results/ablate --direction results/probe --op ablate
  # remove the probe's concept completely: a LEACE eraser fitted on the probe's store (or --erasure inlp)
  toolkit intervene --model pi0 --dataset libero --out results/erase --direction results/probe --op erase
  # closed loop in the simulator, a mean-difference direction, two layers
  toolkit intervene --model pi0 --dataset libero-sim --dataset-option tasks=0 --dataset-option trials=5 \\
      --hook "vlm.layers.4,8.resid_post" --between task=3 task=5 --alpha 0,1,2 --out results/sim
  # clamp FFN neurons of one layer
  toolkit intervene --model pi0 --dataset libero --hook vlm.layers.6.mlp_act --op clamp --units 12,40 \\
      --value 5 --out results/clamp
"""


def _spec_class():
    from toolkit.run.intervene import InterveneSpec

    return InterveneSpec


class _InterveneCommand(click.Command):
    """Its options are the ``InterveneSpec`` fields, attached when the command is first used (the spec lives
    with the runner, which imports the analysis; ``toolkit --help`` stays light)."""

    def get_params(self, ctx):
        if not getattr(self, "_spec_params", False):
            self._spec_params = True
            self.params = spec_params(_spec_class(), INTERVENE) + self.params
        return super().get_params(ctx)


@click.command(cls=_InterveneCommand, epilog=INTERVENE_EXAMPLES)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for stores/, effects.csv/json, figures and report.md.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run in --out.")
@click.option("--no-figures", is_flag=True)
@click.option("--no-progress", is_flag=True)
def intervene_command(out, overwrite, no_figures, no_progress, **values):
    """Intervene on a named stream (add, ablate, erase, clamp, zero, mean) and measure the effect on actions,
    success and the probe, each run paired with the unmodified one (same seed, same inputs or init states)."""
    from toolkit.run.intervene import intervene

    spec = _spec_class().build(**spec_values(_spec_class(), values))
    run = intervene(spec, out, overwrite=overwrite, progress=not no_progress, figures=not no_figures)
    click.echo(f"wrote {out / 'effects.csv'}, {out / 'report.md'} and {len(run.figures)} figures "
               f"({len(run.conditions)} conditions vs the unmodified run in {run.baseline})")
    for r in run.rows:
        if r["metric"] == "probe_accuracy_retrained" and r.get("note"):
            click.echo(f"ablation check, {r['condition']}: {r['note']}")
