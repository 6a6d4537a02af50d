"""pi0.5's state/action statistics: quantiles (q01/q99) by default, mean/std where the checkpoint's config says.

* lerobot (``normalization_mapping``: STATE and ACTION -> QUANTILES by default for pi0.5; the saved processor's
  ``norm_map`` wins): read and applied by ``toolkit_plugins.pi0.normalise`` (the same processor files as pi0).
* openpi (``assets/<asset id>/norm_stats.json``): pi0.5 trains with quantiles (openpi's ``use_quantile_norm`` is
  true for every model but pi0): ``toolkit_plugins.pi0.normalise.openpi_stats(path, "QUANTILES")``, i.e.
  ``(x - q01[:d]) / (q99[:d] - q01[:d] + 1e-6) * 2 - 1``, inverse ``(x + 1) / 2 * (q99 - q01 + 1e-6) + q01``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit_plugins.pi0 import normalise as pi0_normalise
from toolkit_plugins.pi0.normalise import Normalisation

DEFAULT_MAPPING = {"STATE": "QUANTILES", "ACTION": "QUANTILES"}  # lerobot PI05Config.normalization_mapping


def openpi_stats(path: Path) -> Normalisation:
    """``norm_stats.json`` as openpi writes it; pi0.5 uses its q01/q99 (openpi's ``use_quantiles``)."""
    return pi0_normalise.openpi_stats(path, "QUANTILES")


def with_default_mapping(meta: dict[str, Any]) -> dict[str, Any]:
    """The config with pi0.5's quantile default where it names no normalisation mode."""
    return {**meta, "normalization_mapping": {**DEFAULT_MAPPING, **(meta.get("normalization_mapping") or {})}}


def find(directory: Path, meta: dict[str, Any], override: str | None) -> Normalisation | None:
    """The checkpoint's statistics, as ``toolkit_plugins.pi0.normalise.find`` finds them, with pi0.5's quantile
    default (lerobot's mapping where the config names none, openpi's q01/q99)."""
    return pi0_normalise.find(directory, with_default_mapping(meta), override, "QUANTILES")
