"""Linear probes on a toolkit store: streamed ridge sweeps, honest episode splits, control tasks, reports.

    from toolkit.probe import probe, Selection, ProbeConfig
    results = probe("stores/libero.zarr", Selection(site="vlm", layers="all"), targets=["task"])
    results.table()                      # tidy pandas table, one row per probe
    results.save("results/vlm")          # CSV + JSON + weights; `toolkit report results/vlm` makes the report
"""

from toolkit.probe.engine import SOLVERS, ProbeConfig, probe
from toolkit.probe.results import Results
from toolkit.probe.select import Selection, resolve
from toolkit.probe.solvers import LAMBDAS, CosineOptions

__all__ = ["probe", "ProbeConfig", "Selection", "Results", "resolve", "CosineOptions", "LAMBDAS", "SOLVERS"]
