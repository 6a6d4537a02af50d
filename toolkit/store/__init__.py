"""The store: one Zarr v3 store per run, local or on object storage; writer, reader, checksums, lock, verify.

Never imports torch or transformers: a store is read and checked with numpy and zarr alone.  Names load on first
use, so ``toolkit.store.location`` (what the CLI's STORE argument needs) imports no zarr."""

import importlib

_API = {"ArraySpec": "toolkit.store.layout", "CorruptStoreError": "toolkit.store.chunks",
        "Store": "toolkit.store.reader", "open_store": "toolkit.store.reader", "StoreWriter": "toolkit.store.writer"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'toolkit.store' has no attribute {name!r}")
