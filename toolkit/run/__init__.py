"""Running a policy over a dataset: the run specification, the pipeline and its executors (local, Ray)."""

from toolkit.run.pipeline import ExtractSpec as RunSpec
from toolkit.run.pipeline import extract, import_latents

__all__ = ["RunSpec", "extract", "import_latents"]
