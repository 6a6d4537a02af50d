"""toolkit: capture, store and probe the hidden states of Vision-Language-Action robot policies.

The public Python API mirrors the CLI:

    import toolkit
    toolkit.extract(model="pi0", dataset="libero", store="stores/libero.zarr")
    store = toolkit.open_store("stores/libero.zarr")
    store.read("vlm", "resid_post", layer=5)       # (samples, token, feature) numpy array
"""

__version__ = "0.1.0"

from toolkit.errors import ToolkitError  # noqa: E402
from toolkit.store import open_store  # noqa: E402
from toolkit.extract import extract, import_latents  # noqa: E402

__all__ = ["ToolkitError", "open_store", "extract", "import_latents", "__version__"]
