"""The three LAPACK routines of the tridiagonal ridge path (``factor.Tridiagonal``), called without the GIL.

scipy's Python wrappers (``scipy.linalg.lapack.dsytrd`` ...) hold the GIL for the whole call, so the probe's
factorisations on worker threads ran one at a time (measured: two threads calling ``dsytrd`` used one core).  The
same routines, from the same LAPACK scipy ships, are exported as C function pointers by
``scipy.linalg.cython_lapack``; called through ``ctypes.CFUNCTYPE`` (which releases the GIL for the call) they run
side by side.  Every argument is checked here (dtype, Fortran order, shapes) before a pointer leaves Python.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np

_NB = 64  # LAPACK's largest block size for the Householder applications (NBMAX in ?ormqr)
_int = ctypes.c_int  # scipy's cython_lapack is the 32-bit-integer LAPACK interface


@lru_cache(maxsize=None)
def _routine(name: str, nargs: int):
    from scipy.linalg import cython_lapack

    capsule = cython_lapack.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * nargs))(get_pointer(capsule, get_name(capsule)))


def _prefix(dtype: np.dtype) -> str:
    if dtype == np.float32:
        return "s"
    if dtype == np.float64:
        return "d"
    raise TypeError(f"LAPACK path for float32 or float64, not {dtype}")


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def _ref(value: int):
    return ctypes.byref(_int(value))


def _check(name: str, info: ctypes.c_int) -> None:
    if info.value < 0:
        raise ValueError(f"{name}: argument {-info.value} is invalid")


def sytrd(g: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Householder reduction of the symmetric ``g`` (lower triangle read) to tridiagonal T = Qᵀ g Q in ``dtype``:
    (reflectors in the returned matrix below the subdiagonal, diagonal, subdiagonal, tau)."""
    dtype = np.dtype(dtype)
    p = _prefix(dtype)
    n = g.shape[0]
    if g.ndim != 2 or g.shape[1] != n:
        raise ValueError(f"sytrd needs a square matrix, got {g.shape}")
    a = np.array(g, dtype=dtype, order="F")
    d, e, tau = np.empty(n, dtype), np.empty(max(n - 1, 0), dtype), np.empty(max(n - 1, 0), dtype)
    lwork = max(1, n * _NB)
    work, info = np.empty(lwork, dtype), _int(0)
    _routine(p + "sytrd", 10)(ctypes.byref(ctypes.c_char(b"L")), _ref(n), _ptr(a), _ref(max(1, n)), _ptr(d),
                              _ptr(e), _ptr(tau), _ptr(work), _ref(lwork), ctypes.byref(info))
    _check(p + "sytrd", info)
    return a, d, e, tau


def _lead(a: np.ndarray, rows: int) -> int:
    """The leading dimension of a column-major 2-D array or view (unit row stride), at least ``rows``."""
    if a.ndim != 2 or (a.shape[0] > 1 and a.strides[0] != a.itemsize):
        raise ValueError(f"LAPACK needs a column-major array, got strides {a.strides}")
    ld = a.strides[1] // a.itemsize if a.shape[1] > 1 else rows
    if ld < rows or (a.shape[1] > 1 and a.strides[1] % a.itemsize):
        raise ValueError(f"LAPACK leading dimension {ld} below the {rows} rows")
    return max(1, ld)


def ormqr(trans: str, refl: np.ndarray, tau: np.ndarray, c: np.ndarray) -> None:
    """c ← Q c (``trans`` "N") or Qᵀ c ("T") in place, Q = H(1)···H(k) from ``refl`` (m × k, column-major, as
    ``sytrd`` leaves it, a view of it included) and ``tau``; ``c`` is (m × n) column-major of the same dtype."""
    p = _prefix(c.dtype)
    m, k = refl.shape
    if (trans not in ("N", "T") or c.ndim != 2 or c.shape[0] != m or tau.shape != (k,) or k > m
            or refl.dtype != c.dtype or tau.dtype != c.dtype):
        raise ValueError(f"ormqr: reflectors {refl.shape}, tau {tau.shape}, c {c.shape} do not fit")
    n = c.shape[1]
    if m == 0 or n == 0 or k == 0:
        return
    lda, ldc = _lead(refl, m), _lead(c, m)
    lwork = max(1, n * _NB + (_NB + 1) * _NB)
    work, info = np.empty(lwork, c.dtype), _int(0)
    _routine(p + "ormqr", 13)(ctypes.byref(ctypes.c_char(b"L")), ctypes.byref(ctypes.c_char(trans.encode())),
                              _ref(m), _ref(n), _ref(k), _ptr(refl), _ref(lda), _ptr(tau), _ptr(c),
                              _ref(ldc), _ptr(work), _ref(lwork), ctypes.byref(info))
    _check(p + "ormqr", info)


def gtsv(sub: np.ndarray, diag: np.ndarray, b: np.ndarray) -> int:
    """Solve the symmetric tridiagonal system (diag, sub) x = b in place in ``b`` (n × nrhs, column-major) by
    LU with partial pivoting; returns LAPACK's info (> 0: exactly singular).  ``sub`` and ``diag`` are copied."""
    p = _prefix(b.dtype)
    n = diag.shape[0]
    if b.ndim != 2 or b.shape[0] != n or diag.shape != (n,) or sub.shape != (max(n - 1, 0),):
        raise ValueError(f"gtsv: diagonal {diag.shape}, subdiagonal {sub.shape}, b {b.shape} do not fit")
    ldb = _lead(b, n)
    dl, d, du = (np.array(v, dtype=b.dtype) for v in (sub, diag, sub))
    info = _int(0)
    _routine(p + "gtsv", 8)(_ref(n), _ref(b.shape[1]), _ptr(dl), _ptr(d), _ptr(du), _ptr(b), _ref(ldb),
                            ctypes.byref(info))
    _check(p + "gtsv", info)
    return info.value
