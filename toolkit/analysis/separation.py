"""Expert separation: how alike are the VLM expert's and the action expert's hidden states at matched layers?

For pi0 (seeds 001/002): the VLM runs the prefix (images, instruction) once per policy call; the action expert
runs the suffix (state, noisy actions) once per denoising step, reading the VLM's cache layer by layer.  Per
layer present in both sites, per token span of each site, and per denoising step, over every sample of a store:

The default measures are centred (``MEASURES["centred"]``):

* ``cka``: linear CKA (Kornblith et al. 2019) between the samples' VLM vectors X (n, d_vlm) and action vectors
  Y (n, d_act): ||Ycᵀ Xc||²_F / (||Xcᵀ Xc||_F ||Ycᵀ Yc||_F) on mean-centred columns; any two widths, invariant
  to rotation, isotropic scale and a constant offset;
* ``cosine_centred``: the cosine of each sample's pair after subtracting each expert's mean over the samples,
  cos(x_i − x̄, y_i − ȳ), averaged: only where both experts have one width (real pi0: 2048 vs 1024, so CKA
  alone), NaN otherwise.

Raw ``cosine`` and ``l2`` (each sample's pair as stored, averaged; one width only) stay in every row and are
written with ``measure="raw"`` or ``"all"`` (``--measure``), but are not the default: they are dominated by the
experts' mean vectors.  A constant offset such as a bias or a norm's shift, shared by both experts, makes raw
cosine near 1 (and moves L2) with no shared structure between the samples; centring removes it (``WHY_CENTRED``).

A span's vector is the mean of the stored tokens inside it (stores that pooled at capture give one vector,
named after the site's token selection).  Everything is streamed chunk by chunk from sums (n, Σx, Σy, XᵀX,
YᵀY, YᵀX, and the raw per-sample cosines and distances), so memory does not grow with the store; the centred
cosine needs the means first, so same-width pairs take a second pass over the store.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import store_layers
from toolkit.store.codecs import decode
from toolkit.store.reader import open_store, Store


MEASURES = {"centred": ("cka", "cosine_centred"), "raw": ("cosine", "l2"),
            "all": ("cka", "cosine_centred", "cosine", "l2")}
WHY_CENTRED = ("raw cosine and L2 are dominated by the experts' mean vectors: a constant offset such as a bias or "
               "a norm's shift makes raw cosine high with no shared structure; centring (each expert's mean "
               "subtracted) removes it")


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two (n, d) matrices in memory (the reference the streamed sums are checked against)."""
    acc = PairSums(x.shape[1], y.shape[1], 1)
    acc.update(x, y[:, None])
    return float(acc.cka()[0])


def centred_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Mean over rows of cos(x_i − x̄, y_i − ȳ) for two (n, d) matrices of one width, in memory."""
    acc = PairSums(x.shape[1], y.shape[1], 1)
    acc.update(x, y[:, None])
    acc.update_centred(x, y[:, None])
    return float(acc.centred_cosine()[0])


def _row_cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, T): cos(x_i, y_it); 0 where either vector is zero."""
    nx = np.linalg.norm(x, axis=1)[:, None]
    ny = np.linalg.norm(y, axis=2)
    return np.einsum("nd,ntd->nt", x, y) / np.maximum(nx * ny, 1e-30)


class PairSums:
    """Streamed sums for CKA, cosine and L2 between rows x (n, dx) and y (n, T, dy): one x, T partners each.

    ``update`` over every chunk gives CKA, raw cosine and L2; then ``update_centred`` over the same chunks (the
    means are final only after the first pass) gives the centred cosine."""

    def __init__(self, dx: int, dy: int, n_t: int):
        self.n = 0
        self.sx, self.sy = np.zeros(dx), np.zeros((n_t, dy))
        self.xx, self.yy, self.yx = np.zeros((dx, dx)), np.zeros((n_t, dy, dy)), np.zeros((n_t, dy, dx))
        self.same_width = dx == dy
        self.cos, self.l2 = np.zeros(n_t), np.zeros(n_t)
        self.n_centred, self.ccos = 0, np.zeros(n_t)

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.yy += np.einsum("ntd,nte->tde", y, y)
        self.yx += np.einsum("ntd,ne->tde", y, x)
        if self.same_width:
            self.cos += _row_cosines(x, y).sum(0)
            self.l2 += np.linalg.norm(y - x[:, None], axis=2).sum(0)

    def update_centred(self, x: np.ndarray, y: np.ndarray) -> None:
        """Second pass (same-width pairs): each row minus its expert's mean over all ``update`` rows."""
        if not self.same_width:
            return
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        self.n_centred += len(x)
        self.ccos += _row_cosines(x - self.sx / self.n, y - (self.sy / self.n)[None]).sum(0)

    def cka(self) -> np.ndarray:
        n = self.n
        mx, my = self.sx / n, self.sy / n
        cxx = self.xx - n * np.outer(mx, mx)
        out = np.empty(len(my))
        for t in range(len(my)):
            cyy = self.yy[t] - n * np.outer(my[t], my[t])
            cyx = self.yx[t] - n * np.outer(my[t], mx)
            den = np.linalg.norm(cxx) * np.linalg.norm(cyy)
            out[t] = (cyx ** 2).sum() / den if den > 0 else np.nan
        return out

    def cosine(self) -> np.ndarray:
        return self.cos / self.n if self.same_width else np.full(len(self.cos), np.nan)

    def centred_cosine(self) -> np.ndarray:
        """NaN across widths, or before the second pass has seen every row."""
        if not self.same_width or not self.n or self.n_centred != self.n:
            return np.full(len(self.ccos), np.nan)
        return self.ccos / self.n

    def distance(self) -> np.ndarray:
        return self.l2 / self.n if self.same_width else np.full(len(self.l2), np.nan)


@dataclass(frozen=True)
class Span:
    name: str
    index: np.ndarray  # positions along the stored token axis


def site_spans(store: Store, site: str) -> list[Span]:
    """The site's token spans that the store kept: each named span with stored tokens in it, and ``all``."""
    tokens = np.asarray(store.static(f"{site}/token"))
    if len(tokens) == 1 and tokens[0] == -1:  # pooled at capture: one vector, named by its token selection
        spec = next((s.get("tokens") for s in (store.attrs.get("capture") or {}).get("sites", [])
                     if s.get("site") == site), None)
        return [Span(f"pooled:{spec or 'all'}", np.array([0]))]
    out = [Span("all", np.arange(len(tokens)))]
    for name, bounds in (store.root[site].attrs.get("spans") or {}).items():
        if not bounds:
            continue
        inside = np.flatnonzero((tokens >= bounds[0]) & (tokens < bounds[1]))
        if len(inside) and len(inside) != len(tokens):
            out.append(Span(name, inside))
    return out


def _is_action(store: Store, site: str, stream: str) -> bool:
    dims = tuple(store.array(site, stream).metadata.dimension_names or ())
    return "denoise" in dims or store.root[site].attrs.get("expert") == "action"


def expert_separation(store: str | Path | Store, vlm_sites: list[str] | None = None,
                      action_sites: list[str] | None = None, layers: Any = None, stream: str = "resid_post",
                      measure: str = "centred") -> list[dict]:
    """Tidy rows: one per layer × VLM site/span × action site/span × denoising step (see the module docstring).

    Every row holds ``cka``, ``cosine_centred``, and the raw ``cosine`` and ``l2``; ``measure="raw"`` skips the
    centred cosine's second pass (it is NaN then).  Which of them are written is ``save``'s ``measure``."""
    _check_measure(measure)
    s = store if isinstance(store, Store) else open_store(store)
    have = [site for site in s.sites if stream in s.streams(site)]
    if action_sites is None:
        action_sites = [site for site in have if _is_action(s, site, stream)]
    if vlm_sites is None:
        vlm_sites = [site for site in have if site not in action_sites]
    for site in [*vlm_sites, *action_sites]:
        if site not in have:
            raise ToolkitError(f"{s.path} has no site {site!r} with stream {stream!r}; sites: {', '.join(have) or 'none'}")
    if not vlm_sites or not action_sites:
        raise ToolkitError(f"{s.path} needs a VLM-expert site and an action-expert site holding {stream!r} "
                           f"(it has: {', '.join(have) or 'none'}); capture both, e.g. --sites vlm,action")
    rows = []
    for vs in vlm_sites:
        for acs in action_sites:
            rows += _site_pair(s, vs, acs, stream, layers, centred=measure != "raw")
    return rows


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ToolkitError(f"unknown separation measure {measure!r}; measures: {', '.join(MEASURES)}")


def _site_pair(s: Store, vs: str, acs: str, stream: str, layers: Any, centred: bool = True) -> list[dict]:
    common = [v for v in store_layers(s, vs, layers) if v in s.layers(acs)] if layers is not None else \
        [v for v in s.layers(vs) if v in s.layers(acs)]
    if not common:
        raise ToolkitError(f"sites {vs!r} (layers {s.layers(vs)}) and {acs!r} (layers {s.layers(acs)}) share no "
                           "layer of the selection: capture matched layers of both experts")
    va, aa = s.array(vs, stream), s.array(acs, stream)
    v_spans, a_spans = site_spans(s, vs), site_spans(s, acs)
    denoising = "denoise" in tuple(aa.metadata.dimension_names or ())
    n_t = aa.shape[2] if denoising else 1
    t_values = [float(v) for v in s.static(f"{acs}/t")] if f"{acs}/t" in s.root else [math.nan] * n_t
    step = int(min(va.chunks[0], aa.chunks[0]))
    rows = []
    for layer in common:
        lv, la = s.layers(vs).index(layer), s.layers(acs).index(layer)
        sums = {(i, j): PairSums(va.shape[-1], aa.shape[-1], n_t) for i in range(len(v_spans))
                for j in range(len(a_spans))}
        def chunks():
            for a in range(0, s.n_samples, step):
                b = min(s.n_samples, a + step)
                x = np.asarray(decode(va[a:b, lv], va.attrs.get("stored_dtype")), np.float64)  # (n, token, F)
                y = np.asarray(decode(aa[a:b, la], aa.attrs.get("stored_dtype")), np.float64)  # (n, [T,] token, F)
                y = y if denoising else y[:, None]
                yield [x[:, sp.index].mean(1) for sp in v_spans], [y[:, :, sp.index].mean(2) for sp in a_spans]

        for xs, ys in chunks():
            for (i, j), acc in sums.items():
                acc.update(xs[i], ys[j])
        if centred and va.shape[-1] == aa.shape[-1]:  # the centred cosine: a second pass, with the final means
            for xs, ys in chunks():
                for (i, j), acc in sums.items():
                    acc.update_centred(xs[i], ys[j])
        for (i, j), acc in sums.items():
            cka, ccos, cos, l2 = acc.cka(), acc.centred_cosine(), acc.cosine(), acc.distance()
            for t in range(n_t):
                rows.append({"layer": layer, "vlm_site": vs, "vlm_span": v_spans[i].name, "action_site": acs,
                             "action_span": a_spans[j].name, "denoise": t if denoising else None,
                             "t": t_values[t] if denoising else None, "cka": float(cka[t]),
                             "cosine_centred": float(ccos[t]), "cosine": float(cos[t]), "l2": float(l2[t]),
                             "n_samples": acc.n, "vlm_width": va.shape[-1], "action_width": aa.shape[-1]})
    return rows


KEYS = ["layer", "vlm_site", "vlm_span", "action_site", "action_span", "denoise", "t"]
TAIL = ["n_samples", "vlm_width", "action_width"]
COLUMNS = [*KEYS, *MEASURES["all"], *TAIL]
LABELS = {"cka": "linear CKA", "cosine_centred": "centred cosine", "cosine": "raw cosine", "l2": "raw L2"}


def columns(measure: str = "centred") -> list[str]:
    """The table's columns for one choice of measures."""
    _check_measure(measure)
    return [*KEYS, *MEASURES[measure], *TAIL]


def measure_note(measure: str = "centred") -> str:
    """One line: which measures, and why the default is centred."""
    shown = ", ".join(LABELS[m] for m in MEASURES[measure])
    if measure == "raw":
        return f"measures: {shown}. Caution: {WHY_CENTRED} (the default, --measure centred: CKA, centred cosine)"
    return f"measures: {shown}. Centred by default because {WHY_CENTRED}" + (
        " (--measure raw or all for raw cosine and L2)" if measure == "centred" else "")


def save(rows: list[dict], out: Path, store: str, figures: bool = True, measure: str = "centred") -> list[Path]:
    """separation.csv / .json with the measure's columns, one figure per layer (each measure against the
    denoising step)."""
    cols = columns(measure)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "separation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r[k] is None or (isinstance(r[k], float) and math.isnan(r[k])) else r[k]
                        for k in cols})
    clean = [{k: None if isinstance(r[k], float) and not math.isfinite(r[k]) else r[k] for k in cols} for r in rows]
    (out / "separation.json").write_text(json.dumps({"store": store, "measure": measure,
                                                     "measures": list(MEASURES[measure]),
                                                     "note": measure_note(measure), "rows": clean}, indent=1))
    return _figures(rows, out, MEASURES[measure]) if figures else []


def summary_lines(rows: list[dict], measure: str = "centred") -> list[str]:
    """One line per layer and site pair (whole spans): each measure's range (min..max) over the denoising
    steps."""
    names = MEASURES[measure]
    lines = [f"{'layer':>5}  {'vlm site/span':<24} {'action site/span':<24} "
             + " ".join(f"{LABELS[m]:>16}" for m in names) + "   (min..max over denoising steps)"]
    groups: dict[tuple, list[dict]] = {}
    whole = lambda name: name == "all" or name.startswith("pooled:")  # noqa: E731 - every stored token
    for r in rows:
        if whole(r["vlm_span"]) and whole(r["action_span"]):
            groups.setdefault((r["layer"], r["vlm_site"], r["vlm_span"], r["action_site"], r["action_span"]),
                              []).append(r)

    def span(vals: list[float]) -> str:
        ok = [v for v in vals if math.isfinite(v)]
        if not ok:
            return "nan"
        lo, hi = min(ok), max(ok)
        return f"{lo:.3f}" if math.isclose(lo, hi, abs_tol=5e-4) else f"{lo:.3f}..{hi:.3f}"

    for (layer, vs, vsp, acs, asp), rs in groups.items():
        lines.append(f"{layer:>5}  {(vs + '/' + vsp)[:24]:<24} {(acs + '/' + asp)[:24]:<24} "
                     + " ".join(f"{span([r[m] for r in rs]):>16}" for m in names))
    return lines


def _figures(rows: list[dict], out: Path, measures: tuple[str, ...] = MEASURES["centred"]) -> list[Path]:
    from toolkit.analysis.figures import pyplot, save_figure

    plt = pyplot()
    made = []
    for layer in sorted({r["layer"] for r in rows}):
        mine = [r for r in rows if r["layer"] == layer]
        fig, axes = plt.subplots(1, len(measures), figsize=(4.4 * len(measures), 3.8), squeeze=False)
        axes = axes[0]
        pairs = list(dict.fromkeys((r["vlm_site"], r["vlm_span"], r["action_site"], r["action_span"]) for r in mine))
        for metric, ax in zip(measures, axes):
            for p in pairs:
                series = [r for r in mine if (r["vlm_site"], r["vlm_span"], r["action_site"], r["action_span"]) == p]
                x = [r["denoise"] if r["denoise"] is not None else 0 for r in series]
                ax.plot(x, [r[metric] for r in series], marker="o", label=f"{p[0]}/{p[1]} vs {p[2]}/{p[3]}")
            ax.set(xlabel="denoising step", ylabel=LABELS[metric], title=f"layer {layer}: {LABELS[metric]}")
            ax.grid(alpha=0.3)
            if metric != "cka" and all(math.isnan(r[metric]) for r in mine):
                ax.text(0.5, 0.5, "experts differ in width:\nundefined", ha="center", transform=ax.transAxes)
        axes[0].legend(fontsize=6)
        made.append(save_figure(fig, out / f"separation_layer{layer}.png"))
    return made
