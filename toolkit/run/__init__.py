"""Running a policy over a dataset: the run specification, the pipeline and its executors (local, Ray).
Names load on first use, so ``toolkit.run.spec`` (what the CLI builds its flags from) imports no torch."""

import importlib

_API = {"RunSpec": "toolkit.run.spec", "extract": "toolkit.run.api", "import_latents": "toolkit.run.api"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'toolkit.run' has no attribute {name!r}")
