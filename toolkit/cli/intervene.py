"""`toolkit intervene`: run a policy with and without an intervention on a named stream and measure the effect."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.sdk.options import key_values
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import IndexSpec

INTERVENE_EXAMPLES = """
\b
Examples:
  # steer towards a probe's class at the probe's own layer, three strengths (open loop)
  toolkit intervene --model pi0 --dataset libero --out results/steer \\
      --direction results/probe --class "pick up the ketchup" --alpha 0,2,4,8
  # remove the probe's directions (all classes) and re-test the same probe on the intervened activations
  toolkit intervene --model pi0 --dataset libero --out results/ablate --direction results/probe --op ablate
  # closed loop in the simulator, a mean-difference direction, two layers
  toolkit intervene --model pi0 --dataset libero-sim --dataset-option tasks=0 --dataset-option trials=5 \\
      --hook "vlm.layers.4,8.resid_post" --between task=3 task=5 --alpha 0,1,2 --out results/sim
  # clamp FFN neurons of one layer
  toolkit intervene --model pi0 --dataset libero --hook vlm.layers.6.mlp_act --op clamp --units 12,40 \\
      --value 5 --out results/clamp
"""


def _floats(values: tuple[str, ...]) -> list[float]:
    try:
        return [float(v) for item in values for v in item.split(",") if v.strip()]
    except ValueError:
        raise ToolkitError(f"--alpha takes numbers (comma lists allowed), got {' '.join(values)!r}") from None


def _ints(text: str | None, option: str) -> list[int] | None:
    """Indices in the toolkit's one selection grammar (``toolkit.sdk.names``: 12,40 or 0-5), checked against what
    exists once the model is known; negative and open-ended ones need that count, so they are refused here.
    None: not given, or ``all``."""
    chosen = IndexSpec.parse(text, option).literal()
    return None if chosen is None else sorted(chosen)


@click.command(epilog=INTERVENE_EXAMPLES)
@click.option("--model", default="pi0", show_default=True, help="Model adapter.")
@click.option("--dataset", default="libero", show_default=True, help="Dataset adapter (libero-sim: closed loop).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for stores/, effects.csv/json, figures and report.md.")
@click.option("--hook", "hooks", multiple=True,
              help="Where: SITE.layers.LAYERS.STREAM, e.g. text_only.layers.3.resid_post; layer lists sweep "
                   "(vlm.layers.2,4.resid_post). Default: the probe's own hook.")
@click.option("--op", type=click.Choice(["add", "ablate", "clamp", "zero", "mean"]), default="add", show_default=True,
              help="add alpha·d | ablate (project d out) | clamp units | zero | mean (the unmodified run's mean).")
@click.option("--direction", help="A probe results folder (DIR or DIR:ID, from `toolkit probe --out`) or a .npy file.")
@click.option("--class", "probe_class", help="The probe class (name or column) to steer towards with --op add.")
@click.option("--between", nargs=2, help="Direction = mean(A) - mean(B) in the unmodified run, e.g. task=3 task=5.")
@click.option("--alpha", "alphas", multiple=True, default=("1",), show_default=True,
              help="Strength(s), comma lists allowed; 0 is the unmodified policy (dose-response: 0,1,2,4).")
@click.option("--units", help="clamp: feature indices (e.g. FFN neurons of mlp_act), comma-separated.")
@click.option("--value", default=0.0, show_default=True, help="clamp: the value the units are clamped to.")
@click.option("--tokens", help="Tokens to change (span name, positions, last); default: the site's own tokens.")
@click.option("--denoise", help="Action expert: only these denoising steps (indices, e.g. 0 or 0,1; 0 is t=1.0).")
@click.option("--checkpoint", help="Model checkpoint (directory or hub id); default: a small random model.")
@click.option("--data", help="Dataset path (default: the adapter's embedded sample).")
@click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own Python code to run.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--model-dtype", default="float32", show_default=True)
@click.option("--seed", default=0, show_default=True, help="One seed for every run: paired noise and init states.")
@click.option("--max-episodes", type=int)
@click.option("--max-steps", type=int)
@click.option("--stride", default=1, show_default=True)
@click.option("--batch-size", default=1, show_default=True)
@click.option("--model-option", multiple=True, help="Adapter-specific KEY=VALUE option.")
@click.option("--dataset-option", multiple=True, help="Dataset-specific KEY=VALUE option (libero-sim: tasks=0 ...).")
@click.option("--bootstrap", default=2000, show_default=True, help="Episode-bootstrap resamples.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run in --out.")
@click.option("--no-figures", is_flag=True)
@click.option("--no-progress", is_flag=True)
def intervene_command(model, dataset, out, hooks, op, direction, probe_class, between, alphas, units, value, tokens,
                      denoise, checkpoint, trust_remote_code, data, device, model_dtype, seed, max_episodes, max_steps, stride, batch_size,
                      model_option, dataset_option, bootstrap, overwrite, no_figures, no_progress):
    """Intervene on a named stream (add, ablate, clamp, zero, mean) and measure the effect on actions, success
    and the probe, each run paired with the unmodified one (same seed, same inputs or init states)."""
    from toolkit.run.intervene import intervene

    run = intervene(model, dataset, out, hooks=[h for h in hooks if h], op=op, alphas=_floats(alphas),
                    direction=direction, probe_class=probe_class, between=tuple(between) if between else None,
                    units=_ints(units, "--units") or [], value=value, tokens=tokens,
                    denoise=_ints(denoise, "--denoise"), checkpoint=checkpoint,
                    trust_remote_code=trust_remote_code, data=data, device=device,
                    model_dtype=model_dtype, seed=seed, max_episodes=max_episodes, max_steps=max_steps, stride=stride,
                    batch_size=batch_size, model_options=key_values(model_option, "--model-option"),
                    dataset_options=key_values(dataset_option, "--dataset-option"), overwrite=overwrite,
                    progress=not no_progress, figures=not no_figures, n_boot=bootstrap)
    click.echo(f"wrote {out / 'effects.csv'}, {out / 'report.md'} and {len(run.figures)} figures "
               f"({len(run.conditions)} conditions vs the unmodified run in {run.baseline})")
