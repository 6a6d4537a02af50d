"""The probe sweep: one streamed pass per layer fits every cell, target, fold and λ; a second read scores the test rows.

For each layer the engine reads the site's chunks once, accumulating per-fold statistics for every
(denoising step × rollout-step bucket) cell and every target column at once (real targets and their
control tasks side by side in one Y).  λ is chosen per target by inner grouped CV from the statistics,
the probe is refitted on all training folds, and the held-out episodes' chunks are read again to score
it.  Logistic and cosine-loss solvers need the rows themselves, so they hold one layer's selected rows in
memory (meant for the few sites whose final numbers you report).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.probe import metrics as M
from toolkit.probe.select import Resolved, Selection, resolve
from toolkit.probe.solvers import LAMBDAS, CosineOptions, Linear, RidgePath, choose_lambda, cosine_probe, \
    fit_logistic, logistic_probe
from toolkit.probe.splits import control_labels, make_split
from toolkit.probe.stats import CellStats, iter_blocks
from toolkit.probe.target import Labels, TargetData
from toolkit.store import Store, open_store

SOLVERS = ("ridge", "logistic", "cosine")


@dataclass
class ProbeConfig:
    """How to fit and score; the defaults are the honest ones (episode split, control task, CV-chosen λ)."""

    solver: str = "ridge"
    splits: tuple[str, ...] = ("auto",)  # auto = episodes, plus held-out tasks for embedding targets
    n_folds: int = 5
    test_fraction: float = 0.2
    lambdas: tuple[float, ...] = LAMBDAS
    seed: int = 0
    n_boot: int = 1000
    save_weights: str = "best"  # best | all | none
    cosine: CosineOptions = field(default_factory=CosineOptions)
    target_options: dict = field(default_factory=dict)  # e.g. encoder, encoder_path


@dataclass
class _Target:
    spec: str
    data: TargetData
    control: TargetData
    cols: slice | None = None
    ccols: slice | None = None


def build_target(spec: str, labels: Labels, options: dict) -> TargetData:
    """Instantiate a registered target (``name`` or ``name:arg``) and encode the selected rows."""
    from toolkit.plugins import get_target

    name, _, arg = spec.partition(":")
    data = get_target(name)(arg or None, **options).encode(labels)
    if data.kind not in ("classification", "embedding", "regression"):
        raise ToolkitError(f"target {spec!r} returned unknown kind {data.kind!r}")
    return data


def _subset(d: TargetData, m: np.ndarray) -> TargetData:
    return replace(d, y=None if d.y is None else d.y[m], classes=None if d.classes is None else d.classes[m],
                   index=None if d.index is None else d.index[m], valid=None)


def _control(d: TargetData, episode: np.ndarray, seed: int) -> TargetData:
    """The same label space, but one random label per episode: only memorising episodes can decode it."""
    if d.kind == "classification":
        return replace(d, classes=control_labels(episode, len(d.class_names), seed))
    if d.kind == "embedding":
        idx = control_labels(episode, len(d.candidates), seed)
        return replace(d, y=d.candidates[idx], index=idx)
    y = np.asarray(d.y, dtype=np.float32)
    eps, inv = np.unique(episode, return_inverse=True)
    noise = np.random.default_rng(seed + 7919).standard_normal((len(eps), y.shape[1])).astype(np.float32)
    return replace(d, y=y.mean(0) + noise[inv] * y.std(0))


def probe(store: Store | str, selection: Selection | None = None, targets: tuple[str, ...] | list[str] = ("task",),
          config: ProbeConfig | None = None) -> "Results":
    """Fit and score probes for one site selection; returns a tidy Results table (see ``Results.table``)."""
    from toolkit.probe.results import Results

    store = open_store(store) if not isinstance(store, Store) else store
    cfg = config or ProbeConfig()
    if cfg.solver not in SOLVERS:
        raise ToolkitError(f"unknown solver {cfg.solver!r}: use one of {', '.join(SOLVERS)}")
    res = resolve(store, selection or Selection())
    labels = Labels(store, res.rows)
    encoded = [(spec, build_target(spec, labels, cfg.target_options)) for spec in targets]
    out = Results(meta={"store": str(store.path), "config": _config_dict(cfg), "targets": list(targets)})
    groups: dict[bytes, list] = defaultdict(list)  # targets with the same labelled rows share one pass
    for spec, d in encoded:
        valid = np.ones(len(res.rows), dtype=bool) if d.valid is None else np.asarray(d.valid, dtype=bool)
        groups[np.packbits(valid).tobytes()].append((spec, d, valid))
    for members in groups.values():
        valid = members[0][2]
        if not valid.any():
            raise ToolkitError(f"target {members[0][0]!r} labels no row of the selection")
        sub = replace(res, rows=res.rows[valid], bucket=res.bucket[valid])
        sub_labels = Labels(store, sub.rows)
        for kind in _split_kinds(cfg, members, sub_labels):
            usable = [(s, _subset(d, valid)) for s, d, _ in members if not (kind == "tasks" and
                                                                          d.kind == "classification")]
            if not usable:
                raise ToolkitError("holding out tasks needs an embedding or regression target (e.g. --target "
                                   "instruction): a classifier cannot name a task it never saw")
            _run(store, sub, sub_labels, usable, kind, cfg, out)
    if not out.rows:
        raise ToolkitError("the selection is empty: no cell had both training and held-out episodes")
    return out


def _split_kinds(cfg: ProbeConfig, members, labels: Labels) -> list[str]:
    kinds: list[str] = []
    for k in cfg.splits:
        if k == "auto":
            kinds.append("episodes")
            if any(d.kind == "embedding" for _, d, _ in members) and len(np.unique(labels["task"])) >= 4:
                kinds.append("tasks")
        else:
            kinds.append(k)
    return list(dict.fromkeys(kinds))


def _config_dict(cfg: ProbeConfig) -> dict:
    return {"solver": cfg.solver, "splits": list(cfg.splits), "n_folds": cfg.n_folds,
            "test_fraction": cfg.test_fraction, "lambdas": list(cfg.lambdas), "seed": cfg.seed,
            "n_boot": cfg.n_boot, "save_weights": cfg.save_weights, "cosine": vars(cfg.cosine),
            "target_options": dict(cfg.target_options)}


def _run(store: Store, res: Resolved, labels: Labels, encoded, kind: str, cfg: ProbeConfig, out) -> None:
    episode = labels["episode"].astype(np.int64)
    task = labels["task"].astype(str)
    success = labels["success"].astype(np.int64) if "success" in store.fields() else np.full(len(episode), -1)
    split = make_split(kind, episode, task, cfg.n_folds, cfg.test_fraction, cfg.seed)
    K = split.n_folds
    tgts, parts, start = [], [], 0
    for spec, d in encoded:
        d = replace(d, info=dict(d.info))  # per-split scratch (e.g. the held-out candidate set)
        t = _Target(spec, d, replace(_control(d, episode, cfg.seed), info={}))
        y, yc = d.columns(), t.control.columns()
        t.cols, t.ccols = slice(start, start + y.shape[1]), slice(start + y.shape[1], start + 2 * y.shape[1])
        start += 2 * y.shape[1]
        parts += [y, yc]
        tgts.append(t)
    Y = np.concatenate(parts, 1).astype(np.float32)
    test_pos = np.flatnonzero(split.is_test())
    train_pos = np.flatnonzero(~split.is_test())
    nd = len(res.denoise_pos) if res.denoise_pos is not None else 1
    nb = len(res.bucket_labels)
    in_memory = cfg.solver != "ridge"
    for li, layer in enumerate(res.layers):
        cache = _read_layer(store, res, li) if in_memory else None
        cells = {(j, b): CellStats(res.n_features, Y.shape[1], K) for j in range(nd) for b in range(nb)}
        for pos, X in _blocks(store, res, li, train_pos, cache):
            grp, bkt = split.group[pos], res.bucket[pos]
            for b in np.unique(bkt):
                m = bkt == b
                yb, gb = Y[pos[m]], grp[m]
                for j in range(nd):
                    cells[(j, b)].add(X[m, j], yb, gb)
        fitted = {}
        for key, cs in cells.items():
            tot = cs.total()  # flushes the fold buffers
            if tot.n < 2 or not np.any(res.bucket[test_pos] == key[1]):
                continue
            lam, _ = choose_lambda(cs.folds, {t.spec: t.cols for t in tgts}, cfg.lambdas)
            path = RidgePath(tot)
            W, b0 = np.zeros((res.n_features, Y.shape[1])), np.zeros(Y.shape[1])
            for t in tgts:
                for cols in (t.cols, t.ccols):  # the control task is scored at the real task's λ
                    W[:, cols], b0[cols] = path.solve(lam[t.spec], cols)
            fitted[key] = (Linear(W, b0, cs.shift), lam, path)
        preds = {key: defaultdict(list) for key in fitted}
        for pos, X in _blocks(store, res, li, test_pos, cache):
            bkt = res.bucket[pos]
            for (j, b), (model, _, path) in fitted.items():
                m = bkt == b
                if not m.any():
                    continue
                P = model.predict(X[m, j])
                rec = preds[(j, b)]
                rec["pos"].append(pos[m])
                for t in tgts:
                    for name, data, cols in (("real", t.data, t.cols), ("ctrl", t.control, t.ccols)):
                        _collect(rec, f"{t.spec}/{name}", data, P[:, cols], pos[m], path.my[cols], split)
        for (j, b), rec in preds.items():
            model, lam, path = fitted[(j, b)]
            ctx = dict(res=res, layer=layer, j=j, b=b, split=split, episode=episode, task=task, success=success,
                       cfg=cfg, out=out)
            if in_memory:
                _fit_in_memory(cache, ctx, tgts, rec, lam)
            pos = np.concatenate(rec["pos"])
            for t in tgts:
                solver = rec.get(f"{t.spec}/solver", "ridge")
                w = (model.W[:, t.cols], model.b[t.cols], model.shift) if solver == "ridge" else rec[f"{t.spec}/w"]
                _emit(ctx, t, rec, pos, lam.get(t.spec), solver, w)


def _blocks(store, res, li, positions, cache):
    if cache is not None:
        yield positions, cache[positions]
    else:
        yield from iter_blocks(store, res, li, rows=positions)


def _read_layer(store, res, li) -> np.ndarray:
    parts = [(pos, X) for pos, X in iter_blocks(store, res, li)]
    out = np.empty((len(res.rows), *parts[0][1].shape[1:]), dtype=np.float32)
    for pos, X in parts:
        out[pos] = X
    return out


def _allowed(data: TargetData, split) -> np.ndarray | None:
    """Held-out tasks: retrieve among the held-out instructions only (the training ones would be free hits)."""
    if split.kind != "tasks":
        return None
    if "allowed" not in data.info:
        data.info["allowed"] = np.zeros(len(data.candidates), dtype=bool)
        data.info["allowed"][np.unique(data.index[split.is_test()])] = True
    return data.info["allowed"]


def _collect(rec, key, data: TargetData, P, pos, train_mean, split) -> None:
    """Keep per-row outcomes only (a class, or a few scores), so predictions never accumulate."""
    if data.kind == "classification":
        rec[key].append(P.argmax(1))
    elif data.kind == "embedding":
        allowed = _allowed(data, split)
        rows = M.embedding_rows(P, data.y[pos], data.index[pos], data.candidates, allowed, train_mean)
        rec[key].append(rows)
        sums = rec.setdefault(f"{key}#sum", np.zeros((len(data.candidates), P.shape[1])))
        np.add.at(sums, data.index[pos], P)
    else:
        rec[key].append(P.astype(np.float32))


def _fit_in_memory(cache, ctx, tgts, rec, lam) -> None:
    """Logistic (classification) or cosine-loss (embedding) probes on one cell's rows held in memory."""
    res, split, cfg, j, b = ctx["res"], ctx["split"], ctx["cfg"], ctx["j"], ctx["b"]
    in_b = res.bucket == b
    tr = np.flatnonzero(~split.is_test() & in_b)
    te = np.concatenate(rec["pos"])
    xtr, xte = cache[tr, j], cache[te, j]
    for t in tgts:
        d = t.data
        if cfg.solver == "logistic" and d.kind == "classification":
            pred, l2, w = logistic_probe(xtr, d.classes[tr], split.group[tr], xte, len(d.class_names), seed=cfg.seed)
            mu, sd = xtr.mean(0), xtr.std(0)
            sd[sd < 1e-8] = np.inf
            Wc, bc = fit_logistic((xtr - mu) / sd, t.control.classes[tr], len(d.class_names), l2, seed=cfg.seed)
            rec[f"{t.spec}/real"] = [pred]
            rec[f"{t.spec}/ctrl"] = [(((xte - mu) / sd) @ Wc + bc).argmax(1)]
            rec[f"{t.spec}/solver"] = "logistic"
            rec[f"{t.spec}/lambda"] = l2
            rec[f"{t.spec}/w"] = (w[:-1] / sd[:, None], w[-1] - (mu / sd) @ w[:-1], np.zeros_like(mu))
        elif cfg.solver == "cosine" and d.kind == "embedding":
            mean = d.y[tr].mean(0)
            for name, data in (("real", d), ("ctrl", t.control)):
                pred, epochs, w = cosine_probe(xtr, data.y[tr], split.group[tr], xte, cfg.cosine, seed=cfg.seed)
                rec.pop(f"{t.spec}/{name}#sum", None)
                rec[f"{t.spec}/{name}"] = []
                _collect(rec, f"{t.spec}/{name}", data, pred, te, mean, split)
                if name == "real":
                    rec[f"{t.spec}/epochs"] = epochs
                    mu, sd = xtr.mean(0), xtr.std(0)
                    sd[sd < 1e-8] = np.inf
                    rec[f"{t.spec}/w"] = (w[:-1] / sd[:, None], w[-1] - (mu / sd) @ w[:-1], np.zeros_like(mu))
            rec[f"{t.spec}/solver"] = "cosine"


def _cat_rows(parts: list[dict]) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _emit(ctx, t: _Target, rec, pos, lam, solver, weights) -> None:
    res, split, cfg, out = ctx["res"], ctx["split"], ctx["cfg"], ctx["out"]
    episode, task, success = ctx["episode"], ctx["task"], ctx["success"]
    tr = ~split.is_test() & (res.bucket == ctx["b"])
    ep, d, c = episode[pos], t.data, t.control
    real, ctrl = rec[f"{t.spec}/real"], rec[f"{t.spec}/ctrl"]
    extra: dict = {}
    if d.kind == "classification":
        pred, cpred = np.concatenate(real), np.concatenate(ctrl)
        true = d.classes[pos]
        row = M.classification_summary(pred, true, ep, d.classes[tr], len(d.class_names), cfg.n_boot, cfg.seed)
        row["control"] = M.accuracy(cpred, c.classes[pos])
        hit = (pred == true).astype(float)
        extra["confusion"] = M.confusion(pred, true, len(d.class_names)).tolist()
        extra["labels"] = d.class_names
    elif d.kind == "embedding":
        rows, crows = _cat_rows(real), _cat_rows(ctrl)
        n_cand = len(d.candidates) if split.kind != "tasks" else len(np.unique(d.index[split.is_test()]))
        row = M.embedding_summary(rows, ep, n_cand, cfg.n_boot, cfg.seed)
        row["control"] = float(crows["hit"].mean())
        hit = rows["hit"]
        sums = rec.get(f"{t.spec}/real#sum")
        if sums is not None:
            present = np.unique(d.index[pos])
            mean_pred = sums[present] / np.bincount(d.index[pos])[present][:, None]
            extra["similarity"] = (_unit(mean_pred) @ _unit(d.candidates).T).tolist()
            extra["similarity_rows"] = [d.candidate_names[i] for i in present]
            extra["labels"] = d.candidate_names
    else:
        pred, cpred = np.concatenate(real), np.concatenate(ctrl)
        mean = d.y[tr].mean(0)
        row = M.regression_summary(pred, d.y[pos], mean, ep, cfg.n_boot, cfg.seed)
        row["control"] = M.regression_summary(cpred, c.y[pos], c.y[tr].mean(0), ep, 0, cfg.seed)["r2"]
        hit = None
    row["selectivity"] = row["metric"] - row["control"]
    if hit is not None:
        for label, v in (("success", 1), ("failure", 0)):
            m = success[pos] == v
            row[f"metric_{label}"] = float(hit[m].mean()) if m.any() else float("nan")
    lam_used = rec.get(f"{t.spec}/lambda", lam)
    row_id = len(out.rows)
    base = {
        "id": row_id, "site": res.site, "expert": res.expert, "stream": res.stream, "layer": ctx["layer"],
        "denoise": None if res.denoise_pos is None else int(res.denoise_pos[ctx["j"]]),
        "t": res.t_values[ctx["j"]], "step": res.bucket_labels[ctx["b"]], "tokens": res.tokens_label,
        "pool": res.pool, "target": t.spec, "kind": d.kind, "solver": solver, "split": split.kind,
        "lambda": lam_used, "lambda_at_edge": bool(solver == "ridge" and lam_used in (cfg.lambdas[0], cfg.lambdas[-1])),
    }
    base.update(row)
    base.update({"n_train_episodes": int(len(np.unique(episode[tr]))), "n_test_episodes": int(len(np.unique(ep))),
                 "n_train": int(tr.sum()), "n_test": int(len(pos)), "n_features": res.n_features, "seed": cfg.seed})
    if f"{t.spec}/epochs" in rec:
        base["epochs"] = rec[f"{t.spec}/epochs"]
    out.add(base, extra, _per_task(d, hit, task[pos], pos), weights)


def _per_task(d: TargetData, hit, task, pos) -> list[dict]:
    if hit is None:
        return []
    return [{"task": str(name), "n": int((task == name).sum()), "metric": float(hit[task == name].mean())}
            for name in np.unique(task)]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
