"""Intervention overhead: a policy call with intervention hooks against the bare policy call, same inputs and noise.

Conditions, interleaved call by call (the order rotates every repeat), medians with min-max:

* bare: ``adapter.run`` with no hook;
* add: ``alpha·d`` on the VLM's text tokens at one layer (fires once per call);
* ablate: a direction projected out of the action expert at one layer (fires once per denoising step);
* clamp: 16 FFN neurons (``mlp_act``) of one VLM layer;
* all three together.

Target: <= 1.05x the bare call (ratio of medians, and the median of each repeat's ratio to its own bare call).  The model is a mid-size pi0 (~150 M parameters, the architecture of the real
one, random weights; ``bench_extract.MEDIUM``), whose compute per hook is closer to a real policy's than the
tiny test model's; ``--tiny`` uses the tiny one instead.

    python benchmarks/bench_intervene.py [--repeats 15] [--out benchmarks/out/intervene.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_extract import medium_checkpoint  # noqa: E402

from toolkit.run.samples import sample_generator  # noqa: E402
from toolkit.capture.intervention import Intervention, Steering  # noqa: E402
from toolkit.sdk.plugins import get_dataset, get_model  # noqa: E402


def conditions(adapter) -> dict[str, list[Intervention]]:
    rng = np.random.default_rng(0)
    vlm, act = adapter.experts["vlm"], adapter.experts["action"]
    mid_v, mid_a = vlm.n_layers // 2, act.n_layers // 2
    add = Intervention(f"text_only.layers.{mid_v}.resid_post", "add", 2.0, rng.normal(size=vlm.hidden_size))
    ablate = Intervention(f"action.layers.{mid_a}.resid_post", "ablate", 1.0, rng.normal(size=act.hidden_size))
    clamp = Intervention(f"vlm.layers.{mid_v}.mlp_act", "clamp", 1.0, units=tuple(range(0, 160, 10)), value=3.0)
    return {"bare": [], "add": [add], "ablate": [ablate], "clamp": [clamp], "all three": [add, ablate, clamp]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--tiny", action="store_true", help="the tiny test pi0 instead of the mid-size one")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/intervene.json"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint = None if args.tiny else medium_checkpoint(Path(tmp))
        adapter = get_model("pi0")(checkpoint=checkpoint, seed=0)
        ep = next(get_dataset("libero")().episodes())
        inputs = adapter.prepare([(ep, next(ep.steps()))])
        conds = conditions(adapter)
        steerings = {name: Steering(adapter, ivs) for name, ivs in conds.items()}
        times: dict[str, list[float]] = {name: [] for name in conds}
        names = list(conds)
        with torch.inference_mode():
            adapter.run(inputs, [sample_generator(0, 0)])  # warm-up
            for r in range(args.repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    with steerings[name] as steer:
                        steer.begin(inputs)
                        t0 = time.perf_counter()
                        adapter.run(inputs, [sample_generator(0, 0)])
                        times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["bare"])
    report = {"model": "pi0 tiny" if args.tiny else "pi0 mid-size (bench_extract.MEDIUM)", "repeats": args.repeats,
              "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              "conditions": {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                                    "ratio_vs_bare": statistics.median(t) / base,
                                    # each call against the bare call of the same repeat: robust to load drift
                                    "median_paired_ratio": statistics.median(a / b for a, b in zip(t, times["bare"]))}
                             for name, t in times.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{report['model']}, {args.repeats} interleaved repeats, load average {report['load_average']}")
    for name, c in report["conditions"].items():
        print(f"  {name:<10} median {c['median_s'] * 1e3:8.1f} ms  (min {c['min_s'] * 1e3:.1f}, max {c['max_s'] * 1e3:.1f})"
              f"  {c['ratio_vs_bare']:.3f}x bare (paired per repeat: {c['median_paired_ratio']:.3f}x)")


if __name__ == "__main__":
    main()
