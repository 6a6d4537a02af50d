"""Codec knowledge in one place: what ``--codec`` names mean per stored dtype, the zarr codec chain of an array,
the same chain as numcodecs objects for direct chunk I/O (byte-identical to zarr's), and how values decode."""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError

CODECS = ("auto", "zstd", "blosc", "blosc-lz4", "none")


# crc32c over a chunk followed by its own little-endian checksum is the same for every chunk (the residue)
CRC32C_RESIDUE = 0x48674BC7


def crc32c(buf: Any, value: int = 0) -> int:
    """crc32c of any buffer (bytes, memoryview, contiguous array) without copying it; releases the GIL.
    ``value``: the crc32c of the bytes before ``buf``, to continue a checksum piece by piece."""
    import crc32c

    return crc32c.crc32c(buf, value)


def codec_for(codec: str, stored_dtype: str) -> str:
    """The codec ``auto`` stands for, per stored dtype, from measurements on activation-like data
    (benchmarks/bench_write.py): bfloat16 and float32 bit patterns compress with blosc-lz4 + bitshuffle at
    close to memcpy speed (bf16: ~0.87 of the size); no fast codec shrinks float16 activations (zstd-1 saved
    6 % at half the throughput), so they are stored raw; small integer fields and strings get zstd."""
    if codec != "auto":
        return codec
    if stored_dtype in ("bfloat16", "float32", "float64"):
        return "blosc-lz4"
    if stored_dtype == "float16":
        return "none"
    return "zstd"


def compressors_for(codec: str, stored_dtype: str) -> list:
    """The bytes-to-bytes codec chain of an array: the compressor, then a crc32c checksum of the result."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    codec = codec_for(codec, stored_dtype)
    if codec == "none":
        return [Crc32cCodec()]
    if codec == "zstd":
        return [ZstdCodec(level=1), Crc32cCodec()]
    if codec == "blosc":  # zstd with byte shuffle: smaller than blosc-lz4, several times slower
        return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()]
    if codec == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]
    raise ToolkitError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")


def codec_name(arr) -> str:
    """The ``--codec`` name of an array's compressor, read from its metadata (``auto`` resolves per array)."""
    for c in arr.metadata.codecs:
        name = c.__class__.__name__
        if name == "ZstdCodec":
            return "zstd"
        if name == "BloscCodec":
            return "blosc-lz4" if getattr(c.cname, "name", c.cname) == "lz4" else "blosc"
    return "none"


def decode(values: np.ndarray, stored_dtype: str | None) -> np.ndarray:
    """Stored values -> numpy; bfloat16 bit patterns become float32 (exactly)."""
    if stored_dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values


_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def numcodecs_chain(meta) -> list | None:
    """numcodecs-style codecs for the layouts this package writes (little-endian bytes, then zstd/blosc, then
    crc32c), in encoding order; None for anything else (read and written through zarr).  Configured exactly as
    zarr configures them, so a chunk encoded here is byte-identical to zarr's."""
    if getattr(meta, "zarr_format", 3) != 3 or meta.chunk_grid.__class__.__name__ != "RegularChunkGrid":
        return None
    codecs = list(meta.codecs)
    if not codecs or codecs[0].__class__.__name__ != "BytesCodec" or getattr(meta.dtype, "to_native_dtype", None) is None:
        return None
    if np.dtype(meta.dtype.to_native_dtype()).kind not in "biuf":
        return None
    endian = getattr(codecs[0], "endian", None)
    if endian is not None and getattr(endian, "value", endian) != "little":
        return None
    out: list = []
    for c in codecs[1:]:
        name = c.__class__.__name__
        if name == "Crc32cCodec":
            out.append("crc32c")
        elif name == "ZstdCodec":
            import numcodecs

            out.append(numcodecs.Zstd.from_config({"level": c.level, "checksum": c.checksum}))
        elif name == "BloscCodec":
            import numcodecs

            shuffle = getattr(c.shuffle, "name", c.shuffle)
            out.append(numcodecs.Blosc.from_config({"cname": getattr(c.cname, "name", c.cname), "clevel": c.clevel,
                                                    "shuffle": _BLOSC_SHUFFLE[shuffle], "blocksize": c.blocksize,
                                                    "typesize": c.typesize}))
        else:
            return None
    return out


def encode_chunk(block: np.ndarray, codecs: list) -> list[Any]:
    """One full chunk as stored, in parts to write one after the other (no copy to join them): little-endian
    values through the chain (numcodecs and crc32c release the GIL, so a thread pool encodes chunks in
    parallel)."""
    data: Any = np.ascontiguousarray(block).view(np.uint8).reshape(-1)
    parts: list[Any] = []
    for c in codecs:
        if c == "crc32c":  # zarr's crc32c codec appends the checksum of everything before it, little-endian
            data = b"".join(parts) + bytes(data) if parts else data
            parts = [data, crc32c(data).to_bytes(4, "little")]
            data = b""
        else:
            data = c.encode(b"".join(parts) + bytes(data) if parts else data)
            parts = []
    return parts + ([bytes(data)] if len(data) else [])


def decoded_size(codec: Any, buf: memoryview) -> int | None:
    """The size a zstd frame or blosc buffer says it decodes to, from its header (None: not stated), so a chunk is
    decoded into the reader's output only when it fills it exactly."""
    name = getattr(codec, "codec_id", "")
    if name == "blosc" and len(buf) >= 16:  # blosc header: version, versionlz, flags, typesize, nbytes (int32 LE)
        return int.from_bytes(buf[4:8], "little")
    if name == "zstd" and len(buf) >= 6 and bytes(buf[:4]) == b"\x28\xb5\x2f\xfd":  # RFC 8878 frame header
        descriptor = buf[4]
        single_segment = (descriptor >> 5) & 1
        width = (single_segment, 2, 4, 8)[descriptor >> 6]
        pos = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
        if width and len(buf) >= pos + width:
            return int.from_bytes(buf[pos:pos + width], "little") + (256 if width == 2 else 0)
    return None
