"""An episode's rows of a LeRobot data parquet file (pyarrow): vectors, scalars, and images kept inside the file.

v2.x has one file per episode; v3.0 many episodes per file, so the last file read is kept and an episode's rows
are those with its ``episode_index``.  Images stored in the parquet (features of dtype ``image``, e.g. v2.0's
``physical-intelligence/libero``) are Hugging Face ``datasets`` Image values: a struct of ``bytes`` (PNG or JPEG)
and ``path``; they are decoded only when a step's image is read.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk import fields
from toolkit.sdk.errors import ToolkitError

INSTALL = "pip install 'toolkit[lerobot]'"


def import_pq():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ToolkitError(f"LeRobot data files are read with pyarrow ({e}); install it with: {INSTALL}") from None
    return pa, pq


class EpisodeRows:
    """The columns ``names`` of one episode's rows, as numpy (vectors (n, k), scalars (n,), images as raw cells)."""

    def __init__(self, path: Path, table: Any, episode: int):
        self.path = path
        self.table = table
        self.episode = episode
        self.n = table.num_rows

    def has(self, name: str) -> bool:
        return name in self.table.column_names

    def matrix(self, name: str) -> np.ndarray:
        """A list (vector) column as (n, k) numbers; a scalar column as (n, 1)."""
        pa, _ = import_pq()
        col = self.table.column(name).combine_chunks()
        if self.n == 0:
            return np.zeros((0, 0), np.float32)
        while pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
            if col.null_count:
                raise ToolkitError(f"{self.path}: column {name!r} of episode {self.episode} has empty (null) rows")
            col = col.flatten()
        values = col.to_numpy(zero_copy_only=False)
        if values.dtype.kind not in "biuf" or values.size % self.n:
            raise ToolkitError(f"{self.path}: column {name!r} of episode {self.episode} is not a numeric vector of "
                               f"one size per row ({values.size} {values.dtype} values in {self.n} rows)")
        return values.reshape(self.n, -1)

    def scalars(self, name: str) -> np.ndarray:
        m = self.matrix(name)
        if m.shape[1] != 1:
            raise ToolkitError(f"{self.path}: column {name!r} has {m.shape[1]} values per row, expected one")
        return m[:, 0]

    def cells(self, name: str) -> list[Any]:
        return self.table.column(name).to_pylist()


class TableCache:
    """Reads episodes' rows, keeping the last file's table (v3.0 files hold many episodes)."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._table: Any = None

    def rows(self, path: Path, columns: list[str], episode: int, where: str) -> EpisodeRows:
        pa, pq = import_pq()
        if self._path != path or not set(columns) <= set(self._table.column_names):
            if not path.is_file():
                raise ToolkitError(f"{path}: the data file of {where} is missing; download the dataset's data/ "
                                   "folder (or pass the complete dataset folder as --data)")
            try:
                names = pq.read_schema(path).names
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
                raise ToolkitError(f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else e!r})"
                                   ) from None
            missing = [c for c in columns if c not in names]
            if missing:
                raise ToolkitError(f"{path}: no column {missing[0]!r} (it has {', '.join(names)})")
            try:
                self._table, self._path = pq.read_table(path, columns=columns), path
            except Exception as e:  # noqa: BLE001
                raise ToolkitError(f"{path}: cannot read ({str(e).splitlines()[0] if str(e) else e!r}); the file "
                                   "looks truncated") from None
        table = self._table
        if "episode_index" in table.column_names:
            import pyarrow.compute as pc

            table = table.filter(pc.equal(table.column("episode_index"), pa.scalar(episode, table.schema.field(
                "episode_index").type)))
        return EpisodeRows(path, table, episode)


def decode_image(cell: Any, root: Path, where: str) -> np.ndarray:
    """A ``datasets`` Image cell ({bytes, path}, or raw bytes) as (H, W, 3) uint8."""
    from PIL import Image, UnidentifiedImageError

    data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
    if data is None and path:
        file = Path(path) if Path(path).is_absolute() else root / path
        if not file.is_file():
            raise ToolkitError(f"{where}: the image file {file} is missing")
        data = file.read_bytes()
    if not isinstance(data, (bytes, bytearray)):
        raise ToolkitError(f"{where}: no image bytes (got {type(cell).__name__})")
    try:
        img = Image.open(io.BytesIO(data))
        fields.image_shape((img.height, img.width, 3), where)  # from the header, before decoding
        return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ToolkitError(f"{where}: not a decodable image ({str(e).splitlines()[0]})") from None
