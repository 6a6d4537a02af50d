"""Figures and a self-contained report (Markdown beside PNGs, and one HTML file with the PNGs embedded).

The figures follow the layer-sweep conventions of the probing literature: metric against layer with
95 % episode-bootstrap bands, one line per expert / denoising step, chance and control dashed; a
layer × rollout-step heatmap; language retention against rollout step split by episode success; the
confusion matrix and instruction-similarity matrix of the best probe.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.probe.results import Results


def _num(v):
    if v is None or v == "":
        return float("nan")
    return float(v)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _series_key(r: dict) -> tuple:
    return r["target"], r["split"], r["solver"]


def _label(r: dict) -> str:
    return r["site"] if r["t"] is None else f"{r['site']} t={_num(r['t']):.2f}"


def fig_layers(rows: list[dict], path: Path, title: str) -> Path:
    """Metric vs layer: one line per site / denoising step, CI bands, control dotted, chance dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = defaultdict(list)
    for r in rows:
        lines[(r["site"], r["t"])].append(r)
    sites = sorted({s for s, _ in lines})
    cmaps = ["Blues", "Oranges", "Greens", "Purples"]
    order = sorted(lines, key=lambda k: (k[0], 0 if k[1] is None else -_num(k[1])))  # t from 1 (noise) down
    for site, t in order:
        rs = lines[(site, t)]
        rs = sorted(rs, key=lambda r: r["layer"])
        ts = sorted({_num(r["t"]) for r in rows if r["site"] == site and r["t"] is not None}, reverse=True)
        shade = 0.75 if t is None or len(ts) < 2 else 0.35 + 0.6 * ts.index(_num(t)) / (len(ts) - 1)
        color = plt.get_cmap(cmaps[sites.index(site) % len(cmaps)])(shade)
        x = [r["layer"] for r in rs]
        ax.plot(x, [_num(r["metric"]) for r in rs], "-o", ms=3, color=color, label=_label(rs[0]))
        ax.fill_between(x, [_num(r["ci_low"]) for r in rs], [_num(r["ci_high"]) for r in rs], color=color, alpha=0.2)
        ax.plot(x, [_num(r["control"]) for r in rs], "--", color=color, lw=0.8, alpha=0.7)
    chance = _num(rows[0]["chance"])
    ax.axhline(chance, ls="--", color="grey", lw=1, label=f"chance {chance:.2f}")
    if rows[0].get("majority") not in (None, ""):
        ax.axhline(_num(rows[0]["majority"]), ls="--", color="black", lw=0.8, label="majority class")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"held-out {rows[0]['metric_name']} (control dashed)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def fig_heatmap(rows: list[dict], path: Path, title: str) -> Path:
    """Layer × rollout-step bucket heatmap of the metric for one site/t."""
    plt = _plt()
    layers = sorted({r["layer"] for r in rows})
    steps = list(dict.fromkeys(r["step"] for r in rows))
    m = np.full((len(layers), len(steps)), np.nan)
    for r in rows:
        m[layers.index(r["layer"]), steps.index(r["step"])] = _num(r["metric"])
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(steps) + 2), max(3, 0.3 * len(layers) + 1.5)))
    im = ax.imshow(m, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(steps)), steps, rotation=45, fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("rollout step")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=rows[0]["metric_name"])
    return _save(fig, path)


def fig_retention(rows: list[dict], path: Path, title: str) -> Path:
    """Metric against rollout-step bucket at one layer, successful and failed episodes apart."""
    plt = _plt()
    steps = list(dict.fromkeys(r["step"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, style, name in (("metric", "-o", "all episodes"), ("metric_success", "-s", "successful episodes"),
                             ("metric_failure", "-^", "failed episodes")):
        ax.plot(range(len(steps)), [_num(r.get(key)) for r in rows], style, ms=3, label=name)
    ax.set_xticks(range(len(steps)), steps, rotation=45, fontsize=7)
    ax.set_xlabel("rollout step")
    ax.set_ylabel(rows[0]["metric_name"])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def fig_matrix(m, rows_labels, col_labels, path: Path, title: str, cbar: str) -> Path:
    plt = _plt()
    m = np.asarray(m, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * m.shape[1] + 2.5), max(3.5, 0.35 * m.shape[0] + 2)))
    im = ax.imshow(m, cmap="magma" if cbar == "count" else "RdBu_r")
    short = lambda s: s if len(s) <= 28 else s[:26] + "…"  # noqa: E731
    ax.set_xticks(range(len(col_labels)), [short(c) for c in col_labels], rotation=60, ha="right", fontsize=6)
    ax.set_yticks(range(len(rows_labels)), [short(c) for c in rows_labels], fontsize=6)
    ax.set_title(title.replace(" — ", "\n"), fontsize=8)
    fig.colorbar(im, ax=ax, label=cbar)
    return _save(fig, path)


def _fmt(v, nd=3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–" if v is None else str(v)
    return "–" if math.isnan(f) else f"{f:.{nd}f}"


def write_report(results_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write figures/, report.md and report.html; returns the HTML path."""
    res = Results.load(results_dir)
    out = Path(out or results_dir)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    rows = res.rows
    if not rows:
        raise ToolkitError(f"{results_dir} holds no result rows")
    blocks: list[tuple] = [("h1", "Probe report"), ("p", _settings(res))]
    by_series = defaultdict(list)
    for r in rows:
        by_series[_series_key(r)].append(r)
    best_rows = []
    for (target, split, solver), rs in by_series.items():
        name = f"{target}_{split}_{solver}".replace(":", "-").replace("[", "").replace("]", "")
        blocks.append(("h2", f"{target} — held-out {split} — {solver}"))
        buckets = list(dict.fromkeys(r["step"] for r in rs))
        first = [r for r in rs if r["step"] == buckets[0]]
        blocks.append(("img", fig_layers(first, figs / f"layers_{name}.png",
                                         f"{target}: held-out {split}, {solver}, steps {buckets[0]}")))
        best = max(rs, key=lambda r: _num(r["metric"]))
        best_rows.append(best)
        if len(buckets) > 1:
            site_t = [r for r in rs if r["site"] == best["site"] and r["t"] == best["t"]]
            blocks.append(("img", fig_heatmap(site_t, figs / f"heatmap_{name}.png",
                                              f"{target} — {_label(best)}: layer × rollout step")))
            at_layer = [r for r in site_t if r["layer"] == best["layer"]]
            blocks.append(("img", fig_retention(at_layer, figs / f"retention_{name}.png",
                                                f"{target} retention vs rollout step — {_label(best)} layer "
                                                f"{best['layer']}, by episode outcome")))
        d = res.details.get(int(best["id"]), {})
        if "confusion" in d:
            blocks.append(("img", fig_matrix(d["confusion"], d["labels"], d["labels"], figs / f"confusion_{name}.png",
                                             f"confusion (rows true) — {_label(best)} layer {best['layer']}", "count")))
        if "similarity" in d:
            blocks.append(("img", fig_matrix(d["similarity"], d["similarity_rows"], d["labels"],
                                             figs / f"similarity_{name}.png",
                                             f"mean predicted vs instruction embeddings — {_label(best)} layer "
                                             f"{best['layer']}", "cosine")))
        pt = [p for p in res.per_task if int(p["id"]) == int(best["id"])]
        if pt:
            blocks.append(("p", f"Per-task {best['metric_name']} at the best probe ({_label(best)}, layer "
                                f"{best['layer']}, steps {best['step']}):"))
            blocks.append(("table", ["task", "rows", best["metric_name"]],
                           [[p["task"], p["n"], _fmt(p["metric"])] for p in pt]))
    blocks.insert(2, ("h2", "Best probe per target"))
    blocks.insert(3, ("table", ["target", "split", "solver", "site", "layer", "step", "metric", "value", "95% CI",
                                "control", "selectivity", "chance", "λ", "train/test episodes"],
                      [[r["target"], r["split"], r["solver"], r["site"] + ("" if r["t"] is None else
                                                                          f" t={_num(r['t']):.2f}"),
                        r["layer"], r["step"], r["metric_name"], _fmt(r["metric"]),
                        f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", _fmt(r["control"]),
                        _fmt(r["selectivity"]), _fmt(r["chance"]), _fmt(r["lambda"], 6) if r["lambda"] is not None
                        else "–", f"{r['n_train_episodes']}/{r['n_test_episodes']}"] for r in best_rows]))
    (out / "report.md").write_text(_markdown(blocks, out))
    path = out / "report.html"
    path.write_text(_html(blocks))
    return path


def _settings(res: Results) -> str:
    c = res.meta.get("config", {})
    rows = res.rows
    pools = sorted({f"{r['site']}: " + ("pooled at capture" if r["tokens"] == "pooled" else
                                        f"positions {r['tokens']}, {r['pool']}-pooled") for r in rows})
    return (f"Store `{res.meta.get('store', '?')}`. Linear probes, features z-scored with training-episode statistics "
            f"only. Split: whole episodes held out ({c.get('test_fraction', 0.2):.0%}, stratified by task; "
            f"'tasks' rows hold out whole tasks and retrieve among held-out instructions only). Ridge λ chosen by "
            f"{c.get('n_folds', 5)}-fold episode-grouped CV on the training episodes (held-out squared error), "
            f"relative to the mean eigenvalue of the standardised gram. Control task: a random label per episode "
            f"(Hewitt & Liang), scored at the same λ; selectivity = metric − control. 95 % CIs: "
            f"{c.get('n_boot', 1000)} bootstrap resamples of test episodes. Seed {c.get('seed', 0)}. "
            f"Tokens: {'; '.join(pools)}.")


def _markdown(blocks, out: Path) -> str:
    lines = []
    for b in blocks:
        if b[0] == "h1":
            lines += [f"# {b[1]}", ""]
        elif b[0] == "h2":
            lines += [f"## {b[1]}", ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "img":
            lines += [f"![{b[1].stem}]({b[1].relative_to(out).as_posix()})", ""]
        elif b[0] == "table":
            lines += ["| " + " | ".join(map(str, b[1])) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in b[2]]
            lines.append("")
    return "\n".join(lines)


def _html(blocks) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Probe report</title><style>"
             "body{font-family:sans-serif;max-width:1000px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%}</style></head><body>"]
    for b in blocks:
        if b[0] in ("h1", "h2"):
            parts.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(b[1].stem)}' src='data:image/png;base64,{data}'></p>")
        elif b[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in b[1]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in b[2]]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
