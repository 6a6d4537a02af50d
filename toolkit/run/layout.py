"""The store a run writes, worked out from its first batch: the array specs (activations with named dimensions,
per-sample coordinates and fields), the static coordinates of each site (layer, token, denoising step and its
time), and the attributes that make the store self-describing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from toolkit.capture.plan import SiteCapture, stored_token_positions
from toolkit.sdk.adapters import Expert
from toolkit.sdk.errors import ToolkitError
from toolkit.store.frames import frame_spec, is_frame
from toolkit.store.layout import ArraySpec

COORDINATES = ["episode", "step", "task", "task_id", "success"]


FIELD_DIMS = {"policy_action": ("policy_horizon", "policy_action_dim"), "dataset_action": ("dataset_action_dim",)}


def _field_spec(name: str, value: np.ndarray) -> ArraySpec:
    if is_frame(name):  # extract --frames: camera images (toolkit.store.frames)
        return frame_spec(name, tuple(value.shape[1:]))
    dtype = "str" if value.dtype == object else str(value.dtype)
    dims = FIELD_DIMS.get(name) or tuple(f"{name}_dim{i}" if i else f"{name}_dim" for i in range(value.ndim - 1))
    if len(dims) != value.ndim - 1:
        raise ToolkitError(f"per-sample field {name!r} has shape {value.shape[1:]}, expected {len(dims)} dims")
    return ArraySpec(name, tuple(value.shape[1:]), dtype, dims)


def feature_dim(stream: str, width: int, main: int) -> str:
    """A stream's feature dimension: ``feature`` at its site's main width, ``feature_<stream>`` at any other (norm
    scales: 1, ``mlp_act``: the MLP's width), so the streams of one site group never give one dimension name two
    sizes (``xarray.open_zarr(path, group=SITE)`` refuses that)."""
    return "feature" if width == main else f"feature_{stream}"


def main_width(widths: list[int], hidden_size: int) -> int:
    """The width that keeps the plain ``feature`` name in a site: the expert's hidden size when a stream has it,
    else the width most streams have (ties: the widest) -- the rule ``Store.dataset`` applies to older stores."""
    if hidden_size in widths:
        return hidden_size
    return max(set(widths), key=lambda v: (widths.count(v), v))


def _activation_spec(name: str, value: np.ndarray, sc: SiteCapture, denoising: bool, main: int) -> ArraySpec:
    feature = feature_dim(name.split("/")[1], int(value.shape[-1]), main)
    dims = ("layer", "denoise", "token", feature) if denoising else ("layer", "token", feature)
    stored = "bfloat16" if sc.dtype == "bfloat16" else None
    inner = (1, *value.shape[2:])
    return ArraySpec(name, tuple(value.shape[1:]), str(value.dtype), dims, stored,
                     attrs={"hook_names": [f"{sc.site}.layers.{layer}.{name.split('/')[1]}" for layer in sc.layers],
                            "pool": sc.pool, "tokens": sc.tokens},
                     chunk_inner=inner)


def _static_coords(plan: list[SiteCapture], experts: dict[str, Expert], spans: dict[str, dict[str, list[int]]],
                   seq_len: dict[str, int], denoise_t: dict[str, Any]) -> dict[str, tuple[tuple[str, ...], Any]]:
    static: dict[str, tuple[tuple[str, ...], Any]] = {}
    for sc in plan:
        static[f"{sc.site}/layer"] = (("layer",), np.array(sc.layers, dtype=np.int32))
        positions = stored_token_positions(sc, spans.get(sc.expert, {}), seq_len[sc.expert])
        static[f"{sc.site}/token"] = (("token",), np.array(positions, dtype=np.int32))
        if experts[sc.expert].denoise_steps:
            t = denoise_t.get(sc.expert)
            n = experts[sc.expert].denoise_steps
            static[f"{sc.site}/denoise"] = (("denoise",), np.arange(n, dtype=np.int32))
            if t is not None:
                static[f"{sc.site}/t"] = (("denoise",), np.asarray(t, dtype=np.float32))
    return static


def _site_attrs(plan: list[SiteCapture], experts: dict[str, Expert], spans) -> dict[str, Any]:
    return {sc.site: {"expert": sc.expert, "spans": {k: [min(v), max(v) + 1] if v else [] for k, v in
                                                      spans.get(sc.expert, {}).items()},
                      "layers_path": experts[sc.expert].layers_path}
            for sc in plan}


@dataclass
class StoreLayout:
    """What ``StoreWriter.initialize`` creates: attributes, sample-axis arrays, static coordinates, the per-sample
    arrays that are coordinates (repeated in every site group), and each site group's attributes."""

    attrs: dict[str, Any]
    specs: list[ArraySpec]
    static: dict[str, tuple[tuple[str, ...], Any]]
    coordinates: list[str] = field(default_factory=lambda: list(COORDINATES))
    group_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def create(self, writer: Any, chunk_samples: int | None, batch_size: int, expected: int | None = None) -> None:
        """Create the store's arrays with ``writer`` (or check a resumed store has these) and start writing;
        ``expected`` (the run's sample count, if known) caps the default chunk length."""
        writer.initialize(self.attrs, self.specs, self.static, self.coordinates, chunk_samples=chunk_samples,
                          batch_size=batch_size, group_attrs=self.group_attrs, expected=expected)


def store_layout(arrays: dict[str, np.ndarray], plan: list[SiteCapture], experts: dict[str, Expert],
                 spans: dict[str, dict[str, list[int]]], seq_len: dict[str, int], denoise_t: dict[str, Any],
                 attrs: dict[str, Any]) -> StoreLayout:
    """The layout of a store whose first batch is ``arrays`` (activations keyed ``site/stream``, fields by name)."""
    by_name = {f"{sc.site}/{st}": sc for sc in plan for st in sc.streams}
    widths: dict[str, list[int]] = {}
    for name, value in arrays.items():
        if name in by_name:
            widths.setdefault(by_name[name].site, []).append(int(value.shape[-1]))
    main = {sc.site: main_width(widths[sc.site], experts[sc.expert].hidden_size) for sc in plan if sc.site in widths}
    specs = []
    for name, value in arrays.items():
        if name in by_name:
            sc = by_name[name]
            specs.append(_activation_spec(name, value, sc, bool(experts[sc.expert].denoise_steps), main[sc.site]))
        else:
            specs.append(_field_spec(name, value))
    site_info = _site_attrs(plan, experts, spans)
    return StoreLayout({**attrs, "site_info": site_info}, specs, _static_coords(plan, experts, spans, seq_len, denoise_t),
                       group_attrs=site_info)
