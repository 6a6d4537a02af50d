"""Capture options besides the index grammar (which is ``toolkit.sdk.names``'s): tokens, pooling, storage dtype,
and the ``SPEC``/``SITE=SPEC`` per-site form of the CLI options.

    tokens:  all | last | text | image | image.base | 0,5,-1 | 3-7 | text,-1
    pool:    none | mean | last
    dtype:   float32 | float16 | bfloat16
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.sdk.adapters import DTYPES
from toolkit.sdk.errors import ToolkitError
from toolkit.sdk.names import IndexSpec

POOLS = ("none", "mean", "last")


@dataclass(frozen=True)
class TokenSelection:
    """Resolved token positions for one expert's sequence and whether 'last' means last real token."""

    positions: tuple[int, ...] | None  # None = every position
    last_valid: bool = False  # 'last': the last non-padding token of each sample

    def count(self, seq_len: int) -> int:
        if self.last_valid:
            return 1
        return seq_len if self.positions is None else len(self.positions)


def parse_tokens(spec: str, spans: dict[str, list[int]], seq_len: int) -> TokenSelection:
    """Resolve a token spec (span names, indices, ranges; ``toolkit.sdk.names`` grammar) for ``seq_len`` tokens."""
    spec = str(spec).strip()
    if spec in ("", "all"):
        return TokenSelection(None)
    if spec == "last":
        return TokenSelection(None, last_valid=True)
    parsed = IndexSpec.parse(spec, "token", names=spans)
    out = parsed.resolve(seq_len, names=spans, where=f"in a sequence of {seq_len}")
    if not out:
        raise ToolkitError(f"token selection {spec!r} selects no tokens")
    return TokenSelection(tuple(out))


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise ToolkitError(f"unknown pooling {pool!r}: use one of {', '.join(POOLS)}")
    return pool


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ToolkitError(f"unknown storage dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def per_site(values: tuple[str, ...] | list[str] | str | None, sites: list[str], default: dict[str, str] | str,
             option: str) -> dict[str, str]:
    """Resolve a CLI option given as ``SPEC`` (all sites) and/or ``site=SPEC`` entries."""
    if isinstance(default, str):
        out = {s: default for s in sites}
    else:
        out = dict(default)
    if values is None:
        return out
    if isinstance(values, str):
        values = [values]
    specific = [v.split("=", 1) for v in values if "=" in v]
    for v in values:  # a bare SPEC applies to every site; site=SPEC entries then override it
        if "=" not in v:
            out = {s: v for s in sites}
    for site, spec in specific:
        if site not in sites:
            raise ToolkitError(f"{option} names site {site!r}, which is not captured; sites: {', '.join(sites)}")
        out[site] = spec
    return out
