"""Calibration of the probe's 95 % intervals, by simulation: coverage and null exclusion rate.

    python benchmarks/bench_calibration.py              # 4 and 16 episodes per task, ~10 minutes on 2 cores
    python benchmarks/bench_calibration.py --stores 10  # a quick look
    python benchmarks/bench_calibration.py --success-only  # the success correlation only, under a minute
    python benchmarks/bench_calibration.py --mdl-only      # the MDL interval and separation only, ~5 minutes

Stores are simulated like rollouts: 4 tasks, 8 steps per episode, 16 features, and per layer an independent
per-episode nuisance offset (so steps of one episode are correlated) plus per-step noise.  Each store holds
several layers, each an independent replicate.

* null: no task signal.  A label-blind probe's true accuracy on balanced tasks is 1/4, so the null
  exclusion rate is the share of intervals that exclude 0.25 (target ≤ 7 %).
* planted: a fixed task signal.  The estimand of K-fold cross-validation is the expected held-out accuracy
  of the same procedure trained on (K−1)/K of the episodes; it is computed here by fitting the engine's
  own nested ridge on that many fresh episodes and scoring a large fresh test set, averaged over many
  draws.  Coverage is the share of intervals containing it (target 95 % ± 3 %).

Both at 4 and at 16 episodes per task.  Results go to benchmarks/out/bench_calibration.json.

The success correlation (``toolkit.analysis.probe.success``, ``success_calibration``; under a minute, run
first; ``--success-only`` runs just it, into bench_calibration_success.json) is simulated per episode, without
stores: 4 tasks, half at one success rate and half at another, each task with its own confidence level
(aligned with its success rate, plus noise: the task-only null of a probe that reads easy tasks better).

* null: within a task, confidence is independent of success, at success rates 0.2/0.8 and 0.05/0.95.  The
  false-positive rate (share of runs with p ≤ 0.05) should be ≤ 7 %; the same data tested by a permutation
  over all episodes (the earlier statistic) shows what ignoring the task gives.
* power: successful episodes are more confident by a planted within-task difference (in units of the
  within-task standard deviation of confidence); the share of runs with p ≤ 0.05.
* coverage: the share of 95 % intervals of the within-task difference that hold the planted one (its
  task-weighted mean where it differs by task), with equal and unequal spreads of successful and failed
  episodes (target 95 % ± 3 %).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from toolkit.run.layout import COORDINATES
from toolkit.store.layout import ArraySpec
from toolkit.store.writer import StoreWriter

OUT = Path(__file__).parent / "out"
N_TASKS, STEPS, D, N_FOLDS = 4, 8, 16, 5


def world(signal: float, seed: int = 1234) -> np.ndarray:
    """Class means of one simulated world (fixed across replicates, so the estimand is one number)."""
    return np.random.default_rng(seed).standard_normal((N_TASKS, D)).astype(np.float32) * signal


def episodes(means: np.ndarray, eps_per_task: int, layers: int, rng, offset: float = 1.0):
    """(x (n, layers, D), episode, task) for eps_per_task episodes of every task, in random order."""
    n_ep = N_TASKS * eps_per_task
    ep_task = rng.permutation(np.repeat(np.arange(N_TASKS), eps_per_task))
    episode = np.repeat(np.arange(n_ep), STEPS)
    task = ep_task[episode]
    x = rng.standard_normal((len(episode), layers, D)).astype(np.float32)
    x += offset * rng.standard_normal((n_ep, layers, D)).astype(np.float32)[episode]
    x += means[task][:, None, :]
    return x, episode, task


def write_store(path: Path, means: np.ndarray, eps_per_task: int, layers: int, seed: int) -> Path:
    x, episode, task = episodes(means, eps_per_task, layers, np.random.default_rng(seed))
    n = len(episode)
    fields = {"episode": episode.astype(np.int32), "step": np.tile(np.arange(STEPS), n // STEPS).astype(np.int32),
              "task": np.array([f"task {t}" for t in task], dtype=object), "task_id": task.astype(np.int32),
              "success": (episode % 2).astype(np.int8),
              "episode_key": np.array([f"e{e}" for e in episode], dtype=object),
              "instruction": np.array([f"do task {t}" for t in task], dtype=object)}
    specs = [ArraySpec("vlm/resid_post", (layers, 1, D), "float32", ("layer", "token", "feature"),
                       chunk_inner=(1, 1, D))]
    specs += [ArraySpec(k, (), "str" if v.dtype == object else str(v.dtype), ()) for k, v in fields.items()]
    static = {"vlm/layer": (("layer",), np.arange(layers, dtype=np.int32)),
              "vlm/token": (("token",), np.array([-1], np.int32))}
    w = StoreWriter(path, mode="overwrite", codec="none")
    w.initialize({"model": {"name": "simulated", "checkpoint": None, "random_init": False}}, specs, static,
                 COORDINATES, chunk_samples=256)
    w.append({"vlm/resid_post": x[:, :, None, :], **fields})
    w.close()
    return path


def true_accuracy(means: np.ndarray, eps_per_task: int, draws: int, seed: int = 99) -> float:
    """Expected held-out accuracy of the nested ridge procedure trained on (K−1)/K of the episodes."""
    from toolkit.analysis.probe.solvers import LAMBDAS, NestedRidge
    from toolkit.analysis.probe.splits import make_folds
    from toolkit.analysis.probe.stats import FoldStats

    rng = np.random.default_rng(seed)
    train_per_task = round(eps_per_task * (N_FOLDS - 1) / N_FOLDS)  # stratified, like the outer folds
    xt, _, tt = episodes(means, 200, 1, rng)
    accs = []
    for _ in range(draws):
        x, ep, task = episodes(means, train_per_task, 1, rng)
        x = x[:, 0]
        folds = make_folds("episodes", ep, task.astype(str), N_FOLDS - 1, int(rng.integers(1 << 30)))
        fs = FoldStats(D, N_TASKS, folds.n_folds)
        fs.add(x, np.eye(N_TASKS, dtype=np.float32)[task], folds.fold)
        nr = NestedRidge(fs.finish(), {"y": np.arange(N_TASKS)}, fs.shift, LAMBDAS, prior=np.arange(N_TASKS))
        for k in range(folds.n_folds):
            nr.outer(k)
        model = nr.final()["y"].model
        accs.append(float(np.mean(model.predict(xt[:, 0]).argmax(1) == tt)))
    return float(np.mean(accs))


def run(kind: str, eps_per_task: int, n_stores: int, layers: int, truth: float, tmp: Path) -> dict:
    from toolkit.analysis.probe import ProbeConfig, Selection, probe

    means = world(0.0 if kind == "null" else SIGNAL[eps_per_task])
    inside, excl, metrics, widths = [], [], [], []
    for s in range(n_stores):
        path = write_store(tmp / f"{kind}_{eps_per_task}_{s}.zarr", means, eps_per_task, layers, seed=1000 + s)
        rows = probe(path, Selection(site="vlm"), ["task"], ProbeConfig(seed=s, mdl=False, save_weights="none")).rows
        for r in rows:
            inside.append(r["ci_low"] <= truth <= r["ci_high"])
            excl.append(not r["ci_low"] <= 1 / N_TASKS <= r["ci_high"])
            metrics.append(r["metric"])
            widths.append(r["ci_high"] - r["ci_low"])
    n = len(inside)
    cov = float(np.mean(inside))
    return {"kind": kind, "episodes_per_task": eps_per_task, "probes": n, "truth": truth,
            "coverage": cov, "coverage_se": float(np.sqrt(cov * (1 - cov) / n)),
            "null_exclusion": float(np.mean(excl)) if kind == "null" else None,
            "mean_metric": float(np.mean(metrics)), "mean_width": float(np.mean(widths))}


SIGNAL = {4: 0.45, 16: 0.3}  # task-signal scale per size: mid-range accuracies (not at the ceiling)


def success_episodes(n_sims: int, rates, eps_per_task: int, rng, effect: float = 0.0, sd_failed: float = 1.0,
                     effect_spread: float = 0.0, align: float = 1.0, spread: float = 0.5):
    """n_sims simulated runs at once: per episode (task, success (n_sims, E), confidence (n_sims, E)) and each
    run's estimand (the within-task difference, weighted as the statistic weights tasks; nan where no task
    has both outcomes).

    A task's confidence level is ``align`` × its standardised success rate + ``spread`` × N(0, 1); successful
    episodes add ``effect`` (+ ``effect_spread`` × N(0, 1) per task); the noise has sd 1 for successful
    episodes and ``sd_failed`` for failed ones."""
    rates = np.asarray(rates, np.float64)
    k = len(rates)
    task = np.repeat(np.arange(k), eps_per_task)
    succ = (rng.random((n_sims, len(task))) < rates[task]).astype(np.float64)
    z = (rates - rates.mean()) / (rates.std() or 1.0)
    level = align * z + spread * rng.standard_normal((n_sims, k))
    eff = effect + effect_spread * rng.standard_normal((n_sims, k))
    noise = rng.standard_normal(succ.shape) * np.where(succ == 1, 1.0, sd_failed)
    conf = level[:, task] + eff[:, task] * succ + noise
    ns = succ.reshape(n_sims, k, eps_per_task).sum(2)
    w = ns * (eps_per_task - ns) / eps_per_task
    with np.errstate(invalid="ignore", divide="ignore"):
        truth = (w * eff).sum(1) / w.sum(1)
    return task, succ, conf, truth


def success_scenario(n_sims: int, seed: int, rates, eps_per_task: int = 10, n_perm: int = 999,
                     across: bool = False, **kw) -> dict:
    """One simulated configuration: the share of runs flagged at p ≤ 0.05 (within task; and over all episodes
    when ``across``), the coverage of the 95 % interval of the within-task difference, the runs tested."""
    from toolkit.analysis.probe.success import success_correlation

    task, succ, conf, truth = success_episodes(n_sims, rates, eps_per_task, np.random.default_rng(seed), **kw)
    out = [success_correlation(conf[i], succ[i], task, n_perm=n_perm, seed=seed + i) for i in range(n_sims)]
    p = np.array([o["p_value"] for o in out])
    tested = np.isfinite(p)
    lo, hi = np.array([o["diff_ci_low"] for o in out]), np.array([o["diff_ci_high"] for o in out])
    inside = (lo <= truth) & (truth <= hi)
    res = {"rates": list(map(float, rates)), "episodes_per_task": eps_per_task, "runs": n_sims,
           "tested": int(tested.sum()), **{k: float(v) for k, v in kw.items()},
           "flagged": float(np.mean(p[tested] <= 0.05)) if tested.any() else float("nan"),
           "coverage": float(np.mean(inside[tested])) if tested.any() else float("nan")}
    if across:  # the earlier statistic: successes permuted over all episodes, the task ignored
        pa = np.array([success_correlation(conf[i], succ[i], None, n_perm=n_perm, seed=seed + i)["p_value"]
                       for i in range(n_sims)])
        res["flagged_across_tasks"] = float(np.mean(pa[np.isfinite(pa)] <= 0.05))
    return res


SUCCESS_POWER = {"effect": 1.0, "eps_per_task": 20}  # the planted within-task difference power is stated at


def success_calibration(n_sims: int = 500, seed: int = 0) -> dict:
    """False-positive rates (within-task null at success rates 0.2/0.8 and 0.05/0.95, with the across-task
    permutation beside them), power at the planted difference ``SUCCESS_POWER`` and a smaller one, and
    interval coverage, each over ``n_sims`` simulated runs of 4 tasks."""
    moderate, large = (0.2, 0.8, 0.2, 0.8), (0.05, 0.95, 0.05, 0.95)
    return {
        "null": [success_scenario(n_sims, seed, moderate, 10, across=True),
                 success_scenario(n_sims, seed + 1, large, 20, across=True)],
        "power": [success_scenario(n_sims, seed + 2, moderate, SUCCESS_POWER["eps_per_task"],
                                   effect=SUCCESS_POWER["effect"]),
                  success_scenario(n_sims, seed + 3, moderate, 10, effect=1.0)],
        "coverage": [success_scenario(n_sims, seed + 4, moderate, 10, effect=1.0),
                     success_scenario(n_sims, seed + 5, moderate, 10, effect=1.0, sd_failed=2.0),
                     success_scenario(n_sims, seed + 6, moderate, 10, effect=1.0, effect_spread=0.5),
                     success_scenario(n_sims, seed + 7, large, 20, effect=1.0, sd_failed=0.5)],
    }


def _print_success(cal: dict) -> None:
    for part, rows in cal.items():
        for r in rows:
            extra = f"  across tasks {r['flagged_across_tasks']:6.1%}" if "flagged_across_tasks" in r else ""
            print(f"success {part:8s} rates {'/'.join(f'{v:g}' for v in r['rates'][:2])} "
                  f"{r['episodes_per_task']:2d} ep/task  effect {r.get('effect', 0.0):g} sd_failed "
                  f"{r.get('sd_failed', 1.0):g} effect_spread {r.get('effect_spread', 0.0):g}  tested "
                  f"{r['tested']}/{r['runs']}  p ≤ 0.05: {r['flagged']:6.1%}  coverage {r['coverage']:6.1%}{extra}",
                  flush=True)


# ----------------------------------------------------------------------------- MDL: interval and separation
#
# ``mdl_calibration``: the online code's 95 % interval (``toolkit.analysis.probe.mdl``, a bootstrap over episodes
# within the blocks, given the fitted prefix probes) and how well compression separates planted from null
# stores.  Coverage is measured in memory, with the engine's own nested ridge and prefix probes: of the
# *conditional* code length (the same probes coding fresh episodes of the same blocks and task make-up, the
# interval's estimand) and of the *unconditional* one (a fresh data set, folds and probes each time, which the
# interval does not claim to cover).  Separation runs the engine on simulated stores.


def task_episodes(means: np.ndarray, tasks: np.ndarray, rng, offset: float = 1.0):
    """(x (n, D), episode, task) for one episode of each task in ``tasks`` (STEPS steps each)."""
    episode = np.repeat(np.arange(len(tasks)), STEPS)
    x = rng.standard_normal((len(episode), D)) + offset * rng.standard_normal((len(tasks), D))[episode]
    return (x + means[tasks][episode]).astype(np.float32), episode, np.asarray(tasks)[episode]


def mdl_in_memory(x: np.ndarray, episode: np.ndarray, task: np.ndarray, seed: int, n_draws: int | None = None):
    """The engine's online code on one layer held in memory: (online_code's dict, prefix probes, outer folds)."""
    from toolkit.analysis.probe.mdl import N_DRAWS, online_code
    from toolkit.analysis.probe.solvers import LAMBDAS, NestedRidge
    from toolkit.analysis.probe.splits import make_folds
    from toolkit.analysis.probe.stats import FoldStats

    folds = make_folds("episodes", episode, np.array([f"task {t}" for t in task]), N_FOLDS, seed)
    fs = FoldStats(D, N_TASKS, folds.n_folds)
    fs.add(x, np.eye(N_TASKS, dtype=np.float32)[task], folds.fold)
    cols = np.arange(N_TASKS)
    nr = NestedRidge(fs.finish(), {"y": cols}, fs.shift, LAMBDAS, prefix={"y": cols})  # intercepts: training folds
    nr.outers(final=False)
    probes = nr.prefix_probes("y")
    held = np.zeros((len(x), N_TASKS), np.float32)
    for k in range(1, folds.n_folds):
        if probes[k] is not None:
            held[folds.fold == k] = probes[k].predict(x[folds.fold == k])
    code = online_code(folds.fold, task, N_TASKS, held, episode, n_draws=N_DRAWS if n_draws is None else n_draws,
                       seed=seed)
    return code, probes, folds


def conditional_bits(means: np.ndarray, folds, probes, betas: str, rng, reps: int = 200) -> float:
    """The interval's estimand: the expected online code length of the same prefix probes at the same β on
    fresh episodes (tasks drawn as in the world, every task equally often) in blocks of the same sizes."""
    from scipy.special import log_softmax

    beta = [0.0] + [float(b) for b in betas.split(",")]
    total = 0.0
    for i in range(folds.n_folds):
        n_eps = int(np.sum(folds.fold == i)) // STEPS
        if i == 0 or probes[i] is None:
            total += n_eps * STEPS * np.log2(N_TASKS)
            continue
        x, _, y = task_episodes(means, rng.integers(0, N_TASKS, n_eps * reps), rng)
        s = beta[i] * probes[i].predict(x).astype(np.float64)
        total += float(-log_softmax(s, axis=1)[np.arange(len(y)), y].sum() / np.log(2)) / reps
    return total


def mdl_coverage(signal: float, eps_per_task: int, sets: int, seed: int = 0, reps: int = 200) -> dict:
    """Coverage of the code-length interval over ``sets`` simulated data sets of one world: of the conditional
    estimand (per set) and of the unconditional mean code length (the mean over the sets themselves)."""
    rng = np.random.default_rng(seed)
    means = world(signal)
    bits, lo, hi, cond = [], [], [], []
    for s in range(sets):
        x, episode, task = episodes(means, eps_per_task, 1, rng)
        code, probes, folds = mdl_in_memory(x[:, 0], episode, task, seed=s)
        bits.append(code["mdl_bits"])
        lo.append(code["mdl_bits_ci_low"])
        hi.append(code["mdl_bits_ci_high"])
        cond.append(conditional_bits(means, folds, probes, code["mdl_betas"], rng, reps))
    bits, lo, hi, cond = map(np.asarray, (bits, lo, hi, cond))
    uncond = bits.mean()
    c, u = np.mean((lo <= cond) & (cond <= hi)), np.mean((lo <= uncond) & (uncond <= hi))
    return {"signal": signal, "episodes_per_task": eps_per_task, "sets": sets, "uniform_bits":
            float(N_TASKS * eps_per_task * STEPS * np.log2(N_TASKS)), "mean_bits": float(uncond),
            "sd_bits": float(bits.std(ddof=1)), "mean_halfwidth": float(np.mean(hi - lo) / 2),
            "coverage_conditional": float(c), "coverage_conditional_se": float(np.sqrt(c * (1 - c) / sets)),
            "coverage_unconditional": float(u), "coverage_unconditional_se": float(np.sqrt(u * (1 - u) / sets))}


def auc(pos, neg) -> float:
    """P(a planted value > a null value) + ½ P(tie): the area under the ROC curve."""
    pos, neg = np.asarray(pos, np.float64)[:, None], np.asarray(neg, np.float64)[None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def mdl_separation(eps_per_task: int, n_stores: int, layers: int, tmp: Path) -> dict:
    """Compression of the engine's online code on ``n_stores`` planted and ``n_stores`` null stores (``layers``
    independent replicates each): the AUC of the point compression and of its interval's lower end, and how
    often the interval lies above 1."""
    from toolkit.analysis.probe import ProbeConfig, Selection, probe

    got = {}
    for kind in ("null", "planted"):
        means = world(0.0 if kind == "null" else SIGNAL[eps_per_task])
        rows = []
        for s in range(n_stores):
            path = write_store(tmp / f"mdl_{kind}_{eps_per_task}_{s}.zarr", means, eps_per_task, layers,
                               seed=5000 + s)
            rows += probe(path, Selection(site="vlm"), ["task"],
                          ProbeConfig(seed=s, save_weights="none", success=False)).rows
        got[kind] = rows

    def col(kind, key):
        return [r[key] for r in got[kind]]

    return {"episodes_per_task": eps_per_task, "signal": SIGNAL[eps_per_task], "stores_per_kind": n_stores,
            "probes_per_kind": len(got["null"]),
            "auc_compression": auc(col("planted", "compression"), col("null", "compression")),
            "auc_compression_ci_low": auc(col("planted", "compression_ci_low"), col("null", "compression_ci_low")),
            "auc_accuracy": auc(col("planted", "metric"), col("null", "metric")),
            "above_1_planted": float(np.mean(np.array(col("planted", "compression_ci_low")) > 1)),
            "above_1_null": float(np.mean(np.array(col("null", "compression_ci_low")) > 1)),
            "mean_compression_planted": float(np.mean(col("planted", "compression"))),
            "mean_compression_null": float(np.mean(col("null", "compression")))}


def mdl_calibration(n_stores: int = 20, layers: int = 6, sets: int = 200, sizes=(4, 16), seed: int = 0) -> dict:
    """Interval coverage (null and planted worlds, ``sets`` in-memory data sets each) and signal-vs-null
    separation (``n_stores`` stores of ``layers`` layers per kind) at each size in episodes per task."""
    out = {"coverage": [], "separation": []}
    for e in sizes:
        for signal in (0.0, SIGNAL[e]):
            out["coverage"].append(mdl_coverage(signal, e, sets, seed=seed + e))
    with tempfile.TemporaryDirectory() as tmp:
        for e in sizes:
            out["separation"].append(mdl_separation(e, n_stores, layers, Path(tmp)))
    return out


def _print_mdl(cal: dict) -> None:
    for r in cal["coverage"]:
        print(f"mdl coverage  signal {r['signal']:.2f} {r['episodes_per_task']:2d} ep/task  {r['sets']} sets  "
              f"bits {r['mean_bits']:.0f} ± {r['sd_bits']:.0f} (uniform {r['uniform_bits']:.0f}), half-width "
              f"{r['mean_halfwidth']:.0f}  conditional {r['coverage_conditional']:6.1%}  unconditional "
              f"{r['coverage_unconditional']:6.1%}", flush=True)
    for r in cal["separation"]:
        print(f"mdl separation {r['episodes_per_task']:2d} ep/task  {r['stores_per_kind']} stores × "
              f"{r['probes_per_kind'] // max(1, r['stores_per_kind'])} layers per kind  AUC compression "
              f"{r['auc_compression']:.3f}  AUC interval low end {r['auc_compression_ci_low']:.3f}  (AUC accuracy "
              f"{r['auc_accuracy']:.3f})  interval above 1: planted {r['above_1_planted']:6.1%} null "
              f"{r['above_1_null']:6.1%}", flush=True)


def _mdl_main(args) -> None:
    t0 = time.perf_counter()
    cal = mdl_calibration(args.mdl_stores, args.layers, args.mdl_sets,
                          tuple(int(v) for v in args.sizes.split(",") if v))
    _print_mdl(cal)
    OUT.mkdir(exist_ok=True)
    info = {"mdl": cal, "seconds": time.perf_counter() - t0, "args": vars(args)}
    (OUT / "bench_calibration_mdl.json").write_text(json.dumps(info, indent=1))
    print(f"{info['seconds']:.0f} s; wrote {OUT / 'bench_calibration_mdl.json'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", type=int, default=60, help="simulated stores per configuration")
    ap.add_argument("--layers", type=int, default=6, help="independent replicates (layers) per store")
    ap.add_argument("--sizes", default="4,16", help="episodes per task")
    ap.add_argument("--success-runs", type=int, default=2000, help="simulated runs per success configuration")
    ap.add_argument("--success-only", action="store_true", help="only the success-correlation section")
    ap.add_argument("--mdl-only", action="store_true", help="only the MDL section (interval coverage, separation)")
    ap.add_argument("--mdl-stores", type=int, default=20, help="MDL separation: stores per kind (planted, null)")
    ap.add_argument("--mdl-sets", type=int, default=300, help="MDL coverage: simulated data sets per world")
    args = ap.parse_args()
    if args.mdl_only:
        return _mdl_main(args)
    load = os.getloadavg()
    out = []
    t0 = time.perf_counter()
    success = success_calibration(args.success_runs, seed=0)
    _print_success(success)
    with tempfile.TemporaryDirectory() as tmp:
        if args.success_only:
            args.sizes = ""
        for e in (int(v) for v in args.sizes.split(",") if v):
            truth = true_accuracy(world(SIGNAL[e]), e, draws=200)
            for kind in ("null", "planted"):
                r = run(kind, e, args.stores, args.layers, 1 / N_TASKS if kind == "null" else truth, Path(tmp))
                out.append(r)
                excl = "" if r["null_exclusion"] is None else f"  null excludes chance {r['null_exclusion']:6.1%}"
                print(f"{kind:8s} {e:3d} episodes/task  {r['probes']:4d} probes  truth {r['truth']:.3f}  "
                      f"mean {r['mean_metric']:.3f}  width {r['mean_width']:.3f}  coverage {r['coverage']:6.1%} "
                      f"(± {r['coverage_se']:.1%}){excl}", flush=True)
    OUT.mkdir(exist_ok=True)
    info = {"results": out, "success": success, "load_average_start": load, "load_average_end": os.getloadavg(),
            "seconds": time.perf_counter() - t0, "args": vars(args)}
    name = "bench_calibration_success.json" if args.success_only else "bench_calibration.json"
    (OUT / name).write_text(json.dumps(info, indent=1))
    print(f"load average {load[0]:.2f} → {os.getloadavg()[0]:.2f}; {info['seconds']:.0f} s; wrote {OUT / name}")


if __name__ == "__main__":
    main()
