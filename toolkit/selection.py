"""Parsing of the capture selection syntax: layers, token positions/spans, pooling, storage dtype.

    layers:  all | 0,5,17 | 0-5 | -1 | 0-5,-1
    tokens:  all | last | text | image | image.base | 0,5,-1 | 3-7 | text,-1
    pool:    none | mean | last
    dtype:   float32 | float16 | bfloat16
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from toolkit.errors import ToolkitError

POOLS = ("none", "mean", "last")
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_RANGE = re.compile(r"^(-?\d+)-(-?\d+)$")
_INT = re.compile(r"^-?\d+$")


def parse_layers(spec: str, n_layers: int, what: str = "layer") -> list[int]:
    """Resolve a layer spec against a model with ``n_layers`` layers (negative indices count back)."""
    spec = str(spec).strip()
    valid = f"valid {what}s are 0-{n_layers - 1} (or -{n_layers}..-1)"
    if spec in ("", "all"):
        return list(range(n_layers))

    def resolve(i: int) -> int:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ToolkitError(f"{what} {i} is out of range: {valid}")
        return j

    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if _INT.match(part):
            out.append(resolve(int(part)))
        elif m := _RANGE.match(part):
            a, b = resolve(int(m.group(1))), resolve(int(m.group(2)))
            if a > b:
                raise ToolkitError(f"{what} range {part!r} is empty: write the lower bound first")
            out.extend(range(a, b + 1))
        else:
            raise ToolkitError(f"malformed {what} selection {spec!r}: use all, 0,5,17, 0-5 or -1")
    if len(set(out)) != len(out):
        raise ToolkitError(f"{what} selection {spec!r} names a {what} twice")
    return out


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
    """Resolve a token spec (span names, indices, ranges) for a sequence of ``seq_len`` tokens."""
    spec = str(spec).strip()
    if spec in ("", "all"):
        return TokenSelection(None)
    if spec == "last":
        return TokenSelection(None, last_valid=True)
    known = ", ".join(["all", "last", *spans]) + ", or positions like 0,5,-1 / 3-7"
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if part in spans:
            out.extend(spans[part])
        elif _INT.match(part) or _RANGE.match(part):
            try:
                out.extend(parse_layers(part, seq_len, what="token position"))
            except ToolkitError as e:
                raise ToolkitError(f"{e} (sequence has {seq_len} tokens)") from None
        else:
            raise ToolkitError(f"malformed token selection {spec!r}: unknown span {part!r}; use {known}")
    if not out:
        raise ToolkitError(f"token selection {spec!r} selects no tokens")
    return TokenSelection(tuple(out))


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise ToolkitError(f"unknown pooling {pool!r}: use one of {', '.join(POOLS)}")
    return pool


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in STORAGE_DTYPES:
        raise ToolkitError(f"unknown storage dtype {dtype!r}: use one of {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[dtype]


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
