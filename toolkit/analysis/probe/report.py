"""Figures and a self-contained report (Markdown beside PNGs, and one HTML file with the PNGs embedded).

The report first says what was probed (model, its weights: **RANDOM**, loaded or imported; dataset, store,
selection, episodes and steps per class, the split) and how the numbers were made, then per target: metric against
layer with 95 % intervals, the control and the baselines in the legend, one panel per denoising step
(t), a fixed y-range and integer layer ticks, cells with warnings (too few episodes, λ at the grid edge) in
grey; metric against denoising step t (one line per layer) when there are several; a layer × rollout-step
heatmap and a retention curve with intervals when steps are bucketed; the correlation of per-episode probe
confidence with episode success within task (``toolkit.analysis.probe.success``) against layer, with its table
and the per-task breakdown; the
confusion or instruction-similarity matrix of the selected probe.  Markdown and HTML come from Jinja2
templates.
"""

from __future__ import annotations

import base64
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from toolkit.analysis.figures import pyplot, save_figure
from toolkit.sdk.errors import ToolkitError
from toolkit.analysis.probe.results import Results, correction_text, interval_note
from toolkit.store.reader import model_weights

MARKDOWN = """# Probe report

{{ what }}

{% if random %}**Warning: the probed model has random weights (seeded: none were loaded from a checkpoint).**
Every number below says what the architecture and the inputs alone make decodable, not what a trained policy
learned.

{% endif %}{{ how }}

## Selected probe per target (chosen inside each outer fold: no winner's curse)

| {{ best_head | join(" | ") }} |
|{% for _ in best_head %}---|{% endfor %}
{% for r in best %}| {{ r | join(" | ") }} |
{% endfor %}
{{ intervals }}.
{% for s in sections %}
## {{ s.title }}

{% for img in s.images %}![{{ img.stem }}]({{ img.rel }})

{% endfor %}{% if s.mdl %}{{ s.mdl_title }}

| {{ mdl_head | join(" | ") }} |
|{% for _ in mdl_head %}---|{% endfor %}
{% for r in s.mdl %}| {{ r | join(" | ") }} |
{% endfor %}
{% endif %}{% if s.success %}{{ s.success_title }}

| {{ success_head | join(" | ") }} |
|{% for _ in success_head %}---|{% endfor %}
{% for r in s.success %}| {{ r | join(" | ") }} |
{% endfor %}
{% endif %}{% if s.success_tasks %}{{ s.success_tasks_title }}

| {{ success_tasks_head | join(" | ") }} |
|{% for _ in success_tasks_head %}---|{% endfor %}
{% for r in s.success_tasks %}| {{ r | join(" | ") }} |
{% endfor %}
{% endif %}{% if s.per_task %}{{ s.per_task_title }}

| task | rows | {{ s.metric }} |
|---|---|---|
{% for p in s.per_task %}| {{ p | join(" | ") }} |
{% endfor %}{% endif %}{% endfor %}"""

HTML = """<!doctype html><html><head><meta charset="utf-8"><title>Probe report</title><style>
body{font-family:sans-serif;max-width:1000px;margin:2em auto;line-height:1.4}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}
.warn{background:#fee;border:1px solid #c00;padding:.5em}</style></head><body>
<h1>Probe report</h1>
<p>{{ what }}</p>
{% if random %}<p class="warn"><b>Warning: the probed model has random weights (seeded: none were loaded from a
checkpoint).</b> Every number below says what the architecture and the inputs alone make decodable, not what a
trained policy learned.</p>{% endif %}
<p>{{ how }}</p>
<h2>Selected probe per target (chosen inside each outer fold: no winner's curse)</h2>
<table><tr>{% for h in best_head %}<th>{{ h }}</th>{% endfor %}</tr>
{% for r in best %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
<p>{{ intervals }}.</p>
{% for s in sections %}<h2>{{ s.title }}</h2>
{% for img in s.images %}<p><img alt="{{ img.stem }}" src="data:image/png;base64,{{ img.data }}"></p>{% endfor %}
{% if s.mdl %}<p>{{ s.mdl_title }}</p><table><tr>{% for h in mdl_head %}<th>{{ h }}</th>{% endfor %}</tr>
{% for r in s.mdl %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if s.success %}<p>{{ s.success_title }}</p><table><tr>{% for h in success_head %}<th>{{ h }}</th>{% endfor %}</tr>
{% for r in s.success %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if s.success_tasks %}<p>{{ s.success_tasks_title }}</p><table><tr>{% for h in success_tasks_head %}<th>{{ h }}</th>
{% endfor %}</tr>{% for r in s.success_tasks %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{% endif %}
{% if s.per_task %}<p>{{ s.per_task_title }}</p><table><tr><th>task</th><th>rows</th><th>{{ s.metric }}</th></tr>
{% for p in s.per_task %}<tr>{% for c in p %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% endfor %}</body></html>"""


def _true(v) -> bool:
    """A boolean column as JSON or CSV gives it back."""
    return v is True or str(v) in ("True", "true", "1")


def _num(v):
    if v is None or v == "":
        return float("nan")
    return float(v)


def _label(r: dict) -> str:
    return r["site"] if r["t"] is None else f"{r['site']} t={_num(r['t']):.2f}"


def _ylim(rows: list[dict]) -> tuple[float, float]:
    """Accuracies and retrieval on [0, 1] always; R² from a floor of −0.2 (or lower if the data go there)."""
    if rows[0]["metric_name"] != "r2":
        return -0.02, 1.02
    lows = [_num(r["ci_low"]) for r in rows] + [_num(r.get("control")) for r in rows]
    return min(-0.2, np.nanmin(lows) - 0.05), 1.02


def fig_layers(rows: list[dict], path: Path, title: str) -> Path:
    """Metric vs layer, one panel per denoising step t: interval band, control and baselines in the legend,
    cells with warnings grey, cells above chance after the run's multiplicity correction starred, chance (or
    the majority rate) dashed, fixed y-range, integer layer ticks."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = defaultdict(list)
    for r in rows:
        panels[r["t"]].append(r)
    keys = sorted(panels, key=lambda t: 0 if t is None else -_num(t))  # t from 1 (noise) down
    ncol = min(len(keys), 4)
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol + 1, 3.0 * nrow + 0.6), squeeze=False, sharey=True)
    ylim = _ylim(rows)
    for ax, t in zip(axes.flat, keys):
        rs = sorted(panels[t], key=lambda r: int(r["layer"]))
        x = [int(r["layer"]) for r in rs]
        ax.plot(x, [_num(r["metric"]) for r in rs], "-", color="C0", label=rs[0]["metric_name"])
        ax.fill_between(x, [_num(r["ci_low"]) for r in rs], [_num(r["ci_high"]) for r in rs], color="C0", alpha=0.2,
                        label="95 % interval")
        ok = [not _true(r.get("has_warnings")) for r in rs]
        ax.scatter([v for v, k in zip(x, ok) if k], [_num(r["metric"]) for r, k in zip(rs, ok) if k], s=12, color="C0")
        if not all(ok):
            ax.scatter([v for v, k in zip(x, ok) if not k], [_num(r["metric"]) for r, k in zip(rs, ok) if not k], s=14,
                       color="0.6", zorder=3, label="has warnings")
        sig = [_true(r.get("significant")) for r in rs]
        if any(sig):
            ax.scatter([v for v, k in zip(x, sig) if k], [_num(r["metric"]) for r, k in zip(rs, sig) if k],
                       marker="*", s=40, color="k", zorder=4, label="above chance, corrected")
        draws = rs[0].get("n_controls")
        ax.plot(x, [_num(r["control"]) for r in rs], ":", color="C3",
                label=f"control, {draws} draws (chance {_num(rs[0].get('control_chance')):.2f})"
                if draws not in (None, "") else "control (random f(task, progress))")
        for col, style, color, name in (("baseline_random", "--", "C2", "random-weights model"),
                                        ("baseline_embedding", "-.", "C4", "input embeddings")):
            v = [_num(r.get(col)) for r in rs]
            if np.isfinite(v).any():
                ax.plot(x, v, style, color=color, lw=1, label=name)
        floor = max(_num(rs[0]["chance"]), _num(rs[0].get("majority")) if np.isfinite(_num(rs[0].get("majority")))
                    else -1)
        name = "majority class" if _num(rs[0].get("majority")) > _num(rs[0]["chance"]) + 1e-9 else "chance"
        ax.axhline(floor, ls="--", color="grey", lw=0.8, label=f"{name} {floor:.2f}")
        ax.set_ylim(*ylim)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_title(_label(rs[0]), fontsize=8)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    axes[0][0].set_ylabel(f"held-out {rows[0]['metric_name']}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_cols = 4 if ncol > 1 else 2  # one panel is too narrow for four entries side by side
    legend_rows = math.ceil(len(labels) / legend_cols)
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=legend_cols, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, min(0.4, 0.045 * legend_rows / nrow + 0.02), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_heatmap(rows: list[dict], path: Path, title: str) -> Path:
    """Layer × rollout-step bucket heatmap of the metric for one site/t."""
    plt = pyplot()
    layers = sorted({int(r["layer"]) for r in rows})
    steps = list(dict.fromkeys(r["step"] for r in rows))
    m = np.full((len(layers), len(steps)), np.nan)
    for r in rows:
        m[layers.index(int(r["layer"])), steps.index(r["step"])] = _num(r["metric"])
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(steps) + 2), max(3, 0.3 * len(layers) + 1.5)))
    lo, hi = _ylim(rows)
    im = ax.imshow(m, aspect="auto", origin="lower", cmap="viridis", vmin=max(lo, np.nanmin(m)), vmax=min(hi, 1))
    ax.set_xticks(range(len(steps)), steps, rotation=45, fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("rollout step")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=rows[0]["metric_name"])
    return save_figure(fig, path)


def fig_retention(rows: list[dict], path: Path, title: str) -> Path:
    """Metric (with its interval) against rollout-step bucket at one layer; successful and failed episodes."""
    plt = pyplot()
    steps = list(dict.fromkeys(r["step"] for r in rows))
    x = np.arange(len(steps))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, [_num(r["metric"]) for r in rows], "-o", ms=3, label="all episodes")
    ax.fill_between(x, [_num(r["ci_low"]) for r in rows], [_num(r["ci_high"]) for r in rows], alpha=0.2,
                    label="95 % interval")
    warned = [i for i, r in enumerate(rows) if _true(r.get("has_warnings"))]
    if warned:
        ax.scatter(warned, [_num(rows[i]["metric"]) for i in warned], color="0.6", zorder=3, s=16,
                   label="has warnings (e.g. few episodes)")
    for key, style, name in (("metric_success", "s", "successful episodes"), ("metric_failure", "^", "failed episodes")):
        v = [_num(r.get(key)) for r in rows]
        if np.isfinite(v).any():
            ax.plot(x, v, style, ms=4, ls="none", label=name)
    ax.plot(x, [_num(r["control"]) for r in rows], ":", color="C3", label="control")
    ax.set_ylim(*_ylim(rows))
    ax.set_xticks(x, steps, rotation=45, fontsize=7)
    ax.set_xlabel("rollout step")
    ax.set_ylabel(rows[0]["metric_name"])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def fig_denoise(rows: list[dict], path: Path, title: str) -> Path:
    """Metric (with its interval) against the denoising step t, one line per layer, t from 1 (noise) down."""
    plt = pyplot()
    layers = sorted({int(r["layer"]) for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.8))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(layers)))
    for layer, color in zip(layers, colors):
        rs = sorted((r for r in rows if int(r["layer"]) == layer), key=lambda r: -_num(r["t"]))
        x = [_num(r["t"]) for r in rs]
        ax.plot(x, [_num(r["metric"]) for r in rs], "-o", ms=3, color=color, label=f"layer {layer}")
        ax.fill_between(x, [_num(r["ci_low"]) for r in rs], [_num(r["ci_high"]) for r in rs], color=color, alpha=0.12)
    ax.invert_xaxis()
    ax.set_ylim(*_ylim(rows))
    ax.set_xlabel("flow-matching t (denoising runs right to left: 1 = noise, 0 = action)")
    ax.set_ylabel(f"held-out {rows[0]['metric_name']} (95 % interval bands)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2 if len(layers) > 8 else 1, loc="best")
    return save_figure(fig, path)


def fig_success(rows: list[dict], path: Path, title: str) -> Path:
    """Within-task correlation of per-episode probe confidence with success against layer (one line per t),
    with its 95 % interval; filled markers where the within-task permutation p is at most 0.05."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ts = list(dict.fromkeys(r["t"] for r in rows))
    for i, t in enumerate(ts):
        rs = sorted((r for r in rows if r["t"] == t), key=lambda r: int(r["layer"]))
        x = np.array([int(r["layer"]) for r in rs])
        y = np.array([_num(r["r"]) for r in rs])
        sig = np.array([_num(r["p_value"]) <= 0.05 for r in rs])  # as the interval excludes 0
        label = "r" if t is None else f"r, t={_num(t):.2f}"
        ax.plot(x, y, "-", color=f"C{i}", label=label)
        ax.fill_between(x, [_num(r["r_ci_low"]) for r in rs], [_num(r["r_ci_high"]) for r in rs], color=f"C{i}",
                        alpha=0.15)
        ax.scatter(x[sig], y[sig], color=f"C{i}", s=18, zorder=3)
        ax.scatter(x[~sig], y[~sig], facecolor="white", edgecolor=f"C{i}", s=18, zorder=3)
    ax.axhline(0, ls="--", color="grey", lw=0.8)
    ax.set_ylim(-1.02, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("within-task corr(confidence, success)", fontsize=8)
    ax.set_title(title + "\nfilled: within-task permutation p ≤ 0.05; band: 95 % interval (inverted test)",
                 fontsize=8)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def fig_matrix(m, rows_labels, col_labels, path: Path, title: str, cbar: str) -> Path:
    plt = pyplot()
    m = np.asarray(m, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * m.shape[1] + 2.5), max(3.5, 0.35 * m.shape[0] + 2)))
    im = ax.imshow(m, cmap="magma" if cbar == "count" else "RdBu_r")
    short = lambda s: s if len(s) <= 28 else s[:26] + "…"  # noqa: E731
    ax.set_xticks(range(len(col_labels)), [short(c) for c in col_labels], rotation=60, ha="right", fontsize=6)
    ax.set_yticks(range(len(rows_labels)), [short(c) for c in rows_labels], fontsize=6)
    ax.set_title(title.replace(" — ", "\n"), fontsize=8)
    fig.colorbar(im, ax=ax, label=cbar)
    return save_figure(fig, path)


def _fmt(v, nd=3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–" if v is None else str(v)
    return "–" if math.isnan(f) else f"{f:.{nd}f}"


def _ci(r: dict, key: str = "") -> str:
    lo, hi = r.get(f"{key}ci_low" if not key else f"{key}_ci_low"), r.get(f"{key}ci_high" if not key else
                                                                          f"{key}_ci_high")
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def write_report(results_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write figures/, report.md and report.html; returns the HTML path."""
    import jinja2

    res = Results.load(results_dir)
    out = Path(out or results_dir)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    if not res.rows:
        raise ToolkitError(f"{results_dir} holds no result rows")
    by_series = defaultdict(list)
    for r in res.rows:
        by_series[(r["site"], r["target"], r["split"], r["solver"])].append(r)
    sections = []
    for (site, target, split, solver), rs in by_series.items():
        name = f"{site}_{target}_{split}_{solver}".replace(":", "-").replace("[", "").replace("]", "")
        images = []
        buckets = list(dict.fromkeys(r["step"] for r in rs))
        first = [r for r in rs if r["step"] == buckets[0]]
        images.append(fig_layers(first, figs / f"layers_{name}.png",
                                 f"{site} — {target}: held-out {split}, {solver}, rollout steps {buckets[0]}"))
        sel = next((b for b in res.best if (b["site"], b["target"], b["split"], b["solver"]) == (site, target, split,
                                                                                                 solver)), None)
        layer = int(sel["layer"]) if sel else int(first[0]["layer"])
        t = sel["t"] if sel else first[0]["t"]
        at = [r for r in rs if int(r["layer"]) == layer and r["t"] == t]
        if len(buckets) > 1:
            site_t = [r for r in rs if r["t"] == t]
            images.append(fig_heatmap(site_t, figs / f"heatmap_{name}.png",
                                      f"{target} — {_label(at[0])}: layer × rollout step"))
            images.append(fig_retention(at, figs / f"retention_{name}.png",
                                        f"{target} vs rollout step — {_label(at[0])} layer {layer}, by episode outcome"))
        if len({r["t"] for r in first}) > 1:
            images.append(fig_denoise(first, figs / f"denoise_{name}.png",
                                      f"{site} — {target} vs denoising step: held-out {split}, {solver}, "
                                      f"rollout steps {buckets[0]}"))
        succ = [r for r in res.success if (r["site"], r["target"], r["split"], r["solver"]) == (site, target, split,
                                                                                               solver)]
        if succ:
            images.append(fig_success([r for r in succ if r["step"] == buckets[0]], figs / f"success_{name}.png",
                                      f"{site} — {target}: probe confidence vs episode success, rollout steps "
                                      f"{buckets[0]}"))
        ref = at[0] if at else first[0]
        d = res.details.get(int(ref["id"]), {})
        if "confusion" in d:
            images.append(fig_matrix(d["confusion"], d["labels"], d["labels"], figs / f"confusion_{name}.png",
                                     f"confusion (rows true) — {_label(ref)} layer {ref['layer']}", "count"))
        if "similarity" in d:
            images.append(fig_matrix(d["similarity"], d["similarity_rows"], d["labels"], figs / f"similarity_{name}.png",
                                     f"mean predicted vs instruction embeddings — {_label(ref)} layer {ref['layer']}",
                                     "cosine"))
        pt = [[p["task"], p["n"], _fmt(p["metric"])] for p in res.per_task if int(p["id"]) == int(ref["id"])]
        sections.append({"title": f"{site} — {target} — held-out {split} — {solver}",
                         "images": [{"stem": p.stem, "rel": p.relative_to(out).as_posix(),
                                     "data": base64.b64encode(p.read_bytes()).decode()} for p in images],
                         "per_task": pt, "metric": ref["metric_name"],
                         "success": [_success_cells(r) for r in succ if int(r["layer"]) == layer and r["t"] == t],
                         "success_title": f"Probe confidence ({succ[0]['confidence'] if succ else ''}, mean per "
                                          f"episode, out of fold) vs episode success at layer {layer}"
                                          + ("" if t is None else f", t={_num(t):.2f}") + ", within task: r is the "
                                          "within-task point-biserial correlation, difference the task-fixed-effects "
                                          "difference in mean confidence (successful − failed), 95 % intervals by "
                                          "inverting the test, two-sided permutation p with successes shuffled within "
                                          "each task; tasks with one outcome only contribute nothing. The correlation "
                                          "across tasks is descriptive (task differences in success drive it):",
                         **_success_tasks(succ, layer, t), **_mdl_rows(first),
                         "per_task_title": f"Per-task {ref['metric_name']} ({_label(ref)}, layer {ref['layer']}, "
                                           f"steps {ref['step']}):"})
    best_head = ["site", "target", "split", "solver", "steps", "layer (per fold)", "t", "metric", "value", "95% CI",
                 "selected by", "test episodes"]
    best = [[b["site"], b["target"], b["split"], b["solver"], b["step"], f"{b['layer']} ({b['layers_per_fold']})",
             "–" if b["t"] is None else _fmt(b["t"], 2), b["metric_name"], _fmt(b["metric"]), _ci(b),
             b["selected_by"], b["n_test_episodes"]] for b in res.best]
    model = res.meta.get("model")
    ctx = {"what": _what(res), "how": _how(res), "random": model_weights(model).random,
           "intervals": interval_note({r.get("n_folds") for r in res.rows}),
           "mdl_head": ["layer", "t", "online code (bits)", "95% CI", "uniform code (bits)", "compression",
                        "95% CI"],
           "best_head": best_head, "best": best, "sections": sections,
           "success_head": ["steps", "r (within task)", "95% CI", "difference", "95% CI", "p", "tasks used / all",
                            "episodes success / failure", "r across tasks"],
           "success_tasks_head": ["task", "episodes", "success / failure", "mean conf. success", "mean conf. failure",
                                  "difference", "weight", "left out"]}
    md = jinja2.Environment(autoescape=False, keep_trailing_newline=True).from_string(MARKDOWN).render(**ctx)
    (out / "report.md").write_text(md)
    path = out / "report.html"
    path.write_text(jinja2.Environment(autoescape=True).from_string(HTML).render(**ctx))
    return path


def _bound(r: dict, key: str, sign: str) -> str:
    """An interval end of the success difference; JSON null beside a finite estimate is an unbounded end."""
    v = r.get(key)
    return (sign + "∞") if v is None and _num(r.get("diff")) == _num(r.get("diff")) else _fmt(v)


def _success_cells(r: dict) -> list:
    """One row of the success table (results written before the within-task test lack its columns: –)."""
    return [r["step"], _fmt(r["r"]), f"[{_fmt(r['r_ci_low'])}, {_fmt(r['r_ci_high'])}]", _fmt(r.get("diff")),
            f"[{_bound(r, 'diff_ci_low', '−')}, {_bound(r, 'diff_ci_high', '')}]",
            _fmt(r["p_value"], 4) + (" (exact)" if r["p_exact"] else "")
            + (f" ({r['note']})" if r.get("note") else ""),
            f"{r.get('n_tasks_used', '–')} / {r.get('n_tasks', '–')}", f"{r['n_success']} / {r['n_failure']}",
            _fmt(r.get("r_across_tasks"))]


def _success_tasks(succ: list[dict], layer: int, t) -> dict:
    """The per-task breakdown of the success test at the report's layer (its first step bucket)."""
    r = next((r for r in succ if int(r["layer"]) == layer and r["t"] == t and r.get("per_task")), None)
    if r is None:
        return {"success_tasks": [], "success_tasks_title": ""}
    rows = [[k["task"], k["n_episodes"], f"{k['n_success']} / {k['n_failure']}", _fmt(k["conf_success"]),
             _fmt(k["conf_failure"]), _fmt(k["diff"]), _fmt(k["weight"]), k["note"] or "–"] for k in r["per_task"]]
    return {"success_tasks": rows,
            "success_tasks_title": f"Per task, confidence vs success (layer {layer}, steps {r['step']}; the "
                                   "difference above is the weighted mean of the per-task differences):"}


def _mdl_rows(rows: list[dict]) -> dict:
    """The online code length and compression per layer (and t) of one section's first step bucket."""
    have = sorted((r for r in rows if np.isfinite(_num(r.get("mdl_bits")))),
                  key=lambda r: (0 if r["t"] is None else -_num(r["t"]), int(r["layer"])))
    if not have:
        return {"mdl": [], "mdl_title": ""}
    table = [[r["layer"], "–" if r["t"] is None else _fmt(r["t"], 2), _fmt(r["mdl_bits"], 1),
              f"[{_fmt(r.get('mdl_bits_ci_low'), 1)}, {_fmt(r.get('mdl_bits_ci_high'), 1)}]",
              _fmt(r["uniform_bits"], 1), _fmt(r["compression"]), _ci(r, "compression")] for r in have]
    draws = have[0].get("mdl_draws")
    return {"mdl": table,
            "mdl_title": f"Minimum description length (online code over the outer folds as blocks, Voita & Titov), "
                         f"rollout steps {have[0]['step']}: compression = uniform / online (1 = nothing learned). "
                         f"95 % intervals: bootstrap over episodes within the blocks"
                         + (f" ({draws} draws)" if draws else "") + ", given the fitted prefix probes (they "
                         "describe the coding of other episodes like these by the same probes, not a refit):"}


def _what(res: Results) -> str:
    """Model and its weights (random, loaded from a checkpoint, or imported activations), dataset, store,
    selection, episodes and steps per class."""
    model = res.meta.get("model")
    name = model.get("name", "?") if isinstance(model, dict) else (model or "?")
    w = model_weights(model)  # the store layer's one answer, as `toolkit info` and repr(store) give it
    weights = f"**{w.label}** ({w.detail})" if w.random else str(w)
    ds = res.meta.get("dataset")
    ds_name = ds.get("name", "?") if isinstance(ds, dict) else (ds or "?")
    sel = res.meta.get("selection") or {}
    sel_txt = ", ".join(f"{k}={v}" for k, v in sel.items()) or "everything"
    counts = sorted({(r["target"], r.get("n_classes"), r.get("min_episodes_per_class"), r.get("min_steps_per_class"),
                      r["n_test_episodes"], r["n_test"]) for r in res.rows if r.get("step") is not None}, key=str)
    per = "; ".join(f"{t}: {ne} episodes / {ns} steps" + (f", {nc} classes with ≥ {me} episodes and ≥ {ms} steps "
                                                           f"each" if nc not in (None, "") else "")
                    for t, nc, me, ms, ne, ns in counts[:6])
    return (f"Model **{name}**, {weights}; dataset {ds_name}; store `{res.meta.get('store', '?')}`; "
            f"selection {sel_txt}. Probed rows: {per}.")


def _control_text(c: dict) -> str:
    if "n_controls" not in c:  # results written before the control kept the target's label frequencies
        return ("Control: a uniformly random label per (task, progress quartile) type (Hewitt & Liang), one draw; "
                "selectivity = metric − max(control, chance or majority).")
    return (f"Control: a random label per (task, progress quartile) type (Hewitt & Liang) with the target's label "
            f"frequencies, so its own chance (control_chance) matches the target's, learnable whenever task and "
            f"progress are encoded; the mean of {c['n_controls']} independent draws. Selectivity = metric − "
            f"max(control, chance or majority), its 95 % interval by the delta method on the same rows (episodes "
            f"and folds) plus the spread between the draws.")


def _how(res: Results) -> str:
    c = res.meta.get("config", {})
    base = res.meta.get("baseline_store")
    return (f"Linear probes ({c.get('solver', 'ridge')}), features z-scored with training statistics only. "
            f"Nested cross-validation: {c.get('n_folds', 5)} outer folds of whole episodes (stratified by task; "
            f"'tasks' rows hold out whole tasks and retrieve among each fold's held-out instructions only), every "
            f"episode tested once by a probe that never saw it; λ is chosen by leave-one-fold-out inside each outer "
            f"training set (ridge: relative to the mean eigenvalue of the standardised gram). Headline numbers pool "
            f"the out-of-fold predictions. 95 % intervals: cluster-robust over episodes plus the fold-to-fold "
            f"(split) variance, Agresti–Coull-adjusted on episodes so they never collapse at 0 or 1 (coverage "
            f"measured in benchmarks/bench_calibration.py); "
            f"{interval_note({r.get('n_folds') for r in res.rows}).replace('95 % intervals', 'they')}. Chance: for a "
            f"classifier the majority rate of the training folds (intercepts take the selection's class proportions), "
            f"for R² 0; 1/C is the balanced-accuracy chance. {_control_text(c)} {correction_text(res.meta)} "
            f"Baselines: the same probe on a random-weights model "
            f"({'store ' + base if base else 'not given: --baseline STORE'}) and on the input embeddings "
            f"({'layer 0 input' if res.meta.get('embedding_baseline') else 'not in the store: extract resid_pre at layer 0'}"
            f"). MDL: online code over the outer folds as blocks (Voita & Titov), in bits, with compression against "
            f"the uniform code and 95 % intervals by a bootstrap over episodes within the blocks (given the fitted "
            f"prefix probes). The selected layer is chosen by inner-CV score inside each outer fold, so its "
            f"score carries no winner's curse. Cells with warnings (grey; has_warnings, not a test): fewer than 10 "
            f"test episodes, fewer than 2 "
            f"episodes in a class, or λ at the grid edge. Seed {c.get('seed', 0)}.")
