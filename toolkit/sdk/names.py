"""The one selection language: which layers, denoising steps, tokens, rollout steps and hooks a command reads.

Every command (extract, import, probe, stats, compare, projection, export) parses what the user typed
here, and resolves it here, so the same text selects the same things everywhere.

Index selections (layers, denoising steps, token positions, rollout steps, tasks)::

    all              everything available (also the empty string)
    5                one index
    0,5,17           a list (in the order given; naming one twice is an error)
    0-5              an inclusive range
    3-               an open range: from 3 to the last available
    -1               negative numbers count back from the last available: -1 is the last, -2 the one before
    -4-   -3--1      the last four / the last three
    0-2,-1,text      items combine; names (token spans such as ``text``) where the caller offers them

A selection is resolved against what is *available*: the model's layers ``0..n-1`` when extracting, the
layers a store holds when reading one (so ``-1`` is the last stored layer, and on a store holding the
model's every layer that is the model's last layer, as at extraction).  A single index must be
available; a range keeps the available values inside it, and its ends must lie within the available
span (so ``0-17`` on a store holding layers 0,8,17 gives 0,8,17, and ``0-40`` on an 18-layer model is
an error).

Hook names, the canonical way to say *where* (TransformerLens style)::

    vlm.layers.5.resid_post          site . layers . LAYERS . stream
    vlm.layers.*.resid_post          * (or all) = every layer; LAYERS takes the grammar above
    action.layers.0-5.resid_mid      sites and streams take shell globs: *.layers.-1.resid_*
    blocks.5.hook_resid_post         TransformerLens' spelling: ``blocks`` is the model's only site
                                     (an error naming the sites when it has several)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError

_INT = re.compile(r"^\s*(-?\d+)\s*$")
_RANGE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)?\s*$")
SYNTAX = "all, 5, 0,5,17, 0-5, 3- (to the end) or -1 (the last)"


@dataclass(frozen=True)
class Item:
    """One comma-separated part: an index (lo == hi, not a range), a range (hi None = open end) or a name."""

    lo: int | None = None
    hi: int | None = None
    is_range: bool = False
    name: str | None = None

    def __str__(self) -> str:
        if self.name is not None:
            return self.name
        if not self.is_range:
            return str(self.lo)
        return f"{self.lo}-{'' if self.hi is None else self.hi}"


@dataclass(frozen=True)
class IndexSpec:
    """A parsed index selection; ``items`` is None for ``all``.  Parse once, resolve against what exists."""

    text: str
    items: tuple[Item, ...] | None
    what: str = "layer"

    @classmethod
    def parse(cls, spec: Any, what: str = "layer", names: Iterable[str] = ()) -> IndexSpec:
        """Parse ``spec`` (text, an int, or a list of both); ``names`` are words accepted as items."""
        if isinstance(spec, IndexSpec):
            return spec
        if isinstance(spec, (bool, np.bool_)):
            raise ToolkitError(f"malformed {what} selection {spec!r}: use {SYNTAX}")
        if isinstance(spec, (list, tuple, set, frozenset, range)):
            spec = ",".join(str(v) for v in (sorted(spec) if isinstance(spec, (set, frozenset)) else spec))
        text = "all" if spec is None else str(spec).strip()
        if text.lower() in ("", "all", "*"):
            return cls("all", None, what)
        names = set(names)
        items: list[Item] = []
        for part in text.split(","):
            part = part.strip()
            if m := _INT.match(part):
                items.append(Item(int(m.group(1)), int(m.group(1))))
            elif m := _RANGE.match(part):
                lo, hi = int(m.group(1)), None if m.group(2) is None else int(m.group(2))
                if hi is not None and (lo < 0) == (hi < 0) and hi < lo:
                    raise ToolkitError(f"{what} range {part!r} is empty: write the lower bound first")
                items.append(Item(lo, hi, is_range=True))
            elif part in names:
                items.append(Item(name=part))
            elif names and re.fullmatch(r"[A-Za-z_][\w.]*", part):
                raise ToolkitError(f"{what} selection {text!r}: unknown name {part!r}; names: "
                                   f"{', '.join(sorted(names))}, or indices: {SYNTAX}")
            else:
                raise ToolkitError(f"malformed {what} selection {text!r}: {part!r} is not one of {SYNTAX}")
        return cls(text, tuple(items), what)

    @property
    def is_all(self) -> bool:
        return self.items is None

    def resolve(self, available: Sequence[int] | int, names: Mapping[str, Sequence[int]] | None = None,
                where: str = "") -> list[int]:
        """The selected values, in the order given.  ``available``: the values that exist (sorted), or a
        count ``n`` for ``0..n-1``; ``names`` maps a name item to its values; ``where`` ends error lines."""
        have = list(range(available)) if isinstance(available, (int, np.integer)) else [int(v) for v in available]
        if self.items is None:
            return have
        where = f" {where}" if where else ""
        if not have:
            raise ToolkitError(f"no {self.what} is available{where}, so {self.text!r} selects nothing")
        order = sorted(have)  # negative indices and ranges go by value, whatever order a store holds them in
        listing = f"available {self.what}s{where}: {format_indices(order)}"
        present = set(have)

        def value(i: int) -> int:
            if i >= 0:
                return i
            if -i > len(order):
                raise ToolkitError(f"{self.what} {i} is out of range: {listing} (-{len(order)}..-1 count back)")
            return order[i]

        out: list[int] = []
        for item in self.items:
            if item.name is not None:
                got = list((names or {})[item.name])
            elif not item.is_range:
                v = value(item.lo)
                if v not in present:
                    raise ToolkitError(f"{self.what} {item.lo} is out of range: {listing}")
                got = [v]
            else:
                lo, hi = value(item.lo), order[-1] if item.hi is None else value(item.hi)
                if lo > hi:
                    raise ToolkitError(f"{self.what} range {str(item)!r} is empty: write the lower bound first")
                if lo < order[0] or hi > order[-1]:
                    raise ToolkitError(f"{self.what} range {str(item)!r} is out of range: {listing}")
                got = [v for v in order if lo <= v <= hi]
                if not got:
                    raise ToolkitError(f"{self.what} range {str(item)!r} holds no {self.what}: {listing}")
            out.extend(got)
        if names is None and len(set(out)) != len(out):
            raise ToolkitError(f"{self.what} selection {self.text!r} names a {self.what} twice")
        return out

    def positions(self, available: Sequence[int], **kw: Any) -> list[int]:
        """Like ``resolve``, but the positions of the selected values in ``available`` (e.g. along an array axis)."""
        index = {int(v): i for i, v in enumerate(available)}
        return [index[v] for v in self.resolve(available, **kw)]

    def literal(self) -> frozenset[int] | None:
        """The values of a selection made of non-negative indices and closed ranges (None for ``all``), for
        filters that need no list of what exists (e.g. a dataset's task ids)."""
        if self.items is None:
            return None
        out: set[int] = set()
        for item in self.items:
            if item.name is not None or item.lo < 0 or (item.is_range and (item.hi is None or item.hi < 0)):
                raise ToolkitError(f"{self.what} selection {self.text!r}: use non-negative numbers and closed "
                                   f"ranges here (e.g. 3, 0-4 or 0,2,5-7)")
            out.update(range(item.lo, item.hi + 1))
        return frozenset(out)

    def mask(self, values: np.ndarray) -> np.ndarray:
        """Which of ``values`` (e.g. every sample's rollout step) the selection keeps; negative indices and
        open ranges are resolved against the distinct values present."""
        values = np.asarray(values)
        if self.items is None:
            return np.ones(len(values), dtype=bool)
        return np.isin(values, self.resolve(np.unique(values)))


def parse_indices(spec: Any, what: str = "layer", names: Iterable[str] = ()) -> IndexSpec:
    """Shorthand for ``IndexSpec.parse``."""
    return IndexSpec.parse(spec, what, names)


def resolve_indices(spec: Any, available: Sequence[int] | int, what: str = "layer", where: str = "") -> list[int]:
    """Parse and resolve in one go: ``resolve_indices("-1", store.layers("vlm"))``."""
    return IndexSpec.parse(spec, what).resolve(available, where=where)


def store_site_stream(store: Any, site: str | None, stream: str | None) -> tuple[str, str]:
    """The site (default: the store's first) and stream (default: resid_post where the site has it, else its
    first) a store-reading command uses, checked against the store."""
    sites = store.sites
    if not sites:
        raise ToolkitError(f"{store.path} holds no capture site")
    site = sites[0] if site is None else site
    if site not in sites:
        raise ToolkitError(f"{store.path} has no site {site!r}; sites: {', '.join(sites)}")
    streams = store.streams(site)
    stream = ("resid_post" if "resid_post" in streams else streams[0]) if stream is None else stream
    if stream not in streams:
        raise ToolkitError(f"site {site!r} of {store.path} has no stream {stream!r}; streams: {', '.join(streams)}")
    return site, stream


def store_layers(store: Any, site: str, spec: Any) -> list[int]:
    """The layers of ``site`` that ``spec`` selects in a store (``-1``: the last stored layer); the one
    resolution every store-reading command (stats, compare, projection, export, probe) uses."""
    return IndexSpec.parse(spec, "layer").resolve(store.layers(site), where=f"at site {site!r} of the store")


def format_indices(values: Iterable[int]) -> str:
    """The inverse of the grammar, compact: [0, 1, 2, 3, 8, 10, 11] -> '0-3,8,10,11' (runs of 3+ become ranges)."""
    vals = [int(v) for v in values]
    parts: list[str] = []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{vals[i]}-{vals[j]}")
        else:
            parts.extend(str(v) for v in vals[i:j + 1])
        i = j + 1
    return ",".join(parts)


# --------------------------------------------------------------------------- hook names


def hook_name(site: str, layer: int, stream: str) -> str:
    """The public name of one capture point: ``vlm.layers.5.resid_post``."""
    return f"{site}.layers.{layer}.{stream}"


def parse_hook(hook: str) -> tuple[str, int, str]:
    """(site, layer, stream) of one concrete hook name; patterns are expanded by the caller (``hooks_for``)."""
    p = HookPattern.parse(hook)
    layers = p.layers.items
    if p.site in ("*", "") or any(c in p.site + p.stream for c in "*?[") or layers is None or len(layers) != 1 \
            or layers[0].is_range or layers[0].name is not None or layers[0].lo < 0:
        raise ToolkitError(f"an intervention edits one named stream: {hook!r} is a pattern; write e.g. "
                           "text_only.layers.3.resid_post")
    return p.site, layers[0].lo, p.stream


@dataclass(frozen=True)
class HookPattern:
    """A parsed hook name or pattern: site glob, layer selection, stream glob."""

    text: str
    site: str
    layers: IndexSpec
    stream: str

    @classmethod
    def parse(cls, text: str) -> HookPattern:
        raw = str(text).strip()
        parts = raw.split(".")
        if len(parts) == 3 and parts[0] == "blocks" and parts[2].startswith("hook_"):
            site, layers, stream = "blocks", parts[1], parts[2].removeprefix("hook_")
        elif len(parts) == 4 and parts[1] == "layers":
            site, layers, stream = parts[0], parts[2], parts[3]
        else:
            raise ToolkitError(f"malformed hook name {raw!r}: write SITE.layers.LAYERS.STREAM, e.g. "
                               f"vlm.layers.5.resid_post, vlm.layers.*.resid_post or action.layers.0-5.resid_mid")
        if not site or not stream:
            raise ToolkitError(f"malformed hook name {raw!r}: the site and stream parts must not be empty")
        return cls(raw, site, IndexSpec.parse(layers, "layer"), stream)

    def sites(self, known: Sequence[str]) -> list[str]:
        if self.site == "blocks" and "blocks" not in known:
            if len(known) != 1:
                raise ToolkitError(f"hook {self.text!r} uses TransformerLens' 'blocks', which names a model's only "
                                   f"site; this one has several: write e.g. {hook_name(known[0], 0, self.stream)} "
                                   f"(sites: {', '.join(known)})")
            return list(known)
        hit = [s for s in known if fnmatch.fnmatchcase(s, self.site)]
        if not hit:
            raise ToolkitError(f"hook {self.text!r} matches no site; sites: {', '.join(known)}")
        return hit


@dataclass(frozen=True)
class SiteSelection:
    """What a set of hook patterns selects at one site: layers (values) and streams, in first-named order."""

    site: str
    layers: tuple[int, ...]
    streams: tuple[str, ...]

    def names(self) -> list[str]:
        return [hook_name(self.site, layer, s) for layer in self.layers for s in self.streams]


def resolve_hooks(patterns: Iterable[str | HookPattern], layers: Mapping[str, Sequence[int] | int],
                  streams: Mapping[str, Sequence[str]]) -> dict[str, SiteSelection]:
    """Resolve hook patterns against what exists: ``layers``/``streams`` per site (from an adapter's
    experts before any weight loads, or from a store).  A site's selection is the union of its patterns'
    layers and streams: a store keeps every chosen stream at every chosen layer of a site."""
    known = list(layers)
    chosen: dict[str, tuple[dict[int, None], dict[str, None]]] = {}
    for p in patterns:
        p = p if isinstance(p, HookPattern) else HookPattern.parse(p)
        for site in p.sites(known):
            offered = list(streams[site])
            hit = [s for s in offered if fnmatch.fnmatchcase(s, p.stream)]
            if not hit:
                raise ToolkitError(f"hook {p.text!r}: site {site!r} has no stream {p.stream!r}; "
                                   f"streams: {', '.join(offered)}")
            lay, st = chosen.setdefault(site, ({}, {}))
            lay.update(dict.fromkeys(p.layers.resolve(layers[site], where=f"at site {site!r}")))
            st.update(dict.fromkeys(hit))
    return {s: SiteSelection(s, tuple(lay), tuple(st)) for s, (lay, st) in chosen.items()}


def store_hooks(store: Any, patterns: Iterable[str | HookPattern]) -> dict[str, SiteSelection]:
    """Hook patterns resolved against a store: its sites, the layers it holds, its streams."""
    sites = store.sites
    return resolve_hooks(patterns, {s: store.layers(s) for s in sites}, {s: store.streams(s) for s in sites})


def store_hook(store: Any, pattern: str) -> tuple[str, str, list[int]]:
    """(site, stream, layers) of one hook pattern naming one site and one stream (stats, compare, projection)."""
    picked = store_hooks(store, [pattern])
    if len(picked) != 1 or len(next(iter(picked.values())).streams) != 1:
        names = [f"{s}.{st}" for s, p in picked.items() for st in p.streams]
        raise ToolkitError(f"hook {pattern!r} matches {len(names)} site/stream pairs ({', '.join(names)}); "
                           "this command reads one: narrow the site and stream")
    sel = next(iter(picked.values()))
    return sel.site, sel.streams[0], list(sel.layers)
