"""`toolkit extract` and `toolkit import`: their flags come from the run specification (``toolkit.run.spec``)."""

from __future__ import annotations

import click

from toolkit.cli.params import PluginOptionsCommand, pick_store, plugin_option_values, spec_options, spec_values, \
    store_argument
from toolkit.run.spec import EXTRACT, IMPORT, RunSpec

EXTRACT_EXAMPLES = """
\b
Examples:
  toolkit extract stores/libero.zarr --model pi0 --dataset libero
  toolkit extract stores/pi0_libero.zarr --model pi0 --dataset libero --data data/inference_latents \\
      --checkpoint lerobot/pi0 --device cuda --model-dtype bfloat16 \\
      --site vlm,action --layer all --layer action=0,8,17 --tokens vlm=text --pool mean
  toolkit extract stores/pi0.zarr --hook 'vlm.layers.*.resid_post' --hook 'action.layers.0-5.resid_mid'
  toolkit extract ... --resume      # continue a run that was interrupted
  toolkit extract --model pi0 --help   # also list pi0's --model-option names
"""

IMPORT_EXAMPLES = """
\b
Example:
  toolkit import stores/latents.zarr --dataset libero --data data/inference_latents --tokens vlm=text
"""


def _execution(f):
    """How a run is executed (not what it is, so not part of its spec): resume, overwrite, progress."""
    for o in reversed([
        click.option("--resume", is_flag=True, help="Continue an interrupted run in an existing store."),
        click.option("--overwrite", is_flag=True, help="Replace an existing store."),
        click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    ]):
        f = o(f)
    return f


def _spec(command: str, store, values: dict) -> RunSpec:
    """The run a command line describes; the flags plugins contribute feed the adapters' options (an explicit
    --model-option/--dataset-option of the same name wins)."""
    spec = RunSpec.build(command=command, **spec_values(RunSpec, values))
    flags = plugin_option_values(command, values, store)
    if not (flags["model"] or flags["dataset"]):
        return spec
    return RunSpec.build(spec, model_options={**flags["model"], **spec.model_options},
                         dataset_options={**flags["dataset"], **spec.dataset_options})


@click.command("extract", cls=PluginOptionsCommand, epilog=EXTRACT_EXAMPLES)
@store_argument
@spec_options(RunSpec, EXTRACT)
@_execution
def extract_command(store, store_option, resume, overwrite, no_progress, **values):
    """Run a policy over a dataset and stream the chosen hidden states into the Zarr STORE
    (default stores/libero.zarr).

    For a closed-loop dataset (libero-sim: the policy acts in the simulator) --max-steps counts environment
    steps per episode and --stride keeps every N-th policy call (the policy runs at every call).
    `toolkit extract --model NAME --dataset NAME --help` also lists those adapters' options.
    """
    from toolkit.run.api import DEFAULT_STORE, execute

    store = pick_store(store, store_option, default=DEFAULT_STORE)
    _done(execute(_spec(EXTRACT, store, values), store, resume=resume, overwrite=overwrite, progress=not no_progress))


@click.command("import", cls=PluginOptionsCommand, epilog=IMPORT_EXAMPLES)
@store_argument
@spec_options(RunSpec, IMPORT)
@_execution
def import_command(store, store_option, resume, overwrite, no_progress, **values):
    """Store activations a dataset already carries (e.g. LIBERO latent pickles) in the new Zarr STORE,
    without running a model."""
    from toolkit.run.api import execute

    store = pick_store(store, store_option)
    _done(execute(_spec(IMPORT, store, values), store, resume=resume, overwrite=overwrite, progress=not no_progress))


def _done(written) -> None:
    """The last line of a run: what it wrote, or that a resumed store was complete already and nothing was."""
    path = written.path
    if written.was_complete and not written.added:
        click.echo(f"{path} was already complete: nothing to resume, nothing written  (look inside: toolkit info "
                   f"{path})")
    else:
        click.echo(f"wrote {path}  (look inside: toolkit info {path})")
