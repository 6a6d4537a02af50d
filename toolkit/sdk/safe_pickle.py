"""A restricted, bounded unpickler for data pickles: numpy arrays, numpy scalars and plain containers only.

``pickle.load`` runs whatever callable a pickle names, so opening a pickle from elsewhere can
execute code.  ``load`` resolves only the globals that numpy arrays and builtin containers need
(protocols 0-5, pickles written by numpy 1.x or 2.x) and refuses every other one with a
``ToolkitError`` naming the file and the refused global, before anything is called.

Plain data can still exhaust memory (``builtins.list(builtins.range(10**9))`` is "plain"), so the
unpickler is also bounded, each bound checked *before* the object is built:

* every call a pickle makes (REDUCE, NEWOBJ, BUILD) is sized first: containers built from an
  iterable count its length, ``bytes(n)``/numpy arrays count their bytes, an array view over a
  buffer must not claim more bytes than the buffer holds (zero-stride and overlapping views are
  refused), ``str()`` of a container is refused;
* a declared string/bytes/frame length longer than the file is refused before it is read;
* items put into containers count against ``max_elements``, nesting against ``max_depth`` as it is
  built, and a new container may not open while ``max_waiting`` items wait on the stack (a list
  nested 10**6 deep is 10**6 empty lists pushed before the first append);
* the result must be a tree (no self-reference) at most ``max_depth`` deep that expands to at most
  ``max_elements`` values, shared sub-objects counted every time they are reached (what a
  conversion such as ``_plain`` or ``tolist`` would build).

Memory while loading stays within a few times the file size plus ``max_bytes``.

    from toolkit.sdk.safe_pickle import load
    task = load("data/task_0_x.pkl")
"""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import importlib
import io
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.sdk.errors import ToolkitError

# Plain builtins: containers and scalars with no side effects.
_BUILTINS = ("list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray", "complex", "slice", "range",
             "int", "float", "bool", "str")


@dataclass(frozen=True)
class Limits:
    """Bounds of one load.  ``max_bytes`` is added to the file's own size (arrays copied out of it)."""

    max_elements: int = 10_000_000  # container items built, and values of the result counted as a tree
    max_depth: int = 100  # nesting of containers in the result
    max_waiting: int = 100_000  # items on the unpickling stack when a new container opens (nesting being built)
    max_bytes: int = 256 * 2**20  # bytes allocated by constructors (arrays, bytes(n)) beyond 2x the file


LIMITS = Limits()


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


def _encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocols 0-2 use it for ``bytes``: a str to latin-1, nothing else."""
    if not isinstance(obj, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only as str -> latin1")
    return obj.encode("latin-1", errors)


def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {("builtins", n): getattr(__import__("builtins"), n) for n in _BUILTINS}
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    table[("collections", "OrderedDict")] = collections.OrderedDict
    # protocol 0-2 pickles of ``bytes`` go through _codecs.encode(str, "latin1")
    table[("_codecs", "encode")] = _encode
    table[("copyreg", "_reconstructor")] = _reconstructor
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = ("multiarray", "_reconstruct")
        table[(f"{package}.multiarray", "scalar")] = ("multiarray", "scalar")
        table[(f"{package}.numeric", "_frombuffer")] = ("numeric", "_frombuffer")  # protocol 5
    return table


_ALLOWED = _allowed()
_RECONSTRUCT = _numpy_attr("multiarray", "_reconstruct")


class _Refused(pickle.UnpicklingError):
    """A global the allow-list does not hold."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _TooBig(pickle.UnpicklingError):
    """A bound of ``Limits`` (or of the file's size) would be crossed."""


# --------------------------------------------------------------------------- sizing calls before they run


def _length(value: Any) -> int:
    try:
        return len(value)
    except OverflowError:  # range(10**20)
        return 2**63
    except TypeError:
        raise _TooBig(f"a constructor was given a {type(value).__name__}, which has no size") from None


def _shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, (int, np.integer)) for d in shape):
        raise _TooBig(f"an array shape {shape!r:.80} is not a tuple of ints")
    if any(d < 0 for d in shape):
        raise _TooBig(f"an array shape {tuple(shape)} has a negative size")
    return tuple(int(d) for d in shape)


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    try:
        itemsize = np.dtype(dtype if dtype is not None else float).itemsize
    except TypeError:
        raise _TooBig(f"an array dtype {dtype!r:.80} is not a numpy dtype") from None
    return math.prod(shape) * max(itemsize, 1)


def _array_call(args: tuple, kwargs: dict) -> tuple[int, int]:
    """(bytes allocated, elements) of ``numpy.ndarray(shape, dtype, buffer, offset, strides, order)``."""
    names = ("shape", "dtype", "buffer", "offset", "strides", "order")
    a = dict(zip(names, args), **kwargs)
    shape = _shape(a.get("shape", ()))
    nbytes = _nbytes(shape, a.get("dtype"))
    buffer = a.get("buffer")
    if buffer is None:
        return nbytes, (math.prod(shape) if np.dtype(a.get("dtype") or float).hasobject else 0)
    strides = a.get("strides")
    if strides is not None and any(int(s) == 0 and d > 1 for s, d in zip(strides, shape)):
        raise _TooBig(f"an array of shape {shape} has a zero stride (a broadcast view, far larger than its data)")
    have = memoryview(buffer).nbytes
    if nbytes > have:
        raise _TooBig(f"an array view of shape {shape} claims {nbytes} bytes of a {have}-byte buffer "
                      "(overlapping strides)")
    return 0, 0


def _call_cost(func: Any, args: tuple, kwargs: dict | None = None) -> tuple[int, int]:
    """(bytes, elements) that calling an allowed ``func`` would allocate, or ``_TooBig`` for calls refused
    outright; called before the call."""
    kwargs = kwargs or {}
    if func in (list, tuple, set, frozenset, dict, collections.OrderedDict):
        return (0, _length(args[0])) if args else (0, 0)
    if func in (bytes, bytearray):
        if not args:
            return 0, 0
        if isinstance(args[0], (int, np.integer)) and not isinstance(args[0], bool):
            return max(int(args[0]), 0), 0
        n = _length(args[0])
        return (4 * n if isinstance(args[0], str) else n), (0 if isinstance(args[0], (str, bytes, bytearray)) else n)
    if func is str:
        if args and not isinstance(args[0], (str, bytes, bytearray, int, float, bool, complex, np.generic)):
            raise _TooBig(f"str() of a {type(args[0]).__name__} (its text could be unbounded)")
        return 0, 0
    if func is np.ndarray:
        return _array_call(args, kwargs)
    if func is _RECONSTRUCT and len(args) >= 2:
        shape = _shape(args[1])
        return _nbytes(shape, args[2] if len(args) > 2 else None), 0
    if func is _reconstructor and len(args) == 3 and args[1] is np.ndarray:
        return _nbytes(_shape(args[2] if args[2] is not None else ()), float), 0
    return 0, 0


def _setstate_cost(inst: Any, state: Any) -> tuple[int, int]:
    """(bytes, elements) of ``ndarray.__setstate__(state)``: the array it fills, from its shape and dtype."""
    if isinstance(inst, np.ndarray) and isinstance(state, tuple) and len(state) in (4, 5):
        shape, dtype = state[-4], state[-3]
        shape = _shape(shape)
        return _nbytes(shape, dtype), (math.prod(shape) if getattr(dtype, "hasobject", False) else 0)
    return 0, 0


# --------------------------------------------------------------------------- the unpickler


class _BoundedFile:
    """The input file, refusing a read longer than what is left (a declared length is read before its data)."""

    def __init__(self, file: Any, size: int) -> None:
        self._file = file
        self.size = size

    def _check(self, n: int) -> None:
        if n > self.size - self._file.tell():
            raise EOFError(f"it declares a {n}-byte item, longer than the rest of the {self.size}-byte file")

    def read(self, n: int = -1) -> bytes:
        if n is not None and n > 65536:  # small reads (every opcode outside a frame) need no check
            self._check(n)
        return self._file.read(n)

    def readinto(self, buf: Any) -> int:
        self._check(memoryview(buf).nbytes)
        return self._file.readinto(buf)

    def readline(self) -> bytes:
        return self._file.readline()


_CONTAINERS = frozenset({list, tuple, dict, set, frozenset, collections.OrderedDict})


def _adding(opcode: bytes, n: int | None = None) -> Any:
    """The stdlib handler of ``opcode`` (one that puts items into a container: the ``n`` top items, or all
    since the last MARK), charging the items to the element budget first and tracking the nesting depth,
    so a deep or huge structure is refused while it is being read."""
    base = pickle._Unpickler.dispatch[opcode[0]]

    def load(self: SafeUnpickler) -> None:
        items = self.stack if n is None else self.stack[-n:]
        self._spend(elements=len(items))
        inner = self._inner_depth(items)
        base(self)
        if inner:
            self._deeper(self.stack[-1], inner + 1)
    return load


def _opening(opcode: bytes) -> Any:
    """The stdlib handler of an opcode that pushes a new empty container: charged as one element of ~64
    bytes, and refused while ``max_waiting`` items already wait on the stack (a list nested 10**6 deep is
    10**6 empty lists pushed before the first is appended: this stops it early)."""
    base = pickle._Unpickler.dispatch[opcode[0]]

    def load(self: SafeUnpickler) -> None:
        if len(self.stack) >= self.limits.max_waiting:
            raise _TooBig(f"it leaves more than {self.limits.max_waiting:,} items waiting on the unpickling stack "
                          "(containers nested that deep)")
        self._spend(64, 1)
        base(self)
    return load


class SafeUnpickler(pickle._Unpickler):
    """Unpickler whose ``find_class`` resolves only the allow-listed globals and whose allocating opcodes
    are sized against ``Limits`` first (the pure-Python unpickler, so that each opcode can be checked)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, source: str = "<pickle>", size: int | None = None,
                 limits: Limits = LIMITS) -> None:
        if size is None:
            here = file.tell()
            size = file.seek(0, os.SEEK_END) - here
            file.seek(here)
        self._input = _BoundedFile(file, size)
        super().__init__(self._input)
        self.source = source
        self.limits = limits
        self._elements = 0
        self._depth: dict[int, int] = {}  # id -> nesting depth of containers holding containers
        self._bytes_left = limits.max_bytes + 2 * size

    # budget ---------------------------------------------------------------------------------
    def _spend(self, nbytes: int = 0, elements: int = 0) -> None:
        self._elements += elements
        if self._elements > self.limits.max_elements:
            raise _TooBig(f"it builds more than {self.limits.max_elements:,} container elements")
        self._bytes_left -= nbytes
        if self._bytes_left < 0:
            raise _TooBig(f"it allocates more than {self.limits.max_bytes + 2 * self._input.size:,} bytes "
                          f"({nbytes:,} at once)")

    # globals --------------------------------------------------------------------------------
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

    # opcodes that call --------------------------------------------------------------------------
    def _load_reduce(self) -> None:
        self._spend(*_call_cost(self.stack[-2], tuple(self.stack[-1])))
        self._forget(self.stack[-1])
        pickle._Unpickler.load_reduce(self)

    def _load_newobj(self) -> None:
        self._spend(*_call_cost(self.stack[-2], tuple(self.stack[-1])))
        self._forget(self.stack[-1])
        pickle._Unpickler.load_newobj(self)

    def _load_newobj_ex(self) -> None:
        self._spend(*_call_cost(self.stack[-3], tuple(self.stack[-2]), dict(self.stack[-1])))
        pickle._Unpickler.load_newobj_ex(self)

    def _load_build(self) -> None:
        self._spend(*_setstate_cost(self.stack[-2], self.stack[-1]))
        self._forget(self.stack[-1])
        pickle._Unpickler.load_build(self)

    def _load_obj(self) -> None:  # MARK cls args... OBJ: protocol 0-1 class instances, never plain data
        raise _Refused("an instance built with the OBJ opcode")

    def _load_inst(self) -> None:
        raise _Refused("an instance built with the INST opcode")

    # opcodes that put items into containers --------------------------------------------------------
    for _op, _n in ((pickle.APPENDS, None), (pickle.SETITEMS, None), (pickle.ADDITEMS, None), (pickle.LIST, None),
                    (pickle.TUPLE, None), (pickle.DICT, None), (pickle.FROZENSET, None), (pickle.APPEND, 1),
                    (pickle.SETITEM, 2), (pickle.TUPLE1, 1), (pickle.TUPLE2, 2), (pickle.TUPLE3, 3)):
        dispatch[_op[0]] = _adding(_op, _n)
    for _op in (pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.EMPTY_SET):
        dispatch[_op[0]] = _opening(_op)
    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.OBJ[0]] = _load_obj
    dispatch[pickle.INST[0]] = _load_inst
    del _op, _n

    def _inner_depth(self, items: list) -> int:
        """The deepest container among ``items`` (0: none is a container)."""
        if not ({type(i) for i in items} & _CONTAINERS):
            return 0
        return max((self._depth.get(id(i), 1) for i in items if type(i) in _CONTAINERS), default=0)

    def _deeper(self, container: Any, depth: int) -> None:
        if depth > self._depth.get(id(container), 1):
            if depth > self.limits.max_depth:
                raise _TooBig(f"it nests containers more than {self.limits.max_depth} levels deep")
            self._depth[id(container)] = depth

    def _forget(self, temporary: Any) -> None:
        """Drop the depth of call arguments and states, which die after the call (their ids are reused)."""
        if type(temporary) in _CONTAINERS:
            for item in (temporary, *(temporary if not isinstance(temporary, dict) else ())):
                self._depth.pop(id(item), None)

    def _load_bytearray8(self) -> None:  # the stdlib allocates the declared length before reading
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._input.size:
            raise EOFError(f"it declares a {n}-byte bytearray in a {self._input.size}-byte file")
        b = bytearray(n)
        self.readinto(b)
        self.append(b)

    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

    def load(self) -> Any:
        result = super().load()
        check_tree(result, self.limits)
        return result


# --------------------------------------------------------------------------- the result's shape


def _children(obj: Any) -> list | None:
    """The values a container holds (dict keys too), or None for a leaf."""
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, slice):
        return [obj.start, obj.stop, obj.step]
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        return list(obj.reshape(-1))
    return None


_LEAF_TYPES = frozenset({int, float, bool, complex, str, bytes, type(None)})


def _only_leaves(kids: list) -> bool:
    """Whether no item is a container (Python and numpy scalars), judged by the few types present."""
    return all(t in _LEAF_TYPES or issubclass(t, np.generic) for t in {type(k) for k in kids})


def check_tree(root: Any, limits: Limits = LIMITS) -> None:
    """Refuse a value that refers to itself, nests deeper than ``max_depth`` or expands (shared
    sub-objects counted each time they are reached) to more than ``max_elements`` values.

    One iterative pass over the distinct containers: no recursion, so no ``RecursionError`` however deep."""
    kids = _children(root)
    if kids is None:
        return
    done: dict[int, int] = {}  # id -> expanded size of a finished container
    on_path = {id(root)}
    stack = [[root, kids, 0, 1]]  # container, its children, next child, expanded size so far
    while stack:
        frame = stack[-1]
        obj, kids, i, _ = frame
        if i == 0 and _only_leaves(kids):  # count plain leaves at once
            frame[2] = i = len(kids)
            frame[3] += len(kids)
        elif i < len(kids):
            frame[2] += 1
            child = kids[i]
            grandkids = _children(child)
            if grandkids is None:
                frame[3] += 1
            elif id(child) in done:
                frame[3] += done[id(child)]
            elif id(child) in on_path:
                raise _TooBig("it refers to itself (a container inside its own contents)")
            elif len(stack) >= limits.max_depth:
                raise _TooBig(f"it nests containers more than {limits.max_depth} levels deep")
            else:
                on_path.add(id(child))
                stack.append([child, grandkids, 0, 1])
                continue
        if frame[3] > limits.max_elements:
            raise _TooBig(f"it expands to more than {limits.max_elements:,} values (shared sub-objects counted "
                          "each time they are reached)")
        if frame[2] == len(kids):
            stack.pop()
            on_path.discard(id(obj))
            done[id(obj)] = frame[3]
            if stack:
                stack[-1][3] += frame[3]


# --------------------------------------------------------------------------- entry points


def _unpickle(file: Any, source: str, size: int | None = None, limits: Limits = LIMITS) -> Any:
    try:
        return SafeUnpickler(file, source, size, limits).load()
    except _Refused as e:
        raise ToolkitError(f"refusing to unpickle {source}: it references {e.what}, which is not plain data "
                           "(only numpy arrays and containers are allowed)") from None
    except _TooBig as e:
        raise ToolkitError(f"refusing to unpickle {source}: {e} (toolkit.sdk.safe_pickle bounds what a data pickle "
                           "may build)") from None
    except ToolkitError:
        raise
    except MemoryError:
        raise ToolkitError(f"cannot unpickle {source}: out of memory") from None
    except RecursionError:
        raise ToolkitError(f"cannot unpickle {source}: it is nested too deeply") from None
    except Exception as e:  # truncated or corrupt: EOFError, UnpicklingError, ValueError, ...
        text = str(e).splitlines()[0][:200] if str(e) else ""
        raise ToolkitError(f"cannot unpickle {source}: the file is truncated or corrupt "
                           f"({type(e).__name__}: {text})") from None


def loads(data: bytes, source: str = "<bytes>", limits: Limits = LIMITS) -> Any:
    """Unpickle ``data`` allowing only numpy arrays and plain containers; ``source`` names it in errors."""
    return _unpickle(io.BytesIO(data), source, len(data), limits)


def load(path: str | Path, limits: Limits = LIMITS) -> Any:
    """Load a pickle file allowing only numpy arrays and plain containers, within ``limits`` (module doc)."""
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
        return _unpickle(f, str(path), os.fstat(f.fileno()).st_size, limits)
