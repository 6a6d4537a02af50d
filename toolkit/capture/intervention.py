"""Interventions: the hooks that change a named stream while the policy runs.

Capture reads ``text_only.layers.3.resid_post``; an intervention writes there, under the same name (site,
layer, stream; the site's token selection unless told otherwise).  These are the only hooks in the toolkit
that return a tensor.  Every operation has a strength ``alpha`` and ``alpha = 0`` is the unmodified policy
(the hook is not registered at all, so outputs are bit-identical), which is what a dose-response sweep
starts from:

    add     x + alpha * d                          d: a direction (a probe's weights, a mean difference)
    ablate  x - alpha * P x                        P: the projection onto the span of the direction(s)
    erase   x - alpha * ((x - c) @ R) @ L.T        L, R (F, k): a rank-k eraser (LEACE, INLP), c: its center
    clamp   x[u] + alpha * (v - x[u])              u: units, e.g. FFN neurons of the ``mlp_act`` stream
    zero    (1 - alpha) * x
    mean    x + alpha * (mu - x)                   mu: the stream's mean over a store

``Steering`` registers the hooks before ``Capture`` does, so a store written in the same run holds the
intervened activations; hooks are removed on exit, also after an exception.

Directions come from a probe's ``weights.npz`` (``probe_direction``), from the mean difference between two
groups of a store's samples (``mean_difference``, e.g. ``task=3`` vs ``task=5``), or from a ``.npy`` file;
erasers from ``toolkit.analysis.directions`` (``leace``, ``inlp``, ``fit_eraser``, an ``Eraser.save`` file).
The span of direction(s) is taken with a rank tolerance at float32 rounding (``_basis``), so a two-class
probe's columns w and ≈−w remove one direction, not two.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from toolkit.sdk.adapters import ModelAdapter, ModelInputs
from toolkit.capture.hooks import HookSet, first_tensor, resolve_module
from toolkit.capture.plan import expert_streams, hook_point
from toolkit.sdk.errors import ToolkitError
from toolkit.capture.tokens import parse_tokens
from toolkit.sdk.names import parse_hook, resolve_hooks

OPS = ("add", "ablate", "erase", "clamp", "zero", "mean")
# decoder streams as wide as the expert's hidden size (``mlp_act`` is as wide as the MLP)
RESIDUAL_WIDTH = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True, eq=False)
class Intervention:
    """One edit of one named stream (``site.layers.L.stream``) at strength ``alpha``.

    ``vector``: the direction for ``add`` (F,), the direction(s) for ``ablate`` (F,) or (F, k), the mean for
    ``mean`` (F,), per-unit target values for ``clamp`` (else every unit is clamped to ``value``); for ``erase``
    the eraser's left factor L (F, k), with ``right`` R (F, k; default: the orthonormal basis of L, an orthogonal
    projection) and ``center`` c (F,; default 0): x − alpha·((x − c) @ R) @ Lᵀ.
    ``tokens``: positions or span names as in capture (``text``, ``0-5``, ``last``); None = the site's own.
    ``denoise``: for an expert that runs once per denoising step (pi0's action expert), the steps to change
    (0 = the first, t = 1.0); None = every step.
    """

    hook: str
    op: str
    alpha: float = 1.0
    vector: np.ndarray | None = None
    units: tuple[int, ...] = ()
    value: float = 0.0
    tokens: str | None = None
    source: str = ""  # where the vector came from, recorded in the store
    denoise: tuple[int, ...] | None = None  # experts run once per denoising step: change only these steps
    right: np.ndarray | None = None  # erase: the eraser's right factor R (F, k)
    center: np.ndarray | None = None  # erase: the point the eraser keeps in place (F,)

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ToolkitError(f"unknown intervention {self.op!r}: use one of {', '.join(OPS)}")
        if not np.isfinite(self.alpha):
            raise ToolkitError(f"intervention strength alpha must be finite, got {self.alpha}")
        needs_vector = self.op in ("add", "ablate", "erase", "mean")
        if needs_vector and self.vector is None:
            raise ToolkitError(f"intervention {self.op!r} on {self.hook} needs a direction: give --direction "
                               "(a probe's results folder, a .npy file) or --between GROUP_A GROUP_B")
        if self.vector is not None:
            v = np.asarray(self.vector, dtype=np.float64)
            k = self.op in ("ablate", "erase")
            if v.ndim not in (1, 2) or (v.ndim == 2 and not k) or not np.isfinite(v).all():
                raise ToolkitError(f"the {self.op} vector for {self.hook} must be finite and shaped (features,)"
                                   f"{' or (features, k)' if k else ''}, got {v.shape}")
            if self.op in ("add", "ablate", "erase") and not np.linalg.norm(v) > 0:
                raise ToolkitError(f"the direction for {self.hook} is all zeros")
            object.__setattr__(self, "vector", v)
        for name, want in (("right", None if self.vector is None else self.vector.reshape(len(self.vector), -1).shape),
                           ("center", None if self.vector is None else (len(self.vector),))):
            a = getattr(self, name)
            if a is None:
                continue
            a = np.asarray(a, dtype=np.float64)
            if self.op != "erase" or a.shape != want or not np.isfinite(a).all():
                raise ToolkitError(f"{self.hook}: {name} belongs to an erase, finite and shaped {want}; got "
                                   f"{a.shape} for op {self.op!r}")
            object.__setattr__(self, name, a)
        if self.op == "clamp":
            if not self.units:
                raise ToolkitError(f"clamp on {self.hook} needs --units (feature indices, e.g. 12,40)")
            if self.vector is not None and self.vector.shape != (len(self.units),):
                raise ToolkitError(f"clamp on {self.hook}: {len(self.units)} units but {self.vector.shape} values")

    @property
    def identity(self) -> bool:
        """alpha = 0 leaves every op's input unchanged; then no hook is registered at all."""
        return self.alpha == 0

    def describe(self) -> dict[str, Any]:
        """What a store's attributes record (the vector by norm and digest; the file it came from in source)."""
        out: dict[str, Any] = {"hook": self.hook, "op": self.op, "alpha": float(self.alpha), "tokens": self.tokens,
                               "source": self.source, "denoise": None if self.denoise is None else list(self.denoise)}
        if self.vector is not None:
            v = np.ascontiguousarray(self.vector, dtype=np.float64)
            out.update(vector_shape=list(v.shape), vector_norm=float(np.linalg.norm(v)),
                       vector_sha256=hashlib.sha256(v.tobytes()).hexdigest()[:16])
        if self.op in ("ablate", "erase") and self.vector is not None:
            out["rank"] = int(self.right.shape[1] if self.right is not None else _basis(self.vector).shape[1])
        for name in ("right", "center"):
            a = getattr(self, name)
            if a is not None:
                a = np.ascontiguousarray(a, dtype=np.float64)
                out.update({f"{name}_norm": float(np.linalg.norm(a)),
                            f"{name}_sha256": hashlib.sha256(a.tobytes()).hexdigest()[:16]})
        if self.op == "clamp":
            out.update(units=list(self.units), value=None if self.vector is not None else float(self.value))
        return out


def hooks_for(adapter: ModelAdapter, patterns: Sequence[str]) -> list[str]:
    """Expand hook patterns (``vlm.layers.2,4.resid_post``) into concrete names against the adapter, so a
    sweep over layers is one pattern."""
    experts, sites = adapter.experts, adapter.sites
    picked = resolve_hooks(patterns, {s: experts[i.expert].n_layers for s, i in sites.items()},
                           {s: list(expert_streams(experts[i.expert])) for s, i in sites.items()})
    return [name for sel in picked.values() for name in sel.names()]


@dataclass
class _Resolved:
    iv: Intervention
    site: str
    expert: str
    layer: int
    stream: str
    tokens: str
    cache: dict = field(default_factory=dict)  # (device, dtype) -> tensors
    fired: int = 0  # firings in the current policy call (to pick denoising steps)


class Steering(HookSet):
    """Context manager that applies interventions to an adapter's model for every call inside it.

        with Steering(adapter, [Intervention("text_only.layers.3.resid_post", "add", 4.0, w)]) as steer:
            steer.begin(inputs)           # token spans of this batch (not needed for tokens = all)
            out = adapter.run(inputs, generators)
    """

    def __init__(self, adapter: ModelAdapter, interventions: Sequence[Intervention] = ()):
        self.adapter = adapter
        self.items = [self._resolve(iv) for iv in interventions]
        self._handles: list[Any] = []
        self._inputs: ModelInputs | None = None
        self._positions: dict[tuple[str, str, int], Any] = {}

    def _resolve(self, iv: Intervention) -> _Resolved:
        site, layer, stream = parse_hook(iv.hook)
        sites = self.adapter.sites
        if site not in sites:
            raise ToolkitError(f"model {self.adapter.name!r} has no site {site!r}; sites: {', '.join(sites)}")
        expert = self.adapter.experts[sites[site].expert]
        if stream not in expert_streams(expert):
            raise ToolkitError(f"site {site!r} has no stream {stream!r}; streams: "
                               f"{', '.join(expert_streams(expert))}")
        if not 0 <= layer < expert.n_layers:
            raise ToolkitError(f"site {site!r} has layers 0-{expert.n_layers - 1}, not {layer}")
        if iv.denoise is not None and not (expert.denoise_steps and all(0 <= d < expert.denoise_steps
                                                                          for d in iv.denoise)):
            raise ToolkitError(f"{iv.hook}: denoising steps {list(iv.denoise)} do not exist; the {expert.name} expert "
                               + (f"has steps 0-{expert.denoise_steps - 1}" if expert.denoise_steps
                                  else "runs once per policy call"))
        width = expert.hidden_size if stream in RESIDUAL_WIDTH else None  # other streams: checked when they fire
        if width and iv.vector is not None and iv.op != "clamp" and iv.vector.shape[0] != width:
            raise ToolkitError(f"{iv.hook} has {width} features but the {iv.op} vector has {iv.vector.shape[0]} "
                               f"({iv.source or 'given'}): it was made for another site, stream or model")
        if width and iv.units and not all(-width <= u < width for u in iv.units):
            raise ToolkitError(f"{iv.hook} has {width} features; --units {list(iv.units)} goes past them")
        if hook_point(expert, layer, stream)[2]:
            raise ToolkitError(f"{iv.hook} is derived from the hidden states (not a tensor the model passes on), "
                               "so it cannot be changed; intervene on a residual or sub-layer stream")
        return _Resolved(iv, site, expert.name, layer, stream, iv.tokens or sites[site].tokens)

    # hooks ---------------------------------------------------------------------------------
    def _register(self) -> None:
        groups: dict[tuple[str, str], list[_Resolved]] = defaultdict(list)
        for r in self.items:
            if r.iv.identity:
                continue
            path, direction, _ = hook_point(self.adapter.experts[r.expert], r.layer, r.stream)
            groups[(path, direction)].append(r)
        for (path, direction), items in groups.items():
            module = resolve_module(self.adapter.module, path)
            if direction == "output":
                self._handles.append(module.register_forward_hook(self._output_hook(items), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(items), with_kwargs=True))

    def _output_hook(self, items: list[_Resolved]):
        def hook(mod, args, kwargs, out):
            return _replace(out, self._apply(items, first_tensor(out)))
        return hook

    def _input_hook(self, items: list[_Resolved]):
        def hook(mod, args, kwargs):
            if args:
                return (_replace(args, self._apply(items, args[0])), kwargs)
            if "hidden_states" not in kwargs:
                raise ToolkitError(f"{items[0].iv.hook}: the module got no hidden states to change")
            return args, {**kwargs, "hidden_states": self._apply(items, kwargs["hidden_states"])}
        return hook

    # batches ---------------------------------------------------------------------------------
    def begin(self, inputs: ModelInputs | None) -> None:
        """The next policy call's inputs: their token spans place the edits (spans may differ per batch)."""
        self._inputs = inputs
        self._positions.clear()
        for r in self.items:
            r.fired = 0

    def _apply(self, items: list[_Resolved], x: torch.Tensor | None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ToolkitError(f"{items[0].iv.hook}: the module's value is {type(x).__name__}, not a tensor")
        shape = x.shape
        y = x.reshape(shape[0], -1, shape[-1])
        for r in items:
            r.fired += 1
            if r.iv.denoise is not None and r.fired - 1 not in r.iv.denoise:
                continue
            rows, pos = self._where(r, y)
            if pos is None:
                y = _op(r, y)
            else:
                y = y.clone()
                y[rows, pos] = _op(r, y[rows, pos])
        return y.reshape(shape)

    def _where(self, r: _Resolved, x: torch.Tensor):
        """(row index, position index) tensors of the tokens to edit, or (None, None) for all of them."""
        key = (r.site, r.tokens, x.shape[1])
        if key not in self._positions:
            self._positions[key] = self._positions_for(r, x)
        return self._positions[key]

    def _positions_for(self, r: _Resolved, x: torch.Tensor):
        inputs = self._inputs
        if inputs is None:
            if r.tokens == "all":
                return None, None
            raise ToolkitError(f"{r.iv.hook} edits tokens {r.tokens!r}: call Steering.begin(inputs) before the "
                               "policy call so their positions are known")
        batch, seq = x.shape[0], x.shape[1]
        sel = parse_tokens(r.tokens, inputs.spans.get(r.expert, {}), seq)
        if sel.last_valid:
            mask = inputs.token_mask.get(r.expert)
            if mask is None or tuple(mask.shape) != (batch, seq):
                last = torch.full((batch,), seq - 1, device=x.device)
            else:
                last = (mask.long() * torch.arange(1, seq + 1, device=x.device)).argmax(1)
            return torch.arange(batch, device=x.device), last
        if sel.positions is None:
            return None, None
        pos = torch.tensor(sel.positions, device=x.device)
        return torch.arange(batch, device=x.device)[:, None], pos[None, :]


def _replace(value: Any, y: torch.Tensor) -> Any:
    """``value`` with its hidden-state tensor replaced: a tensor, or the first item of a tuple/list."""
    if isinstance(value, torch.Tensor):
        return y
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return type(value)((y, *value[1:])) if isinstance(value, tuple) else [y, *value[1:]]
    raise ToolkitError(f"cannot intervene on a module that returns {type(value).__name__}")


def _tensor(r: _Resolved, name: str, x: torch.Tensor, make) -> torch.Tensor:
    key = (name, x.device, x.dtype)
    if key not in r.cache:
        r.cache[key] = make().to(x.device, x.dtype)
    return r.cache[key]


def _op(r: _Resolved, x: torch.Tensor) -> torch.Tensor:
    """The edit on the selected tokens x (..., F), in the model's dtype."""
    iv, a, n = r.iv, r.iv.alpha, x.shape[-1]
    if iv.vector is not None and iv.op != "clamp" and iv.vector.shape[0] != n:
        raise ToolkitError(f"{iv.hook} has {n} features but the {iv.op} vector has {iv.vector.shape[0]} "
                           f"({iv.source or 'given'}): it was made for another site, stream or model")
    if iv.op == "add":
        return x + _tensor(r, "d", x, lambda: torch.from_numpy(a * iv.vector))
    if iv.op == "ablate":
        q = _tensor(r, "q", x, lambda: torch.from_numpy(_basis(iv.vector)))
        return x - a * ((x @ q) @ q.T)
    if iv.op == "erase":
        left, right, offset = _eraser(iv)
        L = _tensor(r, "L", x, lambda: torch.from_numpy(left))
        R = _tensor(r, "R", x, lambda: torch.from_numpy(right))
        c = _tensor(r, "c", x, lambda: torch.from_numpy(a * offset))
        return x - a * ((x @ R) @ L.T) + c
    if iv.op == "zero":
        return x * (1 - a)
    if iv.op == "mean":
        mu = _tensor(r, "mu", x, lambda: torch.from_numpy(iv.vector))
        return x + a * (mu - x)
    units = list(iv.units)
    if max(units) >= n or min(units) < -n:
        raise ToolkitError(f"{iv.hook} has {n} features; --units {units} goes past them")
    u = _tensor(r, "u", x, lambda: torch.tensor(units)).long()
    v = _tensor(r, "v", x, lambda: torch.from_numpy(np.broadcast_to(
        iv.vector if iv.vector is not None else np.float64(iv.value), (len(units),)).copy()))
    y = x.clone()
    y[..., u] = x[..., u] + a * (v - x[..., u])
    return y


F32_EPS = float(np.finfo(np.float32).eps)


def _basis(v: np.ndarray) -> np.ndarray:
    """An orthonormal basis (F, k) of the direction(s) to project out, by SVD: singular values at or below
    max(F, m)·eps(float32)·σ_max are rounding noise (probes are saved in float32; a two-class probe's columns w
    and ≈−w span one direction).  ``toolkit.analysis.directions.direction_basis`` is the same rule."""
    m = v.reshape(v.shape[0], -1)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    return np.ascontiguousarray(u[:, s > max(m.shape) * F32_EPS * s[0]])


def _eraser(iv: Intervention) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L, R, c @ R @ Lᵀ) of an erase: without ``right`` the orthogonal projection off the span of ``vector``."""
    left = iv.vector.reshape(len(iv.vector), -1)
    right = iv.right
    if right is None:
        left = right = _basis(left)
    offset = np.zeros(left.shape[0]) if iv.center is None else (iv.center @ right) @ left.T
    return np.ascontiguousarray(left), np.ascontiguousarray(right), offset
