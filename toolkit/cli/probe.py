"""`toolkit probe` and `toolkit report`: layer sweeps of linear probes on a store, and their report."""

from __future__ import annotations

import click

from toolkit.sdk.errors import ToolkitError
from toolkit.store.reader import model_weights

PROBE_EXAMPLES = """
\b
Examples:
  toolkit probe stores/libero.zarr                  # every site, every layer, task identity
  toolkit probe stores/libero.zarr --site vlm --target instruction --encoder minilm --out results/vlm
  toolkit probe stores/libero.zarr --hook 'vlm.layers.-4-.resid_post'   # hook names, globs allowed
  toolkit probe stores/libero.zarr --expert action --layer 10 --rollout-step 20 --action-timestep 0.9
  toolkit probe stores/libero.zarr --site vlm --step-buckets 50 --target task --target field:success
  toolkit probe stores/libero.zarr --target field:step:regression --baseline stores/libero_random.zarr
  toolkit report results/vlm
"""



def _split_csv(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@click.command(epilog=PROBE_EXAMPLES)
@click.argument("store_path", required=False, type=click.Path(), metavar="STORE")
@click.option("--store", "store_opt", default=None, type=click.Path(), hidden=True,
              help="The store (older spelling of the STORE argument).")
@click.option("--site", "--sites", "--expert", "sites", multiple=True,
              help="Capture site(s)/expert(s): vlm, action, text_only (default: all; comma lists allowed).")
@click.option("--hook", "hooks", multiple=True,
              help="Hook names instead of --site/--stream/--layer, globs allowed: vlm.layers.*.resid_post, "
                   "*.layers.-1.resid_*; repeat for more.")
@click.option("--stream", "--streams", "stream", default=None, help="Stream inside the site (default resid_post).")
@click.option("--layer", "--layers", "layers", default=None, help="Model layers (toolkit.sdk.names grammar): all | 10 | 0-5,17 | -1 (last) | 3- (default all).")
@click.option("--rollout-step", "--rollout_step", "steps", default=None, help="Rollout steps kept: 20 | 0-99.")
@click.option("--step-buckets", default=None, help="One probe per rollout-step bucket: a width (50) or 0-49,50-99.")
@click.option("--denoise", default=None, help="Action-expert denoising step indices: all | 0 | 0-9.")
@click.option("--action-timestep", "--action_timestep", "t", default=None,
              help="Action-expert flow-matching t value(s), e.g. 0.9 or 1.0,0.5.")
@click.option("--tokens", default=None, help="Stored token positions to use: all | 0-3 | -1 (default all).")
@click.option("--pool", type=click.Choice(["mean", "last", "first", "none"]), default="mean", show_default=True,
              help="How kept tokens become one vector (none concatenates them).")
@click.option("--task-range", "--task_range", type=int, nargs=2, default=None, help="Task ids A..B-1 only.")
@click.option("--episode-range", "--episode_range", type=int, nargs=2, default=None,
              help="Each task's episodes A..B-1 only.")
@click.option("--target", "--targets", "targets", multiple=True,
              help="task (default) | instruction | field:NAME[:classification|regression] (e.g. field:success, "
                   "field:step:regression, field:dataset_action[3]).")
@click.option("--encoder", type=click.Choice(["minilm", "t5"]), default="minilm", show_default=True,
              help="Text encoder of the instruction target.")
@click.option("--encoder-path", type=click.Path(), default=None, help="Local folder with the encoder's weights.")
@click.option("--solver", type=click.Choice(["ridge", "logistic", "cosine"]), default="ridge", show_default=True,
              help="ridge: streamed, all λ at once; logistic: L-BFGS (classification); cosine: the seed's probe.")
@click.option("--split", "--splits", "splits", multiple=True,
              type=click.Choice(["auto", "episodes", "tasks", "steps"]),
              help="Held-out unit (default auto: episodes, plus tasks for embedding targets with ≥ 6 tasks). "
                   "steps leaks.")
@click.option("--folds", default=5, show_default=True,
              help="Outer folds over episodes (every episode tested once); λ is chosen inside each training set.")
@click.option("--lambdas", default=None, help="Comma list of relative λ (default 1e-6..1e3, 10 values).")
@click.option("--baseline", default=None, type=click.Path(),
              help="A store of the same samples from a random-weights model (`toolkit extract --random-weights`): "
                   "the same probe on it is the baseline column.")
@click.option("--mdl/--no-mdl", default=True, show_default=True,
              help="Online code length (MDL) for classification targets (ridge).")
@click.option("--success/--no-success", "success", default=True, show_default=True,
              help="Correlate per-episode probe confidence with episode success (success.csv, a report section); "
                   "runs where the selection holds at least 2 successful and 2 failed episodes.")
@click.option("--correction", type=click.Choice(["holm", "bh", "none"]), default="holm", show_default=True,
              help="Multiplicity correction of the per-cell tests 'above chance' over every cell of the run: holm "
                   "(family-wise error), bh (Benjamini-Hochberg, false discovery rate) or none.")
@click.option("--alpha", default=0.05, show_default=True, type=float,
              help="Level of the corrected decisions (the 'significant' column).")
@click.option("--controls", "n_controls", default=5, show_default=True, type=int,
              help="Control-task draws averaged (Hewitt & Liang; each keeps the target's label frequencies).")
@click.option("--seed", default=0, show_default=True)
@click.option("--learning-rate", "--learning_rate", "lr", default=1e-3, show_default=True, help="cosine solver.")
@click.option("--epochs", "--num_epochs", default=100, show_default=True, help="cosine solver.")
@click.option("--batch-size", "--batch_size", default=256, show_default=True, help="cosine solver.")
@click.option("--patience", default=10, show_default=True, help="cosine solver: early-stopping patience (epochs).")
@click.option("--save-weights", type=click.Choice(["best", "all", "none"]), default="best", show_default=True)
@click.option("--out", "--output_dir", "out", default="results/probe", show_default=True, type=click.Path())
@click.option("--report/--no-report", "make_report", default=True, show_default=True,
              help="Also write the figures (--out/figures) and the report (report.md, report.html) into --out.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="A progress bar on stderr.")
@click.option("--device", default=None,
              help="torch device for the ridge statistics and eigendecompositions: cpu | cuda | cuda:N "
                   "(default: numpy products, CPU torch eigh).")
@click.option("--scheduler", default=None,
              help="Accumulate the ridge statistics as Dask tasks: threads | processes | sync | tcp://host:port.")
def probe_command(store_path, store_opt, **options) -> None:
    """Fit linear probes on a store's hidden states, layer by layer, with nested episode cross-validation."""
    if store_path and store_opt and store_path != store_opt:
        raise ToolkitError(f"two stores given ({store_path} and --store {store_opt}): give one STORE")
    if not (store_path or store_opt):
        raise ToolkitError("no store given: toolkit probe STORE (e.g. toolkit probe stores/libero.zarr)")
    _probe(store_path or store_opt, **options)


def _probe(store_path, *, hooks, sites, stream, layers, steps, step_buckets, denoise, t, tokens, pool, task_range,
           episode_range, targets, encoder, encoder_path, solver, splits, folds, lambdas, baseline, mdl, success,
           correction, alpha, n_controls, seed, lr, epochs, batch_size, patience, save_weights, out, make_report, progress, device,
           scheduler) -> None:
    from toolkit.analysis.probe import LAMBDAS, CosineOptions, ProbeConfig, Results, Selection, probe
    from toolkit.store.reader import open_store

    store = open_store(store_path)
    if hooks:
        if sites or stream or layers:
            raise ToolkitError("give either --hook or --site/--stream/--layer, not both")
        from toolkit.sdk.names import store_hooks

        chosen = [(s, st, ",".join(map(str, p.layers))) for s, p in store_hooks(store, hooks).items()
                  for st in p.streams]
    else:
        names = _split_csv(sites) or store.sites
        if not sites and (t is not None or denoise is not None):  # timestep flags name the denoising expert
            names = [s for s in names if any("denoise" in store.dims(s, st) for st in store.streams(s))] or names
        chosen = [(s, stream, layers) for s in names]
    try:
        lams = tuple(float(v) for v in lambdas.split(",")) if lambdas else LAMBDAS
    except ValueError:
        raise ToolkitError(f"malformed --lambdas {lambdas!r}: give comma-separated numbers such as 1e-3,1e-1,10")
    cfg = ProbeConfig(solver=solver, splits=tuple(splits) or ("auto",), n_folds=folds, lambdas=lams, seed=seed,
                      save_weights=save_weights, baseline=baseline, mdl=mdl, success=success, correction=correction,
                      alpha=alpha, n_controls=n_controls, progress=progress, device=device, scheduler=scheduler,
                      cosine=CosineOptions(lr=lr, epochs=epochs, batch_size=batch_size, patience=patience),
                      target_options={"encoder": encoder, "encoder_path": encoder_path})
    results = Results()
    for site, site_stream, site_layers in chosen:
        sel = Selection(site=site, stream=site_stream, layers=site_layers, steps=steps, step_buckets=step_buckets,
                        denoise=denoise, t=t, tokens=tokens, pool=pool, task_range=task_range,
                        episode_range=episode_range)
        results.extend(probe(store, sel, _split_csv(targets) or ["task"], cfg))
    path = results.save(out)
    _print_summary(results)
    click.echo(f"wrote {len(results.rows)} probe results to {path}/results.csv")
    if make_report:
        from toolkit.analysis.probe.report import write_report

        html = write_report(path)
        view = "" if save_weights == "none" else \
            f"; see it: toolkit view {store_path} --results {path} -o {path}/view.html"
        click.echo(f"figures: {path}/figures/, report: {html}{view}")
    else:
        click.echo(f"figures and report: toolkit report {path}")


def _print_summary(results) -> None:
    if model_weights(results.meta.get("model")).random:
        click.echo("warning: this store was made by a model with RANDOM weights (no checkpoint): the numbers say "
                   "what the architecture and inputs alone give", err=True)
    head = f"{'site':<9} {'layer':>5} {'t':>5} {'step':>7} {'target':<14} {'split':<8} {'metric':<10} " \
           f"{'value':>6} {'95% CI':>13} {'chance':>6} {'control':>7} {'select.':>7} {'p adj.':>8}"
    click.echo(head)
    for r in results.rows:
        t = "" if r["t"] is None else f"{r['t']:.2f}"
        click.echo(f"{r['site']:<9} {r['layer']:>5} {t:>5} {str(r['step']):>7} {r['target'][:14]:<14} "
                   f"{r['split']:<8} {r['metric_name']:<10} {r['metric']:6.3f} "
                   f"[{r['ci_low']:.3f},{r['ci_high']:.3f}] {r['chance']:6.3f} {r['control']:7.3f} "
                   f"{r['selectivity']:7.3f} {r.get('p_adjusted', float('nan')):7.4f}"
                   f"{'*' if r.get('significant') else ' '}"
                   + (f"  ! {r['warnings']}" if r.get("warnings") else ""))
    from toolkit.analysis.probe.results import correction_text

    click.echo(f"* {correction_text(results.meta)} {sum(bool(r.get('significant')) for r in results.rows)} of "
               f"{len(results.rows)} rows significant.")
    folds = results.meta.get("config", {}).get("n_folds") if isinstance(results.meta.get("config"), dict) else None
    if folds:
        click.echo(f"* Intervals describe probes trained on {folds - 1}/{folds} of the episodes (cross-fitting); "
                   "a probe fit on all of them may do slightly better.")
    for b in results.best:
        click.echo(f"selected ({b['selected_by']} inside each outer fold): {b['site']} {b['target']} steps {b['step']}"
                   f" layer {b['layer']} (per fold {b['layers_per_fold']}): {b['metric_name']} {b['metric']:.3f} "
                   f"[{b['ci_low']:.3f}, {b['ci_high']:.3f}]")


@click.command()
@click.argument("results_dir", type=click.Path())
@click.option("--out", default=None, type=click.Path(), help="Where to write the report (default: RESULTS_DIR).")
def report_command(results_dir, out) -> None:
    """Figures and a self-contained Markdown + HTML report from a `toolkit probe` results folder."""
    from toolkit.analysis.probe.report import write_report

    click.echo(f"wrote {write_report(results_dir, out)}")
