"""The zarr store a writer uses on object storage: zarr's own writes (array metadata on resize, chunks it encodes
itself) go through the ``Location``, so through the writer's lease fence (``toolkit.store.lock.LeaseLock``):
each is made only while the lease is this run's, and only if the object is as this run last saw it."""

from __future__ import annotations

import asyncio
from typing import Any

from zarr.storage import WrapperStore


class FencedStore(WrapperStore):
    """A zarr ``FsspecStore`` whose writes and deletes go through ``loc.put`` / the lease's ``delete``."""

    def __init__(self, store: Any, loc: Any):
        super().__init__(store)
        self._loc = loc

    def _with_store(self, store: Any) -> FencedStore:
        return type(self)(store, self._loc)

    # what toolkit.store.chunks reads off a zarr store to find its objects
    @property
    def fs(self) -> Any:
        return self._store.fs

    @property
    def path(self) -> str:
        return self._store.path

    async def set(self, key: str, value: Any) -> None:
        await asyncio.to_thread(self._loc.put, key, value.to_bytes())

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        if not await self._store.exists(key):
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        fence = self._loc.fence
        if fence is None:
            await self._store.delete(key)
            return
        await asyncio.to_thread(fence.delete, [self._loc.key(key)])

    async def delete_dir(self, prefix: str) -> None:
        fence = self._loc.fence
        if fence is not None:
            fence.check()
        await self._store.delete_dir(prefix)
        if fence is not None:
            fence.forget(self._loc.key(prefix.rstrip("/")))
