"""What to capture: a user's selection (sites, layers, streams, tokens, pooling, dtype) resolved against a
model's experts into a plan, one ``SiteCapture`` per site, and where each named stream lives in the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from toolkit.capture.tokens import check_dtype, check_pool, parse_tokens, per_site
from toolkit.sdk.adapters import DECODER_STREAMS, DEFAULT_STREAMS, STREAM_ALIASES, Expert, SiteInfo
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import IndexSpec, hook_name, resolve_hooks


def expert_streams(expert: Expert) -> dict[str, tuple[str, ...]]:
    return expert.streams or DECODER_STREAMS


def default_stream(expert: Expert) -> str:
    """resid_post where the expert has it, else its first stream (e.g. RoboVLMs' ``context``)."""
    offered = expert_streams(expert)
    return ",".join(s for s in DEFAULT_STREAMS if s in offered) or next(iter(offered))


def canonical_stream(name: str) -> str:
    return STREAM_ALIASES.get(name, name)


def hook_point(expert: Expert, layer: int, stream: str) -> tuple[str, str, str]:
    """Where a named stream lives: (module path from the adapter's root, "input" | "output", transform or "");
    capture reads there and ``toolkit.capture.intervention`` writes there."""
    direction, sub, *transform = expert_streams(expert)[stream]
    index = str(layer) if expert.layered else ""
    return ".".join(p for p in (expert.layers_path, index, sub) if p), direction, transform[0] if transform else ""


@dataclass(frozen=True)
class SiteCapture:
    """What to keep from one site: layers, streams, tokens, pooling and storage dtype."""

    site: str
    expert: str
    layers: tuple[int, ...]
    streams: tuple[str, ...]
    tokens: str
    pool: str
    dtype: str

    def names(self) -> list[str]:
        return [hook_name(self.site, layer, s) for layer in self.layers for s in self.streams]


def build_plan(
    model: str,
    experts: dict[str, Expert],
    known: dict[str, SiteInfo],
    sites: list[str] | None = None,
    layers: Any = None,
    tokens: Any = None,
    pool: Any = None,
    streams: Any = None,
    dtype: str = "float16",
    hooks: list[str] | None = None,
) -> list[SiteCapture]:
    """Validate the user's selection against the adapter and resolve it per site.

    ``layers``/``tokens``/``pool``/``streams`` take ``SPEC`` for every site or ``site=SPEC`` for one;
    ``hooks`` (``vlm.layers.*.resid_post``, ``toolkit.sdk.names``) choose sites, layers and streams in one go.
    """
    check_dtype(dtype)
    if hooks:
        if sites or layers or streams:
            raise ToolkitError("give either --hook or --site/--layer/--stream, not both")
        picked = resolve_hooks(hooks, {s: experts[i.expert].n_layers for s, i in known.items()},
                               {s: list(expert_streams(experts[i.expert])) for s, i in known.items()})
        sites = list(picked)
        layers = [f"{s}={','.join(map(str, p.layers))}" for s, p in picked.items()]
        streams = [f"{s}={','.join(p.streams)}" for s, p in picked.items()]
    sites = list(sites) if sites else list(known)
    for s in sites:
        if s not in known:
            raise ToolkitError(f"model {model!r} has no site {s!r}; sites: {', '.join(known)}")
    layer_specs = per_site(layers, sites, "all", "--layers")
    token_specs = per_site(tokens, sites, {s: known[s].tokens for s in sites}, "--tokens")
    pool_specs = per_site(pool, sites, {s: known[s].pool for s in sites}, "--pool")
    stream_specs = per_site(streams, sites, {s: default_stream(experts[known[s].expert]) for s in sites}, "--streams")
    plan = []
    for s in sites:
        expert = experts[known[s].expert]
        offered = expert_streams(expert)
        chosen = []
        for name in stream_specs[s].split(","):
            name = canonical_stream(name.strip())
            if name == "all":
                chosen.extend(offered)
            elif name not in offered:
                raise ToolkitError(f"site {s!r} has no stream {name!r}; streams: {', '.join(offered)}")
            else:
                chosen.append(name)
        plan.append(SiteCapture(
            site=s,
            expert=expert.name,
            layers=tuple(IndexSpec.parse(layer_specs[s]).resolve(expert.n_layers, where=f"at site {s!r}")),
            streams=tuple(dict.fromkeys(chosen)),
            tokens=token_specs[s],
            pool=check_pool(pool_specs[s]),
            dtype=dtype,
        ))
    return plan


def plan_spec(plan: list[SiteCapture]) -> list[dict[str, Any]]:
    return [asdict(p) for p in plan]


def stored_token_positions(sc: SiteCapture, spans: dict[str, list[int]], seq_len: int) -> list[int]:
    """The site's stored token coordinate: the positions kept, or [-1] when pooled to one vector."""
    sel = parse_tokens(sc.tokens, spans, seq_len)
    if sc.pool != "none" or sel.last_valid:
        return [-1]
    return list(sel.positions) if sel.positions is not None else list(range(seq_len))
