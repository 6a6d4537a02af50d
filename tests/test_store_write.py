"""The store's write and read fast paths: layer-major block buffers written without a gather, blocks that start
inside a chunk (early commits) going through zarr from those buffers, compressed chunks decoded straight into
Store.read's output, and damage still caught on every path."""

import numpy as np
import pytest
import zarr

import toolkit
from toolkit.store.chunks import CorruptStoreError, crc32c as _crc32c
from toolkit.store.codecs import encode_chunk
from toolkit.store.layout import ArraySpec
from toolkit.store.writer import _block_buffer, StoreWriter


def _write(path, codec, x, chunk_samples, batch, commit_samples=None):
    w = StoreWriter(path, codec=codec)
    w.initialize({"model": "m"},
                 [ArraySpec("vlm/resid_post", x.shape[1:], str(x.dtype), ("layer", "token", "feature"),
                            chunk_inner=(1, *x.shape[2:])),
                  ArraySpec("episode", (), "int32", ())],
                 {"vlm/layer": (("layer",), np.arange(x.shape[1], dtype=np.int32))}, ["episode"],
                 chunk_samples=chunk_samples)
    w.commit_samples = commit_samples
    for a in range(0, len(x), batch):
        w.append({"vlm/resid_post": x[a:a + batch], "episode": np.arange(a, min(a + batch, len(x)), dtype=np.int32)})
    w.close()


def _zarr_reference(path, ours, values):
    ref = zarr.create_array(str(path), shape=ours.shape, chunks=ours.chunks, dtype=ours.dtype,
                            compressors=ours.metadata.codecs[1:], fill_value=0)
    ref[:] = values
    return ref


def test_each_chunk_of_a_block_buffer_is_written_as_it_lies():
    """(N, 1 layer, rest) chunks are contiguous runs of the buffer: the chunk's stored bytes are the buffer's own
    memory followed by its crc32c (no copy), while the buffer is indexed sample first like the batches."""
    spec = ArraySpec("vlm/resid_post", (3, 4, 8), "float16", ("layer", "token", "feature"), chunk_inner=(1, 4, 8))
    buf = _block_buffer(16, spec)
    assert buf.shape == (16, 3, 4, 8)
    x = np.random.default_rng(0).standard_normal((16, 3, 4, 8)).astype(np.float16)
    buf[:10] = x[:10]
    for filled in (10, 16):
        chunk = buf[:filled, 1:2]
        assert chunk.flags.c_contiguous
        parts = encode_chunk(chunk, ["crc32c"])
        assert np.shares_memory(np.frombuffer(parts[0], np.uint8), buf)
        assert bytes(parts[0]) == np.ascontiguousarray(buf[:filled, 1]).tobytes()
        assert parts[1] == _crc32c(bytes(parts[0])).to_bytes(4, "little")
    # whole-sample chunks keep the sample-major layout
    flat = ArraySpec("episode", (), "int32", ())
    assert _block_buffer(16, flat).flags.c_contiguous


@pytest.mark.parametrize("codec", ["none", "blosc-lz4", "zstd"])
def test_blocks_starting_inside_a_chunk_write_zarrs_bytes(tmp_path, codec):
    """Early commits every 5 samples with chunks of 8 and batches of 3: most blocks start inside a chunk and are
    written through zarr from the layer-major buffer; the result is the values and, chunk for chunk, zarr's bytes."""
    x = (np.random.default_rng(2).standard_normal((29, 3, 4, 8)) * 4).astype(np.float16)
    _write(tmp_path / "s.zarr", codec, x, chunk_samples=8, batch=3, commit_samples=5)
    s = toolkit.open_store(tmp_path / "s.zarr")
    assert s.n_samples == 29 and s.complete
    for layer in range(3):
        np.testing.assert_array_equal(s.read("vlm", "resid_post", layer=layer), x[:, layer])
    ours = zarr.open_array(str(tmp_path / "s.zarr" / "vlm" / "resid_post"), mode="r")
    _zarr_reference(tmp_path / "ref", ours, x)
    files = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref" / "c").rglob("*") if p.is_file())
    assert len(files) == 4 * 3
    for f in files:
        assert (tmp_path / "s.zarr" / "vlm" / "resid_post" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes()


@pytest.mark.parametrize("codec", ["zstd", "blosc-lz4", "blosc"])
def test_compressed_reads_decode_into_the_output_and_still_catch_damage(tmp_path, codec):
    """Store.read decodes whole compressed chunks straight into its output: partial ranges and the last (padded)
    chunk read right; a flipped byte, a truncated chunk and a chunk with a valid checksum but the wrong decoded
    size all raise CorruptStoreError naming the chunk."""
    x = (np.random.default_rng(3).standard_normal((45, 2, 4, 8)) * 3).astype(np.float16)
    path = tmp_path / "s.zarr"
    _write(path, codec, x, chunk_samples=16, batch=10)
    s = toolkit.open_store(path)
    np.testing.assert_array_equal(s.read("vlm", "resid_post", layer=1), x[:, 1])
    np.testing.assert_array_equal(s.read("vlm", "resid_post", layer=0, samples=slice(5, 40)), x[5:40, 0])
    np.testing.assert_array_equal(s.read("vlm", "resid_post"), x)
    chunk = path / "vlm" / "resid_post" / "c" / "1" / "1" / "0" / "0"
    good = chunk.read_bytes()
    codecs = zarr.open_array(str(path / "vlm" / "resid_post"), mode="r").metadata.codecs[1:]
    wrong_size = []
    for features in (16, 4):  # twice and half the chunk's size, each with a valid checksum
        ref = zarr.create_array(str(tmp_path / f"ref{features}"), shape=(16, 1, 4, features),
                                chunks=(16, 1, 4, features), dtype="float16", compressors=codecs, fill_value=0)
        ref[:] = np.ones((16, 1, 4, features), np.float16)
        wrong_size.append((tmp_path / f"ref{features}" / "c" / "0" / "0" / "0" / "0").read_bytes())
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF
    for bad in (bytes(damaged), good[:-10], *wrong_size):
        chunk.write_bytes(bad)
        with pytest.raises(CorruptStoreError, match=r"c/1/1/0/0 \(samples 16-31\)"):
            toolkit.open_store(path).read("vlm", "resid_post", layer=1)
    chunk.write_bytes(good)
    np.testing.assert_array_equal(toolkit.open_store(path).read("vlm", "resid_post", layer=1), x[:, 1])


def test_a_run_smaller_than_a_chunk_stores_its_samples_not_a_padded_chunk(tmp_path):
    """The default chunk length is capped by the run's known sample count: a 6-sample float16 run with
    ``--codec none`` (which cannot shrink zarr's edge-chunk padding) stores about its own bytes, not 256 samples'."""
    path = toolkit.extract(model="pi0", dataset="libero", store=tmp_path / "small.zarr", dtype="float16", codec="none",
                           max_episodes=2, max_steps=3, streams="resid_post")
    store = toolkit.open_store(path)
    arr = store.array("vlm", "resid_post")
    assert store.n_samples == 6 and arr.chunks[0] == 6
    data = arr.nbytes  # the samples' own bytes
    stored = sum(f.stat().st_size for f in (path / "vlm" / "resid_post").rglob("*") if f.is_file())
    assert data <= stored < 1.05 * data + 4096, (stored, data)


def test_uncompressed_chunks_are_checksummed_piece_by_piece_as_they_are_read(tmp_path, monkeypatch):
    """Local chunks are read in pieces, each folded into the crc32c while still in cache (Store.read straight into
    its output, read_chunk for the probe): with pieces far smaller than a chunk the values are exact, and a byte
    flipped in a late piece, a cut-off tail or an extra byte is still the chunk's one-line error on both paths."""
    import toolkit.store.chunks as chunks

    monkeypatch.setattr(chunks, "READ_PIECE", 1000)  # a chunk here is 16 x 4 x 8 x 2 = 1,024 bytes + 4
    x = (np.random.default_rng(4).standard_normal((40, 2, 4, 8)) * 3).astype(np.float16)
    path = tmp_path / "s.zarr"
    _write(path, "none", x, chunk_samples=16, batch=8)
    s = toolkit.open_store(path)
    np.testing.assert_array_equal(s.read("vlm", "resid_post", layer=1), x[:, 1])
    arr = s.array("vlm", "resid_post")
    np.testing.assert_array_equal(chunks.read_chunk(arr, (1, 1))[:, 0], x[16:32, 1])
    chunk = path / "vlm" / "resid_post" / "c" / "1" / "1" / "0" / "0"
    good = chunk.read_bytes()
    assert len(good) == 16 * 4 * 8 * 2 + 4
    late = bytearray(good)
    late[1010] ^= 0x01  # in the second piece
    for bad in (bytes(late), good[:-3], good + b"\0"):
        chunk.write_bytes(bad)
        with pytest.raises(CorruptStoreError, match=r"c/1/1/0/0 \(samples 16-31\)"):
            toolkit.open_store(path).read("vlm", "resid_post", layer=1)
        with pytest.raises(CorruptStoreError, match=r"c/1/1/0/0"):
            chunks.read_chunk(toolkit.open_store(path).array("vlm", "resid_post"), (1, 1))
    chunk.write_bytes(good)
    np.testing.assert_array_equal(toolkit.open_store(path).read("vlm", "resid_post", layer=1), x[:, 1])
