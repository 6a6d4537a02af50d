"""A restricted unpickler for data pickles: numpy arrays, numpy scalars and plain containers only.

``pickle.load`` runs whatever callable a pickle names, so opening a pickle from elsewhere can
execute code.  ``load`` resolves only the globals that numpy arrays and builtin containers need
(protocols 0-5, pickles written by numpy 1.x or 2.x) and refuses every other one with a
``ToolkitError`` naming the file and the refused global, before anything is called.

    from toolkit.safe_pickle import load
    task = load("data/task_0_x.pkl")
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ToolkitError

# Plain builtins: containers and scalars with no side effects.
_BUILTINS = ("list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray", "complex", "slice", "range",
             "int", "float", "bool", "str")


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<submodule>.<name>`` on numpy 2, ``numpy.core.<submodule>.<name>`` on numpy 1."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"numpy has no {submodule}.{name}")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` restricted to numpy arrays (old-protocol ndarray subclass pickles)."""
    if cls is not np.ndarray or base not in (np.ndarray, object):
        raise pickle.UnpicklingError(f"copyreg._reconstructor of {getattr(cls, '__qualname__', cls)!r}")
    return copyreg._reconstructor(cls, base, state)


def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {("builtins", n): getattr(__import__("builtins"), n) for n in _BUILTINS}
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    table[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    # protocol 0-2 pickles of ``bytes`` go through _codecs.encode(str, "latin1")
    table[("_codecs", "encode")] = __import__("codecs").encode
    table[("copyreg", "_reconstructor")] = _reconstructor
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = ("multiarray", "_reconstruct")
        table[(f"{package}.multiarray", "scalar")] = ("multiarray", "scalar")
        table[(f"{package}.numeric", "_frombuffer")] = ("numeric", "_frombuffer")  # protocol 5
    return table


_ALLOWED = _allowed()


class SafeUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` resolves only the allow-listed globals."""

    def __init__(self, file: Any, source: str = "<pickle>") -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names used by protocols 0-2 (``__builtin__.set``, ``copy_reg._reconstructor``)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        target = _ALLOWED.get((module, name))
        if target is None:
            raise _Refused(f"{module}.{name}")
        if isinstance(target, tuple):
            target = _numpy_attr(*target)
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {pid!r}")


class _Refused(pickle.UnpicklingError):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _unpickle(file: Any, source: str) -> Any:
    try:
        return SafeUnpickler(file, source).load()
    except _Refused as e:
        raise ToolkitError(f"refusing to unpickle {source}: it references {e.what}, which is not plain data "
                           "(only numpy arrays and containers are allowed)") from None
    except ToolkitError:
        raise
    except MemoryError:
        raise ToolkitError(f"cannot unpickle {source}: out of memory") from None
    except Exception as e:  # truncated or corrupt: EOFError, UnpicklingError, ValueError, ...
        raise ToolkitError(f"cannot unpickle {source}: the file is truncated or corrupt "
                           f"({type(e).__name__}: {e})") from None


def loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` allowing only numpy arrays and plain containers; ``source`` names it in errors."""
    return _unpickle(io.BytesIO(data), source)


def load(path: str | Path) -> Any:
    """Load a pickle file allowing only numpy arrays and plain containers (see the module doc)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ToolkitError(f"cannot unpickle {path}: no such file") from None
    except IsADirectoryError:
        raise ToolkitError(f"cannot unpickle {path}: it is a directory, not a pickle file") from None
    except OSError as e:
        raise ToolkitError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        return _unpickle(f, str(path))
