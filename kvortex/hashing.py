"""Chunk keys: the chained SHA-256 of a prompt's token ids.

A prompt of token ids is cut into chunks of ``chunk_tokens`` ids; every FULL chunk gets one
32-byte key that depends on the namespace and on every token before it::

    h[-1] = SHA-256(b"KVortex/chunk-hash/v1\\x00" || u32le(len(namespace)) || namespace)
    h[i]  = SHA-256(h[i-1] || u32le(t) for t in chunk i)

Keys depend only on the token values, never on the container, dtype, process or
``PYTHONHASHSEED``. ``docs/keys.md`` specifies the format with a worked example.

Two implementations share one contract (results, error classes): the compiled core
(``kvortex._native.hash_chunks``, OpenSSL SHA-256, whole prompt in one call, GIL released for
long prompts) and a ``hashlib`` fallback.
"""

from __future__ import annotations

import array
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvortex import _loader
from kvortex import backend as _backend
from kvortex.errors import InvalidArgumentError, InvalidTypeError

if TYPE_CHECKING:
    from typing import TypeAlias

    import numpy as np
    import numpy.typing as npt
    import torch

    TokenIds: TypeAlias = (
        Sequence[int] | array.array[int] | memoryview | npt.NDArray[np.integer[Any]] | torch.Tensor
    )

__all__ = ["ALGOS", "KEY_BYTES", "hash_chunks"]

KEY_BYTES = 32
"""Bytes in one chunk key."""

ALGOS = ("sha256",)
"""Supported values of ``algo``."""

SEED_TAG = b"KVortex/chunk-hash/v1\x00"
_ID_LIMIT = 1 << 32
_MAX_NAMESPACE = (1 << 32) - 1
# array typecode of a 4-byte unsigned int ('I' on every platform CPython supports; checked).
_U32_CODE = next(code for code in "IL" if array.array(code).itemsize == 4)
_ACCEPTED = (
    "a list or tuple of ints or a 1-D integer array "
    "(numpy.ndarray, array.array, memoryview, CPU torch.Tensor)"
)


def hash_chunks(
    tokens: TokenIds,
    chunk_tokens: int = 256,
    *,
    namespace: bytes | bytearray | memoryview = b"",
    algo: str = "sha256",
    backend: str | None = None,
) -> list[bytes]:
    """Return one 32-byte key per full chunk of ``tokens``.

    Args:
        tokens: token ids, each ``0 <= id < 2**32``, as a list or tuple of ``int`` (``bool``
            is rejected), an ``array.array`` of an integer typecode, a 1-D ``numpy.ndarray``
            or ``memoryview`` of any integer dtype (any width, signedness, byte order or
            stride), or a 1-D CPU ``torch.Tensor`` of integer dtype.
        chunk_tokens: ids per chunk, an ``int >= 1``. ``len(tokens) // chunk_tokens`` keys
            are returned; the ids of a trailing partial chunk are validated but get no key.
        namespace: bytes-like, mixed into the seed: different namespaces never share keys.
        algo: the hash; only ``"sha256"``.
        backend: ``None`` (the process default, ``KVORTEX_BACKEND``), ``"auto"``,
            ``"native"`` or ``"python"``.

    Returns:
        ``list[bytes]``, key ``i`` covering ``tokens[:(i + 1) * chunk_tokens]``; the keys of a
        prefix of ``tokens`` are a prefix of these keys.

    Raises:
        InvalidTypeError: ``tokens`` is not one of the accepted containers, is not 1-D, has
            a non-integer dtype or a non-int element; ``chunk_tokens`` is not an int;
            ``namespace`` is not bytes-like.
        InvalidArgumentError: an id is out of range (the message names the first such value
            and its index); ``chunk_tokens < 1``; ``algo`` is not supported; a tensor is not
            on the CPU; ``backend`` is not a backend.
        BackendUnavailable: ``backend="native"`` but the compiled core is unavailable.
    """
    # The common call (int chunk size, bytes namespace, default algo, list or ndarray) is
    # checked inline: this function's own cost is what a short prompt pays on top of hashing.
    if (
        type(chunk_tokens) is int
        and 0 < chunk_tokens <= sys.maxsize
        and type(namespace) is bytes
        and len(namespace) <= _MAX_NAMESPACE
        and type(algo) is str
        and algo == "sha256"
    ):
        ns = namespace
    else:
        ns = _check_args(chunk_tokens, namespace, algo)
    if type(tokens) not in _PASS_THROUGH:
        tokens = _accepted_tokens(tokens)
    return _implementation(backend)(tokens, chunk_tokens, ns)


_HashFn = Callable[[Any, int, bytes], list[bytes]]
# Exact container types handed to either implementation unchanged; numpy.ndarray joins when
# first seen (so that this module never imports numpy itself).
_PASS_THROUGH: set[type] = {list, tuple, array.array, memoryview}
# backend argument (or (None, KVORTEX_BACKEND) for the process default) -> implementation.
# Only successful resolutions are cached: whether the native core loaded never changes within
# a process, so an entry cannot go stale, and an unavailable explicit request is re-raised by
# backend.resolve every time.
_resolved: dict[object, _HashFn] = {}


def _implementation(requested: object) -> _HashFn:
    if requested is None:
        key: object = (None, os.environ.get("KVORTEX_BACKEND"))
    elif type(requested) is str:
        key = requested
    else:
        key = None  # not hashable in general; backend.resolve rejects it below
    fn = _resolved.get(key) if key is not None else None
    if fn is None:
        impl = _backend.resolve("hashing", requested)  # type: ignore[arg-type]
        native: Any = _loader.native().module
        fn = native.hash_chunks if impl == "native" else _hash_python
        if key is not None:
            _resolved[key] = fn
    return fn


def _check_args(chunk_tokens: object, namespace: object, algo: object) -> bytes:
    """Validate the arguments other than tokens (shared by both backends); the namespace bytes."""
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool):
        raise InvalidTypeError(
            f"chunk_tokens is {type(chunk_tokens).__name__} ({chunk_tokens!r}); expected an int"
        )
    if not 1 <= chunk_tokens <= sys.maxsize:
        raise InvalidArgumentError(
            f"chunk_tokens is {chunk_tokens}; expected an int >= 1 (and <= {sys.maxsize})"
        )
    if type(namespace) is bytes:
        ns = namespace
    else:
        try:
            ns = memoryview(namespace).tobytes()  # type: ignore[arg-type]
        except TypeError:
            raise InvalidTypeError(
                f"namespace is {type(namespace).__name__} ({namespace!r:.60}); "
                "expected bytes-like (bytes, bytearray, memoryview)"
            ) from None
    if len(ns) > _MAX_NAMESPACE:
        raise InvalidArgumentError(f"namespace is {len(ns)} bytes; expected < 2**32")
    if type(algo) is not str or algo not in ALGOS:
        raise InvalidArgumentError(
            f"algo={algo!r:.60} is not supported; expected one of: {', '.join(ALGOS)}"
        )
    return ns


def _accepted_tokens(tokens: object) -> Any:
    """Check the container kind; a torch tensor becomes a numpy view of the same memory."""
    kind = type(tokens)
    if kind is list or kind is tuple:
        return tokens
    if isinstance(tokens, (list, tuple, array.array, memoryview)):
        return tokens
    # An object can only be an ndarray / Tensor if numpy / torch is already imported, so
    # looking in sys.modules never imports either (importing torch takes seconds).
    np = sys.modules.get("numpy")
    if np is not None and isinstance(tokens, np.ndarray):
        if kind is np.ndarray:
            _PASS_THROUGH.add(kind)
        return tokens
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tokens, torch.Tensor):
        return _from_torch(torch, tokens)
    raise InvalidTypeError(f"tokens is {_type_name(tokens)}; expected {_ACCEPTED}")


def _type_name(obj: object) -> str:
    kind = type(obj)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _from_torch(torch: Any, tensor: Any) -> Any:
    if tensor.device.type != "cpu":
        raise InvalidArgumentError(
            f"tokens is a torch.Tensor on device {tensor.device}; expected a CPU tensor "
            "(hash the ids before moving them, or pass tensor.cpu())"
        )
    if tensor.layout != torch.strided:
        raise InvalidTypeError(f"tokens is a {tensor.layout} torch.Tensor; expected a dense one")
    if tensor.dim() != 1:
        raise InvalidTypeError(
            f"tokens must be 1-D; got shape {tuple(tensor.shape)} (torch.Tensor)"
        )
    dtype = tensor.dtype
    if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
        raise InvalidTypeError(f"tokens have dtype {dtype}; expected an integer dtype")
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError) as exc:
        raise InvalidTypeError(
            f"tokens have dtype {dtype}, which has no numpy equivalent; expected an integer dtype"
        ) from exc


# --- pure-Python implementation (hashlib) -------------------------------------------------


def _seed(ns: bytes) -> bytes:
    return hashlib.sha256(SEED_TAG + len(ns).to_bytes(4, "little") + ns).digest()


def _hash_python(tokens: Any, chunk_tokens: int, ns: bytes) -> list[bytes]:
    data = (
        _ids_from_sequence(tokens) if isinstance(tokens, (list, tuple)) else _ids_from_array(tokens)
    )
    step = 4 * chunk_tokens
    prev = _seed(ns)
    keys = []
    for start in range(0, len(data) - step + 1, step):
        h = hashlib.sha256(prev)
        h.update(data[start : start + step])
        prev = h.digest()
        keys.append(prev)
    return keys


def _ids_from_sequence(tokens: Sequence[Any]) -> memoryview:
    """Little-endian uint32 bytes of a list/tuple, or the error for its first bad element."""
    if not set(map(type, tokens)) <= {int}:
        _raise_first_bad(tokens)  # returns only when all are valid int subclasses
    try:
        ids = array.array(_U32_CODE, tokens)
    except OverflowError:
        _raise_first_bad(tokens)
        raise
    if sys.byteorder == "big":
        ids.byteswap()
    return memoryview(ids).cast("B")


def _raise_first_bad(tokens: Sequence[Any]) -> None:
    """Raise for the first element that is not an int or out of range, in index order."""
    for i, t in enumerate(tokens):
        if not isinstance(t, int) or isinstance(t, bool):
            raise InvalidTypeError(
                f"token at index {i} is {_type_name(t)} ({t!r:.60}); expected int"
            )
        if not 0 <= t < _ID_LIMIT:
            raise InvalidArgumentError(
                f"token id {t} at index {i} is out of range; expected 0 <= id < 2**32"
            )


def _ids_from_array(tokens: Any) -> memoryview:
    """Little-endian uint32 bytes of a 1-D integer array of any dtype and layout."""
    import numpy as np

    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError) as exc:
        raise InvalidTypeError(
            f"tokens ({_type_name(tokens)}) cannot be read as integer ids: {exc}"
        ) from exc
    if arr.ndim != 1:
        raise InvalidTypeError(f"tokens must be 1-D; got shape {arr.shape} ({_type_name(tokens)})")
    if arr.dtype.kind not in "iu":
        # Described as the native backend does: in the container's own terms.
        if isinstance(tokens, array.array):
            elements = f"typecode {tokens.typecode!r}"
        elif isinstance(tokens, memoryview):
            elements = f"format {tokens.format!r}"
        else:
            elements = f"dtype {arr.dtype}"
        raise InvalidTypeError(
            f"tokens have {elements}; expected an integer dtype (signed or unsigned, 1 to 8 bytes)"
        )
    signed = arr.dtype.kind == "i"
    if arr.size and (signed or arr.dtype.itemsize > 4):
        bad = arr < 0 if signed else np.zeros(arr.shape, dtype=bool)
        if arr.dtype.itemsize > 4:
            bad |= arr > _ID_LIMIT - 1
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidArgumentError(
                f"token id {arr[i]} at index {i} is out of range; expected 0 <= id < 2**32"
            )
    ids = np.ascontiguousarray(arr, dtype="<u4")
    return ids.view(np.uint8).data
