"""Hook-based capture of hidden states, addressed by stable public names.

A site (``vlm``, ``text_only``, ``action``) reads one expert's layers through a token selection and
a pooling; each layer offers streams (``resid_post``, ``resid_mid``, ...).  Public names follow
TransformerLens' style: ``vlm.layers.5.resid_post``.

Guarantees:
* hooks never change the model's outputs (every hook returns ``None``);
* hooks are removed when the ``Capture`` context exits, also after an exception;
* tensor and tuple outputs (transformers 4.x / remote code) are both handled;
* token selection, pooling and the cast to the storage dtype run on the model's device, so only
  the kept values cross to the host, once per site and stream per batch.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from toolkit.capture.plan import SiteCapture, hook_point
from toolkit.capture.tokens import TokenSelection, check_dtype, parse_tokens
from toolkit.sdk.adapters import ModelAdapter, ModelInputs
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import hook_name


def _rms_scale(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """The RMSNorm scale per token, 1/sqrt(mean(x^2) + eps), as a (..., 1) feature."""
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None) or 1e-6
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def _flatten_tokens(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """(B, ..., F) -> (B, T, F): e.g. RoboVLMs' act_head input (batch, window, latent, feature)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


TRANSFORMS = {"rms_scale": _rms_scale, "flatten_tokens": _flatten_tokens}


def first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    return None


def resolve_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        raise ToolkitError(f"module path {path!r} does not exist in {type(root).__name__}") from None


def select_tokens(x: torch.Tensor, sel: TokenSelection, pool: str, mask: torch.Tensor | None,
                  positions: torch.Tensor | None) -> torch.Tensor:
    """(B, T, F) -> (B, T_kept, F): keep the selected positions and pool them, on x's device."""
    batch, seq = x.shape[0], x.shape[1]
    if mask is None or mask.shape != (batch, seq):
        mask = torch.ones(batch, seq, dtype=torch.bool, device=x.device)
    if positions is not None:
        x = x.index_select(1, positions)
        mask = mask.index_select(1, positions)
    if sel.last_valid or pool == "last":
        idx = (mask.long() * torch.arange(1, mask.shape[1] + 1, device=x.device)).argmax(1)
        return x[torch.arange(batch, device=x.device), idx][:, None]
    if pool == "mean":
        w = mask.to(torch.float32)[..., None]
        return ((x.float() * w).sum(1) / w.sum(1).clamp_min(1.0))[:, None]
    return x


class HookSet:
    """Hooks registered by ``_register`` on entering the context and removed on exit, also after an exception
    (shared by capture and ``toolkit.capture.intervention.Steering``)."""

    _handles: list[Any]

    def __enter__(self):
        try:
            self._register()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _register(self) -> None:
        raise NotImplementedError


class Capture(HookSet):
    """Context manager that hooks the planned sites of a model and collects one batch at a time.

        with Capture(adapter, plan) as cap:
            cap.begin(inputs)
            out = adapter.run(inputs, generators)
            arrays = cap.collect()     # {"vlm/resid_post": (B, L, T, F) numpy, ...}
    """

    def __init__(self, adapter: ModelAdapter, plan: list[SiteCapture]):
        self.adapter = adapter
        self.plan = plan
        self.experts = adapter.experts
        self._handles: list[Any] = []
        self._inputs: ModelInputs | None = None
        self._buffers: dict[tuple[str, str, int], list[torch.Tensor]] = defaultdict(list)
        self._calls: dict[tuple[str, str, int], int] = defaultdict(int)  # firings seen (record_call experts)
        self._raw: dict[tuple[str, str, int], list[torch.Tensor]] = defaultdict(list)  # record_call < 0
        self._positions: dict[tuple[str, str, int], tuple[TokenSelection, torch.Tensor | None]] = {}

    # hooks ---------------------------------------------------------------------------------
    def _register(self) -> None:
        root = self.adapter.module
        # (module path, direction, transform) -> consumers [(site capture, layer, stream)]
        points: dict[tuple[str, str, str], list[tuple[SiteCapture, int, str]]] = defaultdict(list)
        for sc in self.plan:
            expert = self.experts[sc.expert]
            for layer in sc.layers:
                for stream in sc.streams:
                    points[hook_point(expert, layer, stream)].append((sc, layer, stream))
        by_module: dict[tuple[str, str], list[tuple[str, list]]] = defaultdict(list)
        for (path, direction, transform), consumers in points.items():
            by_module[(path, direction)].append((transform, consumers))
        for (path, direction), groups in by_module.items():
            module = resolve_module(root, path)
            if direction == "output":
                fn = self._make_hook(module, groups, output=True)
                self._handles.append(module.register_forward_hook(fn, with_kwargs=True))
            else:
                fn = self._make_hook(module, groups, output=False)
                self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def _make_hook(self, module: torch.nn.Module, groups: list[tuple[str, list]], output: bool):
        def hook(mod, args, kwargs, out=None):
            if self._inputs is None:
                return None  # a forward outside begin()/collect(): nothing to record
            value = out if output else (args[0] if args else kwargs.get("hidden_states"))
            x = first_tensor(value)
            if x is None:
                return None
            x = x.detach()  # reading only: never part of an autograd graph
            for transform, consumers in groups:
                y = TRANSFORMS[transform](x, module) if transform else x
                for sc, layer, stream in consumers:
                    self._record(sc, layer, stream, y)
            return None

        if output:
            return lambda mod, args, kwargs, out: hook(mod, args, kwargs, out)
        return lambda mod, args, kwargs: hook(mod, args, kwargs)

    def _record(self, sc: SiteCapture, layer: int, stream: str, x: torch.Tensor) -> None:
        keep = self.experts[sc.expert].record_call
        if keep is not None:  # only one firing of several is wanted
            n = self._calls[(sc.site, stream, layer)]
            self._calls[(sc.site, stream, layer)] = n + 1
            if keep >= 0 and n != keep:
                return
            if keep < 0:  # which firing is kept is known only at the end: hold the raw tensors, select then
                raw = self._raw[(sc.site, stream, layer)]
                raw.append(x.detach())
                del raw[:-(-keep)]
                return
        self._buffers[(sc.site, stream, layer)].append(self._select(sc, x))

    def _select(self, sc: SiteCapture, x: torch.Tensor) -> torch.Tensor:
        key = (sc.site, sc.expert, x.shape[1])
        if key not in self._positions:
            self._positions[key] = self._selector(sc, x)
        return self._positions[key](x).to(check_dtype(sc.dtype))

    def _selector(self, sc: SiteCapture, x: torch.Tensor):
        """Resolve a site's tokens/pooling once per batch into the cheapest function of the hidden states
        (hooks fire per layer and per denoising step, so per-call work is what capture costs)."""
        inputs = self._inputs
        batch, seq = x.shape[0], x.shape[1]
        sel = parse_tokens(sc.tokens, inputs.spans.get(sc.expert, {}), seq)
        pos = None if sel.positions is None else torch.tensor(sel.positions, device=x.device)
        mask = inputs.token_mask.get(sc.expert)
        if mask is not None and tuple(mask.shape) != (batch, seq):
            mask = None
        if mask is not None and pos is not None:
            mask = mask.index_select(1, pos)
        take = (lambda t: t) if pos is None else (lambda t: t.index_select(1, pos))
        if sel.last_valid or sc.pool == "last":
            return lambda t: select_tokens(t, sel, sc.pool, inputs.token_mask.get(sc.expert), pos)
        if sc.pool == "mean":
            if mask is None or bool(mask.all()):
                return lambda t: take(t).mean(1, keepdim=True, dtype=torch.float32)
            w = mask.to(torch.float32)
            w = (w / w.sum(1, keepdim=True).clamp_min(1.0))[:, None, :]  # (B, 1, T): masked mean weights
            return lambda t: torch.bmm(w, take(t).float())
        return take

    # batches ---------------------------------------------------------------------------------
    def begin(self, inputs: ModelInputs) -> None:
        self._inputs = inputs
        self._buffers.clear()
        self._calls.clear()
        self._raw.clear()
        self._positions.clear()  # spans may differ between batches

    def collect(self) -> dict[str, np.ndarray]:
        """Arrays for the batch, keyed ``site/stream``: (B, layer, [denoise,] token, feature)."""
        out: dict[str, np.ndarray] = {}
        try:
            for sc in self.plan:
                expert = self.experts[sc.expert]
                for stream in sc.streams:
                    per_layer = []
                    for layer in sc.layers:
                        got = self._buffers.get((sc.site, stream, layer), [])
                        want = expert.denoise_steps or 1
                        if expert.record_call is not None:
                            fired = self._calls.get((sc.site, stream, layer), 0)
                            keep = expert.record_call
                            if fired < (keep + 1 if keep >= 0 else -keep):
                                raise ToolkitError(
                                    f"{hook_name(sc.site, layer, stream)} fired {fired} times in one policy call, "
                                    f"but firing {keep} is the one to keep: the adapter's expert description "
                                    "does not match the model")
                            got = [self._select(sc, self._raw[(sc.site, stream, layer)][0])] if keep < 0 else got[:1]
                        if len(got) != want:
                            raise ToolkitError(
                                f"{hook_name(sc.site, layer, stream)} fired {len(got)} times in one policy call, "
                                f"expected {want}: the adapter's expert description does not match the model")
                        per_layer.append(torch.stack(got, 1) if expert.denoise_steps else got[0])
                    stacked = torch.stack(per_layer, 1)
                    out[f"{sc.site}/{stream}"] = to_numpy(stacked)
        finally:
            self._inputs = None
            self._buffers.clear()
            self._calls.clear()
            self._raw.clear()
        return out


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Host copy; bfloat16 travels as its 16-bit pattern (uint16), decoded again on read."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy().view(np.uint16)
    return t.cpu().numpy()
