"""Peak host memory of loading an OpenVLA checkpoint: the native meta-device, shard-by-shard loader against the
plain way (build the model with random weights, read every shard, copy in).

    python benchmarks/bench_openvla_load.py            # ~1-2 minutes on 2 cores
    python benchmarks/bench_openvla_load.py --layers 4 # smaller

A checkpoint in openvla-7b's layout (config.json, 3 bf16 shards + index) is written at a middle size (Llama
width 1024, vocabulary 32064; small ViTs), then each way loads it in bf16 in a fresh process, interleaved,
several times.  The figure is the peak resident memory above the process's resident memory just before
loading (after imports), in units of the checkpoint's size on disk: ~1 means each weight exists once; the
plain way needs ~2 (model + file tensors).  Results go to benchmarks/out/bench_openvla_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "out"

CHILD = r"""
import json, resource, sys, psutil, torch
from pathlib import Path
from toolkit_plugins.openvla import OpenVLAAdapter
from toolkit_plugins.openvla.loading import read_config
from toolkit_plugins.openvla.model import PrismaticConfig, build_random
from toolkit.sdk.checkpoint import load_state_dict_files
way, ckpt = sys.argv[1], Path(sys.argv[2])
config = PrismaticConfig(read_config(ckpt))
before = psutil.Process().memory_info().rss
if way == "native":
    OpenVLAAdapter(checkpoint=str(ckpt), dtype="bfloat16", unnorm_key="bridge_orig")
else:  # the plain way: a randomly initialised model, then every tensor of every shard copied in
    model = build_random(config, 0, torch.bfloat16)
    model.load_state_dict(load_state_dict_files(ckpt))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra_bytes": peak - before}))
"""


def write_checkpoint(path: Path, layers: int) -> int:
    """A mid-size checkpoint in the real layout; returns its bytes on disk."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    import torch
    from test_openvla_checkpoint import NORM_STATS

    from toolkit_plugins.openvla.model import TINY_CONFIG, PrismaticConfig, build_random

    raw = {**TINY_CONFIG, "norm_stats": NORM_STATS,
           "text_config": {**TINY_CONFIG["text_config"], "hidden_size": 1024, "intermediate_size": 2816,
                           "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16}}
    from safetensors.torch import save_file

    from toolkit.sdk.hf import llama_tokenizer

    model = build_random(PrismaticConfig(raw), 0, torch.bfloat16)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = list(sd)
    parts = [keys[i * len(keys) // 3:(i + 1) * len(keys) // 3] for i in range(3)]
    weight_map = {}
    path.mkdir(parents=True)
    for i, part in enumerate(parts, 1):
        name = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: sd[k] for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(raw))
    llama_tokenizer().save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="Llama layers of the checkpoint")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "ckpt"
        size = write_checkpoint(ckpt, args.layers)
        runs: dict[str, list[float]] = {"native": [], "plain": []}
        for _ in range(args.repeats):
            for way in runs:
                out = subprocess.run([sys.executable, "-c", CHILD, way, str(ckpt)], capture_output=True, text=True,
                                     env=env, check=True).stdout.strip().splitlines()[-1]
                runs[way].append(json.loads(out)["extra_bytes"] / size)
    result = {"checkpoint_mb": round(size / 2**20, 1), "load_average": os.getloadavg(),
              **{way: {"median": round(statistics.median(v), 2), "min": round(min(v), 2), "max": round(max(v), 2)}
                 for way, v in runs.items()}}
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_openvla_load.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
