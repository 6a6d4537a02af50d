"""Export a store to the per-episode / per-step folder layout of the researchers' OpenVLA cache script.

    OUT/
      <episode key>/                      e.g. train_episode_000000 ("/" and other odd characters -> "_")
        step_0000/
          llm.layers.0.resid_post.npy     one file per site, layer and stream, named by its hook name:
          llm.layers.0.resid_pre.npy      (token, feature) or (denoise, token, feature)
          embedding.layers.0.resid_post.npy
          step_metadata.json              episode id, step index, instruction, keys used, layers, positions,
                                          shapes, the dataset's action (and the policy's)
          pca_step_visualization.png      with --visualize: PCA of the step's embeddings across layers
        pca_episode_visualization.png     with --visualize: every step of the episode, coloured by layer

The seed's names map onto hook names: ``layer_5_residual_output`` = ``llm.layers.5.resid_post``,
``layer_5_residual_input`` = ``llm.layers.5.resid_pre``, ``layer_L0_embedding_embedding_output`` =
``embedding.layers.0.resid_post``.  The folder is written under a temporary name and renamed into place,
so an error leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import store_hooks, store_layers
from toolkit.analysis.figures import pyplot, save_figure
from toolkit.analysis.stats import pca2
from toolkit.store.layout import jsonable
from toolkit.store.reader import open_store

FORMATS = ("npy", "pt")
SEED_NAMES = {"resid_post": "residual_output", "resid_pre": "residual_input"}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "episode"


def export(store: str | Path, out: str | Path, format: str = "npy", sites: list[str] | None = None,
           streams: list[str] | None = None, layers: str | None = None, visualize: bool = False,
           overwrite: bool = False, hooks: list[str] | None = None) -> Path:
    """Write ``store`` as per-episode/per-step files into ``out``; returns ``out``.  ``hooks`` (hook names with
    globs, ``toolkit.sdk.names``) choose sites, streams and layers instead of ``sites``/``streams``/``layers``."""
    if format not in FORMATS:
        raise ToolkitError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    s = open_store(store)
    if s.n_samples == 0:
        raise ToolkitError(f"{store} holds no samples: nothing to export")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ToolkitError(f"{out} already exists: pass --overwrite to replace it")
    if hooks and (sites or streams or layers):
        raise ToolkitError("give either --hook or --site/--stream/--layer, not both")
    chosen_sites = [] if hooks else list(sites) if sites else s.sites
    for site in chosen_sites:
        s._check_site(site)  # one-line error naming the sites
    plan: list[tuple[str, str, list[int]]] = [(p.site, st, list(p.layers)) for p in
                                              store_hooks(s, hooks or []).values() for st in p.streams]
    for site in chosen_sites:
        offered = s.streams(site)
        picked = [st for st in (streams or offered) if st in offered]
        if streams and not picked:
            raise ToolkitError(f"site {site!r} has none of the streams {', '.join(streams)}; it has {', '.join(offered)}")
        for st in picked:
            plan.append((site, st, store_layers(s, site, layers)))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write(s, tmp, format, plan, visualize)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(s, root: Path, format: str, plan, visualize: bool) -> None:
    n = s.n_samples
    keys, steps, eps = s.coord("episode_key"), s.coord("step"), s.coord("episode")
    fields = set(s.fields())
    instr = s.coord("instruction") if "instruction" in fields else np.array([""] * n)
    task = s.coord("task") if "task" in fields else None
    dataset_action = s.coord("dataset_action") if "dataset_action" in fields else None
    policy_action = s.coord("policy_action") if "policy_action" in fields else None
    dataset = s.attrs.get("dataset") or {}
    keys_used = dataset.get("keys") or dataset.get("options") or {}
    folders: dict[str, str] = {}
    step_dirs = []
    for i in range(n):
        key = str(keys[i])
        if key not in folders:
            name = _safe(key)
            folders[key] = name if name not in folders.values() else f"{name}_{int(eps[i])}"
        step_dirs.append(root / folders[key] / f"step_{int(steps[i]):04d}")
    for d in set(step_dirs):
        d.mkdir(parents=True, exist_ok=True)
    shapes: list[dict[str, list[int]]] = [{} for _ in range(n)]
    pooled: list[dict[str, list[np.ndarray]]] = [{} for _ in range(n)]  # (site/stream) -> per-layer vectors
    for site, stream, layer_list in plan:
        for layer in layer_list:
            values = s.read(site, stream, layer=layer)  # (sample, [denoise,] token, feature)
            name = f"{site}.layers.{layer}.{stream}"
            for i in range(n):
                v = np.ascontiguousarray(values[i])
                path = step_dirs[i] / f"{name}.{format}"
                if format == "npy":
                    np.save(path, v)
                else:
                    import torch
                    torch.save(torch.from_numpy(v.copy()), path)
                shapes[i][name] = list(v.shape)
                if visualize:
                    pooled[i].setdefault(f"{site}/{stream}", []).append(v.reshape(-1, v.shape[-1]).mean(0))
    layers_by_site: dict[str, list[int]] = {}
    for site, _, layer_list in plan:
        layers_by_site.setdefault(site, layer_list)
    positions = {site: [int(t) for t in s.static(f"{site}/token")] for site in layers_by_site}
    capture = {c.get("site"): c for c in ((s.attrs.get("capture") or {}).get("sites") or [])}
    for i in range(n):
        meta: dict[str, Any] = {
            "episode_id": str(keys[i]), "episode": int(eps[i]), "step_index": int(steps[i]),
            "original_instruction": str(instr[i]), "task": None if task is None else str(task[i]),
            "dataset": dataset.get("name"), "data": dataset.get("data"), "keys_used": keys_used,
            "model": (s.attrs.get("model") or {}).get("name"),
            "layers_extracted": layers_by_site, "positions_extracted": positions,
            "selection": {site: {"tokens": capture.get(site, {}).get("tokens"), "pool": capture.get(site, {}).get("pool")}
                          for site in layers_by_site},
            "embedding_shapes": shapes[i],
            "action_from_dataset": None if dataset_action is None else dataset_action[i].tolist(),
            "policy_action": None if policy_action is None else policy_action[i].tolist(),
            "format": format, "store": str(s.path),
        }
        (step_dirs[i] / "step_metadata.json").write_text(json.dumps(jsonable(meta), indent=2))
    if visualize:
        _plots(step_dirs, pooled, layers_by_site, eps)


def _plots(step_dirs, pooled, layers_by_site, eps) -> None:
    plt = pyplot()

    for d, vecs in zip(step_dirs, pooled):
        series = {k: np.stack(v) for k, v in vecs.items() if len(v) >= 2}
        if not series:
            continue
        fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.8), squeeze=False)
        for ax, (name, x) in zip(axes[0], series.items()):
            pcs = pca2(x.astype(np.float64))
            ax.plot(pcs[:, 0], pcs[:, 1], "-", color="0.7", zorder=1)
            sc = ax.scatter(pcs[:, 0], pcs[:, 1], c=np.arange(len(x)), cmap="viridis", zorder=2)
            for k, layer in enumerate(layers_by_site[name.split("/")[0]]):
                ax.annotate(str(layer), pcs[k], fontsize=7)
            ax.set_title(f"{name} across layers", fontsize=9)
            ax.set_xlabel("PC1")
            ax.set_ylabel("PC2")
        fig.colorbar(sc, ax=axes[0].tolist(), label="layer (order)")
        fig.suptitle(f"{d.parent.name} / {d.name}", fontsize=9)
        save_figure(fig, d / "pca_step_visualization.png", dpi=80)
    by_episode: dict[Path, list[int]] = {}
    for i, d in enumerate(step_dirs):
        by_episode.setdefault(d.parent, []).append(i)
    for ep_dir, idx in by_episode.items():
        name = next((k for k, v in pooled[idx[0]].items() if len(v) >= 1), None)
        if name is None:
            continue
        x = np.stack([np.stack(pooled[i][name]) for i in idx])  # (steps, layers, feature)
        steps_, layers_, feat = x.shape
        if steps_ * layers_ < 2:
            continue
        pcs = pca2(x.reshape(-1, feat).astype(np.float64)).reshape(steps_, layers_, 2)
        fig, ax = plt.subplots(figsize=(5, 4))
        for k in range(layers_):
            ax.plot(pcs[:, k, 0], pcs[:, k, 1], "o-", ms=3, label=f"layer {layers_by_site[name.split('/')[0]][k]}")
        ax.set_title(f"{ep_dir.name}: {name}, steps per layer", fontsize=9)
        ax.legend(fontsize=6)
        save_figure(fig, ep_dir / "pca_episode_visualization.png", dpi=80)
