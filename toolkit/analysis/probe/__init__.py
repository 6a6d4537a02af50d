"""Linear probes on a toolkit store: nested episode cross-validation, calibrated intervals, controls,
baselines, MDL, reports.

    from toolkit.analysis.probe import probe, Selection, ProbeConfig
    results = probe("stores/libero.zarr", Selection(site="vlm", layers="all"), targets=["task"])
    results.table()                      # tidy pandas table, one row per probe
    results.save("results/vlm")          # CSV + JSON + weights; `toolkit report results/vlm` makes the report
"""

from toolkit.analysis.probe.engine import SOLVERS, ProbeConfig, probe
from toolkit.analysis.probe.results import Direction, Results, load_direction
from toolkit.analysis.probe.select import Selection, resolve
from toolkit.analysis.probe.solvers import LAMBDAS, CosineOptions

__all__ = ["probe", "ProbeConfig", "Selection", "Results", "Direction", "load_direction", "resolve", "CosineOptions",
           "LAMBDAS", "SOLVERS"]
