"""toolkit: capture, store and probe the hidden states of Vision-Language-Action robot policies.

The public Python API mirrors the CLI and loads lazily (``import toolkit`` imports no torch):

    import toolkit
    toolkit.extract(model="pi0", dataset="libero", store="stores/libero.zarr")
    store = toolkit.open_store("stores/libero.zarr")
    store.read("vlm.layers.-1.resid_post")          # (samples, token, feature) numpy array
"""

from __future__ import annotations

import importlib
import os

__version__ = "0.1.0"

# Bit-for-bit reproducible runs (a resumed, an interrupted or a Ray-split run equals an uninterrupted one):
# MKL, torch's CPU BLAS, otherwise picks kernels by the memory alignment of its operands, so two runs of the same
# batch can differ in the last bit (seen once in CI: one sample's action at 7e-7).  Its conditional numerical
# reproducibility mode removes that; it is read when MKL first runs, so set it before torch computes anything.
# A user's own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# public name -> module that defines it; imported on first use
_API = {
    "ToolkitError": "toolkit.sdk.errors",
    "open_store": "toolkit.store",
    "Store": "toolkit.store",
    "extract": "toolkit.run",
    "import_latents": "toolkit.run",
    "RunSpec": "toolkit.run",
    "probe": "toolkit.analysis.probe",
    "view": "toolkit.analysis.view",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
