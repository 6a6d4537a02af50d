"""toolkit: capture, store and probe the hidden states of Vision-Language-Action robot policies.

The public Python API mirrors the CLI:

    import toolkit
    toolkit.extract(model="pi0", dataset="libero", store="stores/libero.zarr")
    store = toolkit.open_store("stores/libero.zarr")
    store.read("vlm", "resid_post", layer=5)       # (samples, token, feature) numpy array
"""

__version__ = "0.1.0"

import os  # noqa: E402

# Bit-for-bit reproducible runs (a resumed, an interrupted or a Ray-split run equals an uninterrupted one):
# MKL, torch's CPU BLAS, otherwise picks kernels by the memory alignment of its operands, so two runs of the same
# batch can differ in the last bit (seen once in CI: one sample's action at 7e-7).  Its conditional numerical
# reproducibility mode removes that; it is read when MKL first runs, so set it before torch computes anything.
# A user's own MKL_CBWR wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from toolkit.errors import ToolkitError  # noqa: E402
from toolkit.store import open_store  # noqa: E402
from toolkit.extract import extract, import_latents  # noqa: E402

__all__ = ["ToolkitError", "open_store", "extract", "import_latents", "__version__"]
