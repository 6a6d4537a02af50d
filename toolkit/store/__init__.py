"""The store: one Zarr v3 store per run, local or on object storage; writer, reader, checksums, lock, verify.

Never imports torch or transformers: a store is read and checked with numpy and zarr alone."""

from toolkit.store.core import ArraySpec, CorruptStoreError, Store, StoreWriter, open_store

__all__ = ["ArraySpec", "CorruptStoreError", "Store", "StoreWriter", "open_store"]
