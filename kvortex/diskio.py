"""Batch disk I/O for the disk tier: positional reads and writes in flight together, and CRC-32.

An op is ``(is_write, fd, offset, address, nbytes)``: move ``nbytes`` bytes between the memory
at ``address`` (a host-pool slot, an mmap) and the file ``fd`` at ``offset``. One
:meth:`BatchIO.run` call takes a whole batch, keeps up to ``depth`` ops in flight at once and
returns when every op has finished, with one number per op: the bytes transferred, or
``-errno``. I/O errors never raise, so one failed op never hides the others' outcome.

With files opened ``O_DIRECT`` (:func:`open_file`) the kernel moves data straight between the
buffer and the device, bypassing the page cache; it then wants ``offset``, ``nbytes`` and
``address`` to be multiples of :data:`ALIGN` (4096 here), and a misaligned op comes back as
``-EINVAL``. Host-pool slots are aligned to that by construction.

Two implementations share one contract and one test suite (``kvortex info`` says which runs):

- native (``kvortex._native.BatchIO``, ``csrc/src/disk_io.cc``): Linux AIO through the raw
  system calls (``io_submit``/``io_getevents``), ``depth`` ops submitted at once, with the GIL
  released for the whole batch. Truly asynchronous for ``O_DIRECT`` files; for buffered files
  the kernel performs each op inside ``io_submit``, so a buffered batch runs one op at a time.
  CRC-32 is zlib's, with the GIL released from 64 KiB on.
- python: a ``ThreadPoolExecutor`` of ``min(depth, 8)`` threads running ``os.preadv`` /
  ``os.pwritev`` over ``ctypes`` memoryviews of the addresses; CRC-32 is ``zlib.crc32``.

Both finish a short transfer the same way, so their results are identical: a write is
continued until complete (or an error, whose ``-errno`` is then the op's result, whatever part
was written); a read that comes back short is continued unless the file (a regular file, by
``fstat``) ends there, in which case the short count is the result (0 at or past the end).

Memory safety is the caller's: each op's buffer must stay mapped, and untouched by others,
until :meth:`BatchIO.run` returns. An address that is not mapped gives ``-EFAULT`` natively and
may crash the Python fallback; addresses are never checked beyond being non-zero.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import mmap
import operator
import os
import stat
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, SupportsIndex, TypeAlias, cast

from kvortex import _loader
from kvortex import backend as _backend
from kvortex.errors import InvalidArgumentError, InvalidTypeError, QueueClosed

__all__ = ["ALIGN", "MAX_DEPTH", "BatchIO", "IOOp", "crc32", "direct_io_supported", "open_file"]

ALIGN = 4096
"""``O_DIRECT`` alignment of offsets, lengths and addresses."""

MAX_DEPTH = 4096
"""Largest ``depth`` a :class:`BatchIO` accepts."""

IOOp: TypeAlias = tuple[bool, int, int, int, int]
"""``(is_write, fd, offset, address, nbytes)``."""

_OP_FIELDS = "(is_write, fd, offset, address, nbytes)"
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_INT64_MAX = (1 << 63) - 1
_SYNC_CHUNK = 1 << 30  # bytes per preadv/pwritev call, as the native transfer_sync moves
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)


class BatchIO:
    """Runs batches of positional reads/writes against file descriptors, all in flight at once
    (up to ``depth``).

    Args:
        depth: ops in flight at once, ``1 <= depth <= MAX_DEPTH``. Natively each concurrent
            :meth:`run` call has an AIO context of this depth of its own; the fallback runs
            ``min(depth, 8)`` threads shared by all calls.
        backend: ``None`` (the process default, ``KVORTEX_BACKEND``), ``"auto"``, ``"native"``
            or ``"python"``; see :mod:`kvortex.backend`.

    Raises:
        InvalidTypeError: ``depth`` is not an ``int`` (``bool`` included).
        InvalidArgumentError: ``depth`` is out of range, or ``backend`` is not a backend.
        BackendUnavailable: ``backend="native"`` but the native disk I/O is unavailable.
        OSError: the kernel refused the AIO context (native; ``io_setup``, e.g. ``EAGAIN`` when
            ``/proc/sys/fs/aio-max-nr`` is reached).

    Threads: :meth:`run` may be called from several threads at once; calls do not serialize
    (natively each takes its own AIO context from an idle list, creating one when all are busy;
    the fallback's calls share its thread pool). :meth:`close` lets calls in progress finish,
    then releases everything; :meth:`run` after it raises :class:`~kvortex.errors.QueueClosed`
    (a BatchIO is an I/O queue; closed is final). Also a context manager.
    """

    def __init__(self, depth: int = 64, *, backend: str | None = None) -> None:
        self._backend = _backend.resolve("disk", backend)
        impl: _BatchImpl
        if self._backend == "native":
            native_class: Any = getattr(_loader.native().module, "BatchIO")  # noqa: B009
            impl = native_class(depth)
        else:
            impl = _PyBatchIO(depth)
        self._impl = impl

    @property
    def backend(self) -> Literal["native", "python"]:
        """Which implementation this object runs on."""
        return self._backend

    @property
    def depth(self) -> int:
        """Ops in flight at once per :meth:`run` call."""
        return self._impl.depth

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._impl.closed

    def run(self, ops: Sequence[IOOp]) -> list[int]:
        """Run every op and wait for all of them.

        Args:
            ops: ``(is_write, fd, offset, address, nbytes)`` tuples (or lists): ``is_write`` a
                ``bool``; ``fd`` an ``int`` file descriptor; ``offset``, ``address`` and
                ``nbytes`` ``int`` >= 0, ``offset + nbytes <= 2**63 - 1``, and ``address`` not
                0 when ``nbytes > 0``. Ops are independent: their order within the batch is
                not the order they reach the disk, so ops of one batch must not overlap where
                one of them writes.

        Returns:
            Per op, in order: the bytes transferred (``nbytes`` for a write and for a read
            inside the file; fewer for a read reaching the end of file, 0 past it; 0 for
            ``nbytes == 0``, which makes no system call), or ``-errno``: e.g. ``-EBADF`` (bad
            or negative fd, or a read from a write-only fd), ``-EINVAL`` (a misaligned
            ``O_DIRECT`` op), ``-ENOSPC``, ``-EFBIG``, ``-EIO``. Never raises for I/O errors.

        Raises:
            InvalidTypeError: ``ops`` is not iterable, an op is not a 5-field tuple or list, or
                a field has the wrong type (``bool`` is no ``int`` here); the message names
                the op's index. No op of the batch has run then.
            InvalidArgumentError: a field is out of range (as above; an fd outside a C
                ``int``). No op of the batch has run then.
            QueueClosed: :meth:`close` was called.
            OSError: natively, only if ``io_getevents`` itself fails (never seen in practice).
        """
        return self._impl.run(ops)

    def close(self) -> None:
        """Wait for calls in progress, then release the AIO contexts / threads. Idempotent."""
        self._impl.close()

    def __enter__(self) -> BatchIO:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"depth={self.depth}"
        return f"BatchIO({state}, backend={self._backend!r})"


def crc32(address: int, nbytes: int, value: int = 0, *, backend: str | None = None) -> int:
    """zlib's CRC-32 (the value ``zlib.crc32`` gives) of ``nbytes`` at ``address``, continuing
    from ``value``: ``crc32(a, n1 + n2) == crc32(a + n1, n2, crc32(a, n1))``.

    Args:
        address: where the bytes are (``int`` >= 0; not 0 when ``nbytes > 0``).
        nbytes: how many (``int`` >= 0, below ``2**63``).
        value: the CRC so far, ``0 <= value < 2**32``.
        backend: as for :class:`BatchIO`. Native: zlib's ``crc32`` with the GIL released from
            64 KiB on; fallback: ``zlib.crc32`` over a ``ctypes`` memoryview (which releases
            the GIL itself above a few KiB). Thread safe.

    Raises:
        InvalidTypeError: an argument is not an ``int``.
        InvalidArgumentError: an argument is out of range.
        BackendUnavailable: ``backend="native"`` but the native disk I/O is unavailable.
    """
    return _crc32_implementation(backend)(address, nbytes, value)


def open_file(
    path: str | os.PathLike[str], *, write: bool, direct: bool = True
) -> tuple[int, bool]:
    """Open ``path`` for :class:`BatchIO`, with ``O_DIRECT`` where its filesystem allows it.

    ``write=True`` opens ``O_RDWR | O_CREAT`` (mode ``0o644``, existing content kept), else
    ``O_RDONLY``; always ``O_CLOEXEC``. With ``direct=True`` the open tries ``O_DIRECT`` first
    and, when the filesystem refuses it (``EINVAL``: tmpfs before Linux 6.6, some FUSE and
    network filesystems), opens buffered instead.

    Returns:
        ``(fd, direct)``: the descriptor (the caller closes it) and whether it is ``O_DIRECT``.

    Raises:
        OSError: the open failed for another reason (missing directory, permissions, ...).
    """
    flags = (os.O_RDWR | os.O_CREAT if write else os.O_RDONLY) | _O_CLOEXEC
    if direct and _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def direct_io_supported(directory: str | os.PathLike[str]) -> bool:
    """Whether files in ``directory`` accept ``O_DIRECT``: a probe file is created there, one
    aligned block written to it with ``O_DIRECT``, and the file removed.

    Raises:
        OSError: the probe file cannot be created (missing directory, no permission, full).
    """
    if not _O_DIRECT:
        return False
    probe = Path(directory) / f".kvortex-direct-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        probe.unlink(missing_ok=True)  # the file may exist though O_DIRECT was refused
        return False
    try:
        with mmap.mmap(-1, ALIGN) as block:  # page aligned, as O_DIRECT wants
            os.pwritev(fd, [block], 0)
        return True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The pure-Python implementation.


class _BatchImpl(Protocol):
    """What both implementations provide (the native class and :class:`_PyBatchIO`)."""

    @property
    def depth(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def run(self, ops: Sequence[IOOp]) -> list[int]: ...
    def close(self) -> None: ...


class _PyBatchIO:
    """The fallback: every op of a batch is one task of a shared thread pool; a condition
    variable counts the calls in progress so that :meth:`close` can wait for them."""

    def __init__(self, depth: object) -> None:
        d = _integer("depth", depth)
        if not 1 <= d <= MAX_DEPTH:
            raise InvalidArgumentError(
                f"depth={d} is not allowed; expected 1 <= depth <= {MAX_DEPTH}"
            )
        self.depth = d
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(d, 8), thread_name_prefix="kvortex-diskio"
        )
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, ops: Sequence[IOOp]) -> list[int]:
        checked = _checked_ops(ops)
        with self._cond:
            if self._closed:
                raise QueueClosed("run() on a closed BatchIO")
            self._active += 1
        futures: list[tuple[int, concurrent.futures.Future[int]]] = []
        try:
            results = [0] * len(checked)
            for i, op in enumerate(checked):
                if op[4] > 0:
                    futures.append((i, self._pool.submit(_transfer, *op)))
            for i, future in futures:
                results[i] = future.result()
            return results
        finally:
            # Even when interrupted, return only once no thread touches the caller's buffers.
            concurrent.futures.wait([f for _, f in futures])
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._active == 0)
        self._pool.shutdown(wait=True)


def _transfer(is_write: bool, fd: int, offset: int, address: int, nbytes: int) -> int:
    """One op, synchronously: bytes transferred or ``-errno`` (the native ``transfer_sync``)."""
    view = memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")
    done = 0
    try:
        while done < nbytes:
            if not is_write and done > 0:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and offset + done >= st.st_size:
                    return done  # end of file: a short read
            chunk = [view[done : done + min(nbytes - done, _SYNC_CHUNK)]]
            # preadv/pwritev retry EINTR themselves (PEP 475).
            moved = (
                os.pwritev(fd, chunk, offset + done)
                if is_write
                else os.preadv(fd, chunk, offset + done)
            )
            if moved == 0:
                return -errno.EIO if is_write else done
            done += moved
        return done
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    finally:
        view.release()


def _checked_ops(ops: object) -> list[IOOp]:
    """Validate a whole batch before any op runs (the native binding's checks, in its order)."""
    try:
        seq = ops if isinstance(ops, (list, tuple)) else tuple(cast(Iterable[object], ops))
    except TypeError:
        raise InvalidTypeError(
            f"ops is {type(ops).__name__}; expected a sequence of {_OP_FIELDS} tuples"
        ) from None
    return [_checked_op(i, op) for i, op in enumerate(seq)]


def _checked_op(i: int, op: object) -> IOOp:
    at = f"ops[{i}]"
    if not isinstance(op, (tuple, list)):
        raise InvalidTypeError(f"{at} is {type(op).__name__}; expected a tuple {_OP_FIELDS}")
    if len(op) != 5:
        raise InvalidTypeError(f"{at} has {len(op)} fields; expected 5: {_OP_FIELDS}")
    is_write = op[0]
    if type(is_write) is not bool:
        raise InvalidTypeError(
            f"{at}.is_write={is_write!r} is not a bool (got {type(is_write).__name__})"
        )
    fd = _integer(f"{at}.fd", op[1])
    offset = _integer(f"{at}.offset", op[2])
    address = _integer(f"{at}.address", op[3])
    nbytes = _integer(f"{at}.nbytes", op[4])
    if not _INT_MIN <= fd <= _INT_MAX:
        raise InvalidArgumentError(f"{at}.fd={fd} is out of range for a file descriptor")
    for name, value in (("offset", offset), ("nbytes", nbytes), ("address", address)):
        if value < 0:
            raise InvalidArgumentError(
                f"{at}.{name}={value} is not allowed; expected an integer >= 0"
            )
    if offset + nbytes > _INT64_MAX:
        raise InvalidArgumentError(f"{at}: offset={offset} + nbytes={nbytes} exceeds 2**63 - 1")
    _check_span(f"{at}: ", address, nbytes)
    return (is_write, fd, offset, address, nbytes)


def _check_span(where: str, address: int, nbytes: int) -> None:
    if address + nbytes >= 1 << 64:
        raise InvalidArgumentError(
            f"{where}address={address} + nbytes={nbytes} exceeds the address space (2**64)"
        )
    if address == 0 and nbytes > 0:
        raise InvalidArgumentError(
            f"{where}address=0 with nbytes={nbytes}; expected the address of a buffer of "
            "nbytes bytes"
        )


def _integer(name: str, value: object) -> int:
    """``value`` as an int: an ``int`` or anything with ``__index__``, never a ``bool``."""
    if type(value) is int:
        return value
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise InvalidTypeError(f"{name}={value!r} is not an integer (got {type(value).__name__})")
    return operator.index(cast(SupportsIndex, value))


def _crc32_python(address: object, nbytes: object, value: object = 0) -> int:
    a = _integer("address", address)
    n = _integer("nbytes", nbytes)
    v = _integer("value", value)
    for name, number in (("address", a), ("nbytes", n)):
        if number < 0:
            raise InvalidArgumentError(f"{name}={number} is not allowed; expected an integer >= 0")
    if not 0 <= v < 1 << 32:
        raise InvalidArgumentError(f"value={v} is not allowed; expected 0 <= value < 2**32")
    if n > _INT64_MAX:
        raise InvalidArgumentError(f"nbytes={n} exceeds 2**63 - 1")
    _check_span("", a, n)
    if n == 0:
        return v
    view = memoryview((ctypes.c_ubyte * n).from_address(a)).cast("B")
    try:
        return zlib.crc32(view, v)
    finally:
        view.release()


_CrcFn = Callable[[int, int, int], int]
# backend argument (or (None, KVORTEX_BACKEND) for the process default) -> implementation; as
# in kvortex.hashing, only successful resolutions are cached (they cannot go stale).
_crc_resolved: dict[object, _CrcFn] = {}


def _crc32_implementation(requested: object) -> _CrcFn:
    if requested is None:
        key: object = (None, os.environ.get("KVORTEX_BACKEND"))
    elif type(requested) is str:
        key = requested
    else:
        key = None  # not hashable in general; backend.resolve rejects it below
    fn = _crc_resolved.get(key) if key is not None else None
    if fn is None:
        impl = _backend.resolve("disk", requested)  # type: ignore[arg-type]
        native: Any = _loader.native().module
        fn = native.crc32 if impl == "native" else _crc32_python
        if key is not None:
            _crc_resolved[key] = fn
    return fn
