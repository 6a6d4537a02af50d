"""Reading a store: ``Store`` opens the committed snapshot (the root's consolidated metadata) and reads sites,
streams, coordinates and decoded activation slices through the checked chunk readers.

Layout (every array carries ``dimension_names``; ``xarray.open_zarr(path)`` and ``xarray.open_zarr(path,
group=SITE)`` open it with coordinates, ``dask.array.from_zarr`` reads it lazily, neither needs this package)::

    store.zarr/                      attrs: toolkit version, model, dataset, run spec, n_samples, complete
      episode, step, task, ...       (sample,)        per-sample coordinates
      dataset_action, policy_action  (sample, ...)    per-sample fields
      vlm/                           one group per capture site
        resid_post                   (sample, layer, token, feature)          or
                                     (sample, layer, denoise, token, feature) for denoising experts
        layer, token, denoise, t     static coordinates of the site
        episode, step, task, ...     the per-sample coordinates again, so the group stands alone

bfloat16 is stored losslessly as its 16-bit pattern (uint16, ``stored_dtype: bfloat16``) and decoded on read.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from toolkit.sdk.errors import ToolkitError, first_line
from toolkit.store.chunks import CheckedArray, read_samples
from toolkit.store.codecs import codec_name, decode
from toolkit.store.layout import FORMAT, SAMPLE
from toolkit.store.location import location, store_target

class Store:
    """Read access to a store: coordinates, sites, and decoded activation slices."""

    def __init__(self, path: str | Path, warn_incomplete: bool = True):
        self.path = store_target(path)  # a Path, or an object-store URL
        # the snapshot's arrays and layer coordinates, looked up once (each lookup is a zarr call, ~0.3-1.5 ms,
        # a noticeable share of reading a layer)
        self._arrays: dict[tuple[str, str], CheckedArray] = {}
        self._layers: dict[str, list[int]] = {}
        self.loc = location(self.path)
        if not self.loc.exists("zarr.json"):
            raise ToolkitError(f"{self.path} is not a store (no zarr.json); create one with `toolkit extract`")
        # The root's consolidated metadata is the committed snapshot (see StoreWriter.commit): shapes and
        # n_samples read together, so a store being written reads as its committed prefix.
        try:
            self.root = zarr.open_group(self.loc.zarr_target(), mode="r", zarr_format=3)
            self.attrs = dict(self.root.attrs)
        except ToolkitError:
            raise
        except Exception as e:  # noqa: BLE001 - unparsable or not Zarr metadata (zarr raises JSON/validation errors)
            raise self._damaged_root(f"{type(e).__name__}: {first_line(e, 120)}") from None
        if self.attrs.get("format") != FORMAT:
            problem = self._root_problem()
            if problem:
                raise self._damaged_root(problem)
            raise ToolkitError(f"{self.path} is a Zarr store but not a toolkit store (no '{FORMAT}' attribute)")
        self.n_samples = self._check_attrs()
        if warn_incomplete and not self.complete:
            warnings.warn(f"{self.path} is incomplete: {self.n_samples} samples are committed (a run is writing it "
                          "or was interrupted; its extract command with --resume completes it); using those only",
                          stacklevel=2)

    def _root_problem(self) -> str | None:
        """What is wrong with the root ``zarr.json`` as Zarr v3 group metadata (None: nothing)."""
        try:
            meta = json.loads(self.loc.get("zarr.json") or b"")
        except (ValueError, UnicodeDecodeError) as e:
            return f"{type(e).__name__}: {first_line(e, 120)}"
        if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
            return "it is JSON but no Zarr v3 group metadata (zarr_format 3, node_type group)"
        return None

    def _check_attrs(self) -> int:
        """The committed sample count, once the root attributes every reader relies on have their types (a hand-
        edited or damaged ``zarr.json`` is one line here, not a TypeError deep in a command)."""
        n, sites = self.attrs.get("n_samples", 0), self.attrs.get("sites", [])
        coords = self.attrs.get("coordinates", "")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise self._damaged_root(f"attribute n_samples is {n!r}, expected a count")
        if not isinstance(sites, list) or not all(isinstance(v, str) for v in sites):
            raise self._damaged_root(f"attribute sites is {sites!r:.60}, expected a list of site names")
        if not isinstance(coords, str):
            raise self._damaged_root(f"attribute coordinates is {coords!r:.60}, expected names separated by spaces")
        try:
            held = min((a.shape[0] for _, a in self.root.arrays()
                        if (a.metadata.dimension_names or (None,))[0] == SAMPLE), default=n)
        except Exception as e:  # noqa: BLE001 - an array's metadata in the snapshot is unreadable
            raise self._damaged_root(f"{type(e).__name__}: {first_line(e, 120)}") from None
        if n > held:
            raise self._damaged_root(f"n_samples is {n} but its per-sample arrays hold {held}")
        return n

    def _damaged_root(self, problem: str) -> ToolkitError:
        return ToolkitError(f"{self.path}: its root zarr.json is not valid Zarr metadata ({problem}); the store's "
                            "metadata is damaged and cannot be read or repaired in place: re-extract it with "
                            "--overwrite (or restore zarr.json from a copy)")

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def __repr__(self) -> str:
        """A few lines: provenance (and whether the weights were random), size, and each site's hook names."""
        from toolkit.sdk.names import format_indices

        model, ds = _named(self.attrs.get("model")) or {}, _named(self.attrs.get("dataset")) or {}
        w = self.weights
        episodes = len(np.unique(self.coord("episode"))) if self.n_samples else 0
        lines = [f"<toolkit Store {self.path}: {self.n_samples} samples, {episodes} episodes"
                 f"{'' if self.complete else ', INCOMPLETE'}>",
                 f"  model    {model.get('name')} ({w.label}): {w.detail}",
                 f"  dataset  {ds.get('name')}" + (f" from {ds['data']}" if ds.get("data") else ""),
                 f"  stored   {human_bytes(self.loc.size())}, codec {self.attrs.get('codec')}"]
        for site in self.sites[:8]:
            streams = ", ".join(f"{s} {self.array(site, s).attrs.get('stored_dtype') or self.array(site, s).dtype}"
                                f"{tuple(self.array(site, s).shape[2:])}" for s in self.streams(site))
            lines.append(f"  {site}.layers.{format_indices(self.layers(site))}: {streams}"[:140])
        if len(self.sites) > 8:
            lines.append(f"  ... and {len(self.sites) - 8} more sites")
        return "\n".join(lines)

    @property
    def weights(self) -> Weights:
        """Where the stored activations came from: random weights, a loaded checkpoint, or imported ones."""
        return model_weights(self.attrs.get("model"))

    @property
    def sites(self) -> list[str]:
        return list(self.attrs.get("sites", []))

    def streams(self, site: str) -> list[str]:
        self._check_site(site)
        coords = set(self.attrs.get("coordinates", "").split())
        return sorted(n for n, a in self.root[site].arrays()
                      if a.metadata.dimension_names[0] == SAMPLE and n not in coords)

    def _check_site(self, site: str) -> None:
        if site not in self.sites:
            raise ToolkitError(f"store has no site {site!r}; sites: {', '.join(self.sites)}")

    def array(self, site: str, stream: str) -> CheckedArray:
        """A site's stream as stored (a zarr array whose reads are checked, see ``CheckedArray``)."""
        if (site, stream) not in self._arrays:
            self._check_site(site)
            if stream not in self.streams(site):
                raise ToolkitError(f"site {site!r} has no stream {stream!r}; streams: {', '.join(self.streams(site))}")
            self._arrays[(site, stream)] = CheckedArray(self.root[f"{site}/{stream}"])
        return self._arrays[(site, stream)]

    def dims(self, site: str, stream: str) -> tuple[str, ...]:
        return tuple(self.array(site, stream).metadata.dimension_names)

    def layers(self, site: str) -> list[int]:
        if site not in self._layers:
            self._check_site(site)
            self._layers[site] = [int(v) for v in self.root[f"{site}/layer"][:]]
        return list(self._layers[site])

    def static(self, name: str) -> np.ndarray:
        return self.root[name][...]

    def coord(self, name: str) -> np.ndarray:
        """A per-sample array (coordinate or field) from the root, cut to the committed samples."""
        try:
            arr = CheckedArray(self.root[name])
        except KeyError:
            raise ToolkitError(f"store has no per-sample field {name!r}; fields: {', '.join(self.fields())}") from None
        return decode(arr[: self.n_samples], arr.attrs.get("stored_dtype"))

    def fields(self) -> list[str]:
        return sorted(n for n, a in self.root.arrays() if a.metadata.dimension_names[0] == SAMPLE)

    @property
    def cameras(self) -> list[str]:
        """The cameras whose frames the store keeps (``extract --frames``; empty: none)."""
        from toolkit.store.frames import camera_of, is_frame

        return [camera_of(n) for n in self.fields() if is_frame(n)]

    def frames(self, camera: str, samples: slice | np.ndarray | None = None) -> np.ndarray:
        """One camera's frames, ``(samples, height, width, 3)`` uint8, through the checked chunk reads; ``samples``
        by position (default: every committed sample)."""
        from toolkit.store.frames import frame_name

        if camera not in self.cameras:
            raise ToolkitError(f"{self.path} keeps no frames of camera {camera!r}; "
                               + (f"cameras: {', '.join(self.cameras)}" if self.cameras else
                                  "it was made without --frames (re-extract with --frames 128 to keep them)"))
        arr = CheckedArray(self.root[frame_name(camera)])
        return self._rows(arr, samples if _is_run(samples) else np.arange(self.n_samples)[samples])

    def read(self, site: str, stream: str | None = None, layer: int | None = None,
             samples: slice | np.ndarray | None = None, *, episodes: Any = None, tasks: Any = None,
             steps: Any = None) -> np.ndarray:
        """Decoded values of one stream, by hook name or by site and stream.

            store.read("vlm.layers.12.resid_post")          # (samples, token, feature): one layer
            store.read("vlm.layers.-1.resid_post")          # the last stored layer
            store.read("vlm.layers.*.resid_post")           # (samples, layer, token, feature): every stored layer
            store.read("vlm", "resid_post", layer=12)       # the same as the first line
            store.read("vlm.layers.0-5.resid_mid", episodes="0-9", tasks=[3], steps="0-49")

        A hook name's layers take the selection grammar against the layers the store holds (``-1`` is the last of
        them); one layer index gives one layer's array, a list, range or ``*`` a layer axis.  ``layer`` is a model
        layer index (not a position).  ``samples`` picks samples by position; ``episodes`` (episode ordinals),
        ``tasks`` (task ids or names) and ``steps`` (rollout steps) filter them (see ``sample_mask``).
        A run of samples (all, or a unit-step slice) is read chunk by chunk in parallel (``read_samples``);
        other selections go through zarr, checked (``CheckedArray``)."""
        if stream is None:
            site, stream, layers, one = self._hook(site)
            if len(layers) > 1 or not one:
                if layer is not None:
                    raise ToolkitError("give the layer either in the hook name or as layer=, not both")
                return np.stack([self.read(site, stream, v, samples, episodes=episodes, tasks=tasks, steps=steps)
                                 for v in layers], axis=1)
            layer = layers[0] if layer is None else layer
        if episodes is not None or tasks is not None or steps is not None:
            mask = self.sample_mask(episodes=episodes, tasks=tasks, steps=steps)
            chosen = np.nonzero(mask)[0]
            if samples is not None:
                chosen = np.intersect1d(chosen, np.arange(self.n_samples)[samples])
            samples = chosen
        arr = self.array(site, stream)
        pos = None
        if layer is not None:
            layers = self.layers(site)
            if layer not in layers:
                raise ToolkitError(f"site {site!r} holds layers {_ranges(layers)}, not {layer}")
            pos = layers.index(layer)
        return decode(self._rows(arr, samples, pos), arr.attrs.get("stored_dtype"))

    def _rows(self, arr: CheckedArray, samples: slice | np.ndarray | None, pos: int | None = None) -> np.ndarray:
        """Samples of ``arr`` (at layer position ``pos``): a run (all, or a unit-step slice) chunk by chunk in
        parallel (``read_samples``), any other selection through zarr, checked."""
        if _is_run(samples):
            a, b, _ = (samples or slice(None)).indices(self.n_samples)
            return read_samples(arr, a, b, pos)
        return arr[(samples,) if pos is None else (samples, pos)]

    def _hook(self, name: str) -> tuple[str, str, list[int], bool]:
        """(site, stream, layers, named one layer) of one hook name or pattern naming one site and stream."""
        from toolkit.sdk.names import HookPattern, store_hooks

        picked = store_hooks(self, [name])
        pairs = [(s, st) for s, p in picked.items() for st in p.streams]
        if len(pairs) != 1:
            raise ToolkitError(f"hook {name!r} matches {len(pairs)} site/stream pairs "
                               f"({', '.join(f'{s}.{st}' for s, st in pairs)}); read one at a time")
        items = HookPattern.parse(name).layers.items
        one = items is not None and len(items) == 1 and not items[0].is_range
        site, stream = pairs[0]
        return site, stream, list(picked[site].layers), one

    def sample_mask(self, episodes: Any = None, tasks: Any = None, steps: Any = None) -> np.ndarray:
        """Which committed samples belong to the chosen episodes (ordinals in the run: ``"0-9"``, ``[0, 4]``),
        tasks (task ids, or task names: ``[3]``, ``"pick up the ketchup"``) and rollout steps (``"0-49"``, ``-1``:
        the last step present); each in the selection grammar, resolved against the values present."""
        from toolkit.sdk.names import IndexSpec

        mask = np.ones(self.n_samples, dtype=bool)
        if episodes is not None:
            mask &= IndexSpec.parse(episodes, "episode").mask(self.coord("episode"))
        if steps is not None:
            mask &= IndexSpec.parse(steps, "step").mask(self.coord("step"))
        if tasks is not None:
            names = [tasks] if isinstance(tasks, str) and not tasks.replace(",", "").replace("-", "").isdigit() \
                else None
            if names is not None or (isinstance(tasks, (list, tuple)) and any(isinstance(t, str) for t in tasks)):
                wanted = set(names or [str(t) for t in tasks])
                have = np.array([str(v) for v in self.coord("task")], dtype=object)
                unknown = wanted - set(have.tolist())
                if unknown:
                    raise ToolkitError(f"{self.path} has no task {sorted(unknown)[0]!r}; tasks: "
                                       f"{', '.join(sorted(set(have.tolist())))}")
                mask &= np.isin(have, list(wanted))
            else:
                mask &= IndexSpec.parse(tasks, "task").mask(self.coord("task_id"))
        return mask

    def dataset(self, site: str | None = None):
        """The store as lazy xarray: one site as an ``xarray.Dataset`` (``site``), or every site as an
        ``xarray.DataTree`` with one node per site.  Streams are dask arrays over checked chunk reads (a bad chunk
        raises ``CorruptStoreError`` when computed), cut to the committed samples, bfloat16 as ml_dtypes'
        ``bfloat16`` (zero-copy); per-sample coordinates, ``layer``/``token``/``denoise`` and ``t`` are
        coordinates.  Every stream of a site opens, each with its own feature dimension: ``feature`` at the site's main
        width (the expert's hidden size), ``feature_<stream>`` at any other (norm scales: 1, ``mlp_act``: the MLP
        width), e.g. ``feature`` and ``feature_pre_attn_norm_scale``.  Stores name their dimensions so when written
        (``toolkit.run.layout``), so plain ``xarray.open_zarr(path, group=SITE)`` gives the same; in older stores,
        whose streams all say ``feature``, the width most streams have keeps ``feature`` and the others are renamed
        the same way here."""
        try:
            import dask.array as da
            import xarray as xr
        except ImportError:
            raise ToolkitError("Store.dataset needs xarray and dask: pip install 'toolkit[analysis]'") from None
        if site is None:
            return xr.DataTree.from_dict({s: self.dataset(s) for s in self.sites})
        self._check_site(site)
        group = self.root[site]
        n = self.n_samples
        coords: dict[str, Any] = {c: ((SAMPLE,), self.coord(c)) for c in self.attrs.get("coordinates", "").split()
                                  if c in self.fields()}
        sizes: dict[str, int] = {}
        for name, arr in group.arrays():
            if (arr.metadata.dimension_names or (None,))[0] != SAMPLE:
                dims = tuple(arr.metadata.dimension_names)
                coords[name] = (dims, arr[...])
                sizes.update(zip(dims, arr.shape))
        arrays = {stream: self.array(site, stream) for stream in self.streams(site)}
        # a dimension name keeps its plain spelling at the size most streams (then the widest) have it at
        seen: dict[str, list[int]] = {}
        for arr in arrays.values():
            for d, size in zip(arr.metadata.dimension_names[1:], arr.shape[1:]):
                seen.setdefault(d, []).append(size)
        for d, got in seen.items():
            sizes.setdefault(d, max(set(got), key=lambda v: (got.count(v), v)))
        data = {}
        for stream, arr in arrays.items():
            lazy = da.from_array(arr, chunks=arr.chunks, name=f"toolkit-{self.path}-{site}-{stream}-{n}",
                                 lock=False, asarray=True, fancy=False)[:n]
            if arr.attrs.get("stored_dtype") == "bfloat16":
                import ml_dtypes

                lazy = lazy.view(ml_dtypes.bfloat16)
            attrs = {k: v for k, v in arr.attrs.items() if k != "coordinates"}
            dims = [d if d == SAMPLE or sizes[d] == size else f"{d}_{stream}"
                    for d, size in zip(arr.metadata.dimension_names, (n, *arr.shape[1:]))]
            data[stream] = (tuple(dims), lazy, attrs)
        return xr.Dataset(data, coords=coords, attrs=dict(group.attrs))

    def summary(self) -> dict[str, Any]:
        """Everything `toolkit info` shows, from the store's own metadata."""
        out: dict[str, Any] = {
            "path": str(self.path),
            "n_samples": self.n_samples,
            "complete": self.complete,
            "toolkit_version": self.attrs.get("toolkit_version"),
            "model": _named(self.attrs.get("model")),
            "dataset": _named(self.attrs.get("dataset")),
            "codec": self.attrs.get("codec"),
            "chunk_samples": self.attrs.get("chunk_samples"),
        }
        if self.n_samples:
            ep = self.coord("episode")
            out["n_episodes"] = int(len(np.unique(ep)))
            if "task" in self.fields():
                out["n_tasks"] = int(len(np.unique(self.coord("task"))))
        out["fields"] = {n: {"dims": list(self.root[n].metadata.dimension_names),
                             "shape": [self.n_samples, *self.root[n].shape[1:]], "dtype": str(self.root[n].dtype)}
                         for n in self.fields()}
        sites = {}
        for site in self.sites:
            streams = {}
            for stream in self.streams(site):
                arr = self.array(site, stream)
                streams[stream] = {
                    "dims": list(arr.metadata.dimension_names),
                    "shape": [self.n_samples, *arr.shape[1:]],
                    "dtype": arr.attrs.get("stored_dtype") or str(arr.dtype),
                    "chunks": list(arr.chunks),
                    "stored_bytes": self.loc.size(f"{site}/{stream}"),
                    "codec": codec_name(arr),
                }
                raw = int(np.prod(arr.shape, dtype=np.int64)) * arr.dtype.itemsize  # the committed samples
                streams[stream]["compression_ratio"] = raw / max(1, self.loc.size(f"{site}/{stream}/c"))
            group = self.root[site]
            info = {"layers": self.layers(site), "streams": streams, **dict(group.attrs)}
            info.pop("coordinates", None)
            if "t" in group:
                info["denoise_t"] = [round(float(v), 6) for v in group["t"][:]]
            sites[site] = info
        out["sites"] = sites
        out["capture"] = self.attrs.get("capture")
        return out


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass(frozen=True)
class Weights:
    """What made a store's activations, from its ``model`` attribute: the one answer `toolkit info`, ``repr(store)``
    and the probe report give.  ``kind`` is ``random`` (seeded random weights: ``--random-weights``, or no
    checkpoint and the adapter's default architecture), ``checkpoint`` (weights loaded from ``checkpoint``),
    ``imported`` (activations a dataset carried, stored by `toolkit import`: no model ran) or ``unknown`` (a
    hand-made store that records neither)."""

    kind: str
    checkpoint: str | None = None  # the checkpoint loaded, or whose architecture the random weights took
    missing: int = 0  # weights the checkpoint lacked (--allow-missing): they kept their random initial values

    @property
    def random(self) -> bool:
        return self.kind == "random"

    @property
    def label(self) -> str:
        return {"random": "RANDOM weights", "checkpoint": "loaded weights", "imported": "imported activations"
                }.get(self.kind, "weights not recorded")

    @property
    def detail(self) -> str:
        if self.kind == "random":
            return (f"seeded, in the architecture of {self.checkpoint} with none of its weights: --random-weights"
                    if self.checkpoint else "seeded, the adapter's default architecture: no checkpoint")
        if self.kind == "checkpoint":
            return f"from {self.checkpoint}" + (f"; {self.missing} weights it lacked kept random values "
                                                "(--allow-missing)" if self.missing else "")
        if self.kind == "imported":
            return "no model run: stored from the data by `toolkit import`"
        return "the store's model attribute names no checkpoint, random_init or import"

    def __str__(self) -> str:
        return f"{self.label} ({self.detail})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "random": self.random, "checkpoint": self.checkpoint, "missing": self.missing,
                "text": str(self)}


def _is_run(samples: slice | np.ndarray | None) -> bool:
    """All samples, or a unit-step slice: read as one run of chunks."""
    return samples is None or (isinstance(samples, slice) and samples.step in (None, 1))


def model_weights(model: Any) -> Weights:
    """``Weights`` of a store's (or a probe result's) ``model`` attribute.  Random is what the run recorded
    (``random_init``, which an extract always sets: true without a checkpoint or with --random-weights), never
    guessed from a missing checkpoint alone; an import records ``imported`` and no checkpoint."""
    m = _named(model) or {}
    ckpt = m.get("checkpoint")
    ckpt = str(ckpt) if ckpt not in (None, "") else None
    if m.get("imported"):
        return Weights("imported", ckpt)
    if m.get("random_init"):
        return Weights("random", ckpt)
    if ckpt is not None:
        report = m.get("load_report") if isinstance(m.get("load_report"), dict) else {}
        missing = report.get("n_missing", len(report.get("missing") or ()))
        return Weights("checkpoint", ckpt, missing if isinstance(missing, int) else 0)
    return Weights("unknown")


def _named(value: Any) -> dict[str, Any] | None:
    """Provenance attributes are dicts; a plain string (hand-made or benchmark stores) is just the name."""
    return value if isinstance(value, dict) or value is None else {"name": str(value)}


def _ranges(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def open_store(path: str | Path, warn_incomplete: bool = True) -> Store:
    """Open a store for reading (a warning names the committed count of an incomplete one)."""
    return Store(path, warn_incomplete)
