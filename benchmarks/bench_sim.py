"""Live LIBERO rollouts: simulator steps/s with and without capture, measured in the same run.

Three ways to run the same episode (one libero_object task, init state 0, the same seed), the
environment created once beforehand and reused (every episode re-seeds, resets and sets its init state):

* ``sim only``   - the environment stepped with fixed random actions: no policy (rendering + physics);
* ``bare loop``  - the closed loop without capture: the policy (prepare + run) queried every
                   ``replan`` steps, its chunk executed; no hooks, nothing stored;
* ``extract``    - ``toolkit.run.pipeline`` over the same episode: hooks on every layer of every site,
                   every policy call captured (stride 1, the worst case) and written to a store;
                   timed from the episode's reset to the store's final commit (building the model and
                   importing the simulator lie before and are not counted).

Rates are environment steps (settle steps included) per second of the whole episode (reset included).
Target: ``extract`` within a few percent of ``bare loop`` (capture invisible next to rendering).

    python benchmarks/bench_sim.py [--steps 60] [--resolution 256] [--repeats 2] [--out benchmarks/out/sim.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import toolkit
from toolkit.run.samples import call_generator, iter_closed_loop
from toolkit.run.spec import RunSpec
from toolkit.sdk.plugins import get_model, plugin_manager, registry

SUITE, TASK = "libero_object", 0


def _dataset_cls():
    if "libero-sim" not in registry()["dataset"]:  # a checkout whose installed metadata predates the plugin
        import toolkit_plugins.libero_sim as plugin

        plugin_manager().register(plugin, name="libero_sim")
        registry.cache_clear()
    return registry()["dataset"]["libero-sim"].obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="environment steps per episode (after settling)")
    ap.add_argument("--replan", type=int, default=5)
    ap.add_argument("--settle", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/sim.json")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    cls = _dataset_cls()
    options = dict(suite=SUITE, tasks=str(TASK), trials=1, max_steps=args.steps, replan_steps=args.replan,
                   settle_steps=args.settle, resolution=args.resolution, seed=0)
    env_steps = args.steps + args.settle  # the random policy never succeeds this early
    adapter = get_model("pi0")()

    t = time.perf_counter()
    ds = cls(**options)
    ds._env(TASK)  # create the environment once, outside every timing
    create_s = time.perf_counter() - t

    def sim_only() -> float:
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        for ep in ds.episodes():
            for step in ep.steps():
                ds.feedback(ep, step, rng.uniform(-1, 1, (args.replan, 7)))
        return time.perf_counter() - t

    def bare_loop() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for s in iter_closed_loop(ds, RunSpec()):
                if not hasattr(s, "step"):
                    continue  # EpisodeEnd
                inputs = adapter.prepare([(s.episode, s.step)])
                out = adapter.run(inputs, [call_generator(0, s.episode_index, s.call)])
                ds.feedback(s.episode, s.step, np.asarray(out.actions)[0])
        return time.perf_counter() - t

    rollout = cls._rollout
    started: list[float] = []

    def timed_rollout(self, *a, **kw):
        started.append(time.perf_counter())  # the episode starts (reset): model building etc. lie before it
        yield from rollout(self, *a, **kw)

    def extract() -> float:
        tmp = Path(tempfile.mkdtemp(prefix="bench_sim_"))
        started.clear()
        cls._rollout = timed_rollout
        try:
            toolkit.extract(model="pi0", dataset="libero-sim", store=tmp / "s.zarr", layers="all",
                            stride=1, seed=0, dataset_options=dict(options))
            return time.perf_counter() - started[0]  # the episode, capture, and the store's last write + commit
        finally:
            cls._rollout = rollout
            shutil.rmtree(tmp, ignore_errors=True)

    runs: dict[str, list[float]] = {"sim only": [], "bare loop": [], "extract": []}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every variant alike
        runs["sim only"].append(sim_only())
        runs["bare loop"].append(bare_loop())
        runs["extract"].append(extract())
    best = {k: min(v) for k, v in runs.items()}
    rate = {k: env_steps / v for k, v in best.items()}
    calls = -(-args.steps // args.replan)
    results = {
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(),
                    "mujoco_gl": ds.describe()["env"]["MUJOCO_GL"]},
        "episode": {"suite": SUITE, "task": TASK, "env_steps": env_steps, "policy_calls": calls,
                    "resolution": args.resolution, "cameras": 2, "replan_steps": args.replan,
                    "model": "pi0 (tiny random)", "capture": "all sites, all layers, every call (stride 1)"},
        "env_create_s": round(create_s, 2),
        "seconds": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "env_steps_per_s": {k: round(v, 2) for k, v in rate.items()},
        "capture_overhead": round(best["extract"] / best["bare loop"], 3),
        "policy_share": round(1 - best["sim only"] / best["bare loop"], 3),
    }
    print(f"\nLIBERO {SUITE} task {TASK}: {env_steps} env steps, {calls} policy calls, two {args.resolution}px cameras, "
          f"MUJOCO_GL={results['machine']['mujoco_gl']}, best of {args.repeats}")
    print(f"{'variant':<12} {'seconds':>8} {'env steps/s':>12}")
    for k in runs:
        print(f"{k:<12} {best[k]:>8.2f} {rate[k]:>12.2f}")
    print(f"capture + store overhead (extract / bare loop): {results['capture_overhead']:.3f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
