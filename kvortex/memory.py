"""Host slab pool: the L1 tier's memory, one large mapping cut into fixed-size slots.

:class:`HostSlabPool` maps one anonymous region (``MAP_PRIVATE | MAP_NORESERVE``, never touched
up front, so even tens of GiB come up in well under a millisecond and commit memory only as
slots are written), optionally binds it to a NUMA node (``mbind``) and asks for transparent
huge pages (``madvise``). The region is cut into ``num_slots`` slots of ``slot_bytes`` bytes,
each starting on a 4096-byte boundary, as O_DIRECT I/O and DMA want. Slots are handed out and
taken back in O(1) and are read and written through zero-copy memoryviews.

Two implementations share one contract and one test suite: the compiled one
(``kvortex._native.HostSlabPool``, C++ in ``csrc/src/slab_pool.cc``) and the pure-Python
fallback below (the ``mmap`` module, ``ctypes`` for addresses and ``mbind``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import operator
import os
import platform
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, SupportsIndex, cast

from kvortex import _loader
from kvortex import backend as _backend
from kvortex.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    KVortexError,
    PoolClosed,
    SlotError,
)

if TYPE_CHECKING:
    from kvortex.config import KVortexConfig

__all__ = ["SLOT_ALIGNMENT", "HostSlabPool"]

SLOT_ALIGNMENT = 4096
"""Every slot starts on a multiple of this many bytes from the (page-aligned) region base."""

# Largest region either implementation accepts: PTRDIFF_MAX / Py_ssize_t max.
_MAX_REGION_BYTES = sys.maxsize
_THP_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"
_NODE_DIR = "/sys/devices/system/node"

# Values absent from the mmap module before Python 3.13 / from ctypes: per-architecture Linux ABI.
_MACHINE = platform.machine()
_MAP_NORESERVE: int = getattr(
    mmap, "MAP_NORESERVE", {"ppc64": 0x40, "ppc64le": 0x40, "mips": 0x400}.get(_MACHINE, 0x4000)
)
_SYS_MBIND = {"x86_64": 237, "aarch64": 235, "ppc64le": 259, "ppc64": 259, "s390x": 268}.get(
    _MACHINE, 235 if _MACHINE.startswith("riscv") else None
)
_MPOL_BIND = 2  # <linux/mempolicy.h>


class HostSlabPool:
    """A region of host memory cut into fixed-size, page-aligned slots of one KV chunk each.

    Args:
        slot_bytes: bytes per slot (``int`` >= 1). Each slot starts ``slot_stride`` bytes after
            the previous one, ``slot_bytes`` rounded up to 4096.
        num_slots: number of slots (``int`` >= 1). The region is ``slot_stride * num_slots``
            bytes and must not exceed ``sys.maxsize``.
        numa_node: ``None`` (no binding) or the id of a NUMA node of this machine (one listed
            under ``/sys/devices/system/node``); the region's pages are then allocated there
            only (``mbind(MPOL_BIND)``).
        hugepages: ``"auto"`` asks for transparent huge pages (``madvise(MADV_HUGEPAGE)``) when
            the kernel offers them and silently goes without otherwise; ``True`` requires them;
            ``False`` does not ask.
        backend: ``None`` (the process default, ``KVORTEX_BACKEND``), ``"auto"``, ``"native"``
            or ``"python"``; see :mod:`kvortex.backend`.

    Raises:
        InvalidTypeError: an argument that is not an ``int`` (``bool`` included), or a
            ``hugepages`` that is neither ``bool`` nor ``str``.
        InvalidArgumentError: a size below 1, a region above ``sys.maxsize`` bytes, a negative
            or absent NUMA node, an unknown ``hugepages`` string, or ``hugepages=True`` on a
            kernel without transparent huge pages.
        OSError: ``mmap``, ``mbind`` or (with ``hugepages=True``) ``madvise`` failed;
            ``errno`` and the message say why.
        BackendUnavailable: ``backend="native"`` but the compiled core is not available.

    Slot operations, all O(1) and thread safe (bound straight to the implementation, so a call
    costs what the implementation costs):

    - ``alloc() -> int | None``: a free slot id in ``range(num_slots)``, or ``None`` when all
      are allocated.
    - ``free(slot: int) -> None``: give an allocated slot back.
    - ``view(slot: int) -> memoryview``: the slot's bytes, zero-copy and writable, format
      ``"B"``, exactly ``slot_bytes`` long.
    - ``address(slot: int) -> int``: the slot's address, ``base_address + slot * slot_stride``.

    Each raises :class:`~kvortex.errors.InvalidTypeError` for a slot that is not an ``int``,
    :class:`~kvortex.errors.PoolClosed` once the pool is closed, and
    :class:`~kvortex.errors.SlotError` for a slot out of range or not allocated (so ``free``
    of a free slot, a double free, is caught).

    Closing: :meth:`close` (idempotent; also run by ``with`` and when the pool is garbage
    collected) first runs the callbacks registered with :meth:`add_close_callback`, once each,
    while the region is still mapped — the hook for ``cudaHostUnregister`` after a
    ``cudaHostRegister`` of ``base_address``/``nbytes`` — then releases the region. Memoryviews
    from :meth:`view` stay valid memory after close: the region is unmapped when the last of
    them is released.
    """

    alloc: Callable[[], int | None]
    """Allocate a slot: its id, or ``None`` when the pool is full."""
    free: Callable[[int], None]
    """Return an allocated slot to the pool."""
    view: Callable[[int], memoryview]
    """Zero-copy, writable ``memoryview`` (format ``"B"``) of an allocated slot's bytes."""
    address: Callable[[int], int]
    """Address of an allocated slot (for DMA and ``cudaMemcpy``)."""

    def __init__(
        self,
        slot_bytes: int,
        num_slots: int,
        *,
        numa_node: int | None = None,
        hugepages: bool | Literal["auto"] = "auto",
        backend: str | None = None,
    ) -> None:
        self._impl: _PoolImpl | None = None  # set last, so __del__ of a failed init is a no-op
        self._close_lock = threading.RLock()
        self._callbacks: list[Callable[[], object]] = []
        self._closing = False
        self._backend = _backend.resolve("pool", backend)
        impl: _PoolImpl
        if self._backend == "native":
            native_class: Any = getattr(_loader.native().module, "HostSlabPool")  # noqa: B009
            impl = native_class(slot_bytes, num_slots, numa_node, hugepages)
        else:
            impl = _PyHostSlabPool(slot_bytes, num_slots, numa_node, hugepages)
        self.alloc = impl.alloc
        self.free = impl.free
        self.view = impl.view
        self.address = impl.address
        self._impl = impl

    @classmethod
    def for_config(cls, config: KVortexConfig, slot_bytes: int, num_slots: int) -> HostSlabPool:
        """A pool with the NUMA, huge-page and backend settings of ``config``."""
        return cls(
            slot_bytes,
            num_slots,
            numa_node=config.numa_node,
            hugepages=config.hugepages,
            backend=config.backend,
        )

    @property
    def backend(self) -> Literal["native", "python"]:
        """Which implementation this pool runs on."""
        return self._backend

    @property
    def slot_bytes(self) -> int:
        """Usable bytes per slot (the length of every view)."""
        return self._live.slot_bytes

    @property
    def slot_stride(self) -> int:
        """Distance between consecutive slots: ``slot_bytes`` rounded up to 4096."""
        return self._live.slot_stride

    @property
    def num_slots(self) -> int:
        """Number of slots."""
        return self._live.num_slots

    @property
    def nbytes(self) -> int:
        """Size of the whole region, ``slot_stride * num_slots``."""
        return self._live.nbytes

    @property
    def base_address(self) -> int:
        """Address of the region (and of slot 0); still reported after close."""
        return self._live.base_address

    @property
    def used(self) -> int:
        """Slots currently allocated (0 after close)."""
        return self._live.used

    @property
    def available(self) -> int:
        """Slots :meth:`alloc` can still hand out (0 after close)."""
        return self._live.available

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has released the pool."""
        return self._live.closed

    @property
    def numa_node(self) -> int | None:
        """The NUMA node the region is bound to, or ``None``."""
        return self._live.numa_node

    @property
    def hugepages(self) -> bool:
        """Whether ``madvise(MADV_HUGEPAGE)`` was applied to the region."""
        return self._live.hugepages

    @property
    def _live(self) -> _PoolImpl:
        impl = self._impl
        assert impl is not None, "HostSlabPool.__init__ did not complete"
        return impl

    def add_close_callback(self, fn: Callable[[], object]) -> None:
        """Have :meth:`close` call ``fn()`` once, before the region is unmapped.

        Callbacks run in registration order. If one raises, the others still run, the pool
        still closes, and the first exception is re-raised from :meth:`close`.

        Raises:
            InvalidTypeError: ``fn`` is not callable.
            PoolClosed: the pool is closed or closing.
        """
        if not callable(fn):
            raise InvalidTypeError(
                f"close callback {fn!r} is not callable (got {type(fn).__name__})"
            )
        with self._close_lock:
            if self._closing or self._live.closed:
                raise PoolClosed("add_close_callback() on a closed HostSlabPool")
            self._callbacks.append(fn)

    def close(self) -> None:
        """Run the close callbacks, then release the region. Idempotent."""
        impl = self._impl
        if impl is None:
            return
        first_error: BaseException | None = None
        with self._close_lock:
            if self._closing:
                return
            self._closing = True
            callbacks, self._callbacks = self._callbacks, []
            for fn in callbacks:
                try:
                    fn()
                except BaseException as exc:  # the pool must close whatever a callback does
                    if first_error is None:
                        first_error = exc
            impl.close()
        if first_error is not None:
            raise first_error

    def __enter__(self) -> HostSlabPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A pool dropped without close() must still run its callbacks before the unmap.
        if getattr(self, "_impl", None) is not None and not getattr(self, "_closing", True):
            self.close()

    def __repr__(self) -> str:
        impl = self._impl
        if impl is None:
            return "HostSlabPool(<not initialised>)"
        state = "closed" if impl.closed else f"used={impl.used}"
        return (
            f"HostSlabPool(slot_bytes={impl.slot_bytes}, num_slots={impl.num_slots}, "
            f"{state}, backend={self._backend!r})"
        )


class _PoolImpl(Protocol):
    """What both implementations provide (the native class and :class:`_PyHostSlabPool`)."""

    @property
    def slot_bytes(self) -> int: ...
    @property
    def slot_stride(self) -> int: ...
    @property
    def num_slots(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def base_address(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def available(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def numa_node(self) -> int | None: ...
    @property
    def hugepages(self) -> bool: ...
    def alloc(self) -> int | None: ...
    def free(self, slot: int) -> None: ...
    def view(self, slot: int) -> memoryview: ...
    def address(self, slot: int) -> int: ...
    def close(self) -> None: ...


_RELEASED = memoryview(b"")


class _PyHostSlabPool:
    """The pure-Python implementation; same semantics and errors as the native one.

    Bookkeeping: a stack of freed slots, a counter below which slots have been handed out at
    least once (so creation costs nothing per slot), and the set of allocated slots. One lock
    guards them; views are slices of one memoryview of the ``mmap`` object.
    """

    def __init__(self, slot_bytes: object, num_slots: object, numa_node: object, hugepages: object):
        # Every argument's type first, then the values (the native binding's order).
        sb = _integer("slot_bytes", slot_bytes)
        ns = _integer("num_slots", num_slots)
        node = None if numa_node is None else _integer("numa_node", numa_node)
        mode = _hugepages_mode(hugepages)
        if sb < 1 or ns < 1:
            name, value = ("slot_bytes", sb) if sb < 1 else ("num_slots", ns)
            raise InvalidArgumentError(f"{name}={value} is not allowed; expected an integer >= 1")
        stride = -(-sb // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        if stride * ns > _MAX_REGION_BYTES:
            raise InvalidArgumentError(
                f"slot_bytes={sb} x num_slots={ns} is too large: the region (slots rounded up "
                f"to {SLOT_ALIGNMENT} bytes) must be at most {_MAX_REGION_BYTES} bytes"
            )
        if node is not None:
            _check_numa_node(node)
        if mode == "required" and not _thp_available():
            setting = _thp_setting()
            where = f"reads {setting!r}" if setting else "is missing or unreadable"
            raise InvalidArgumentError(
                f"hugepages=True needs transparent huge pages, but {_THP_PATH} {where}"
            )
        nbytes = stride * ns
        try:
            # fd -1: the mmap module adds MAP_ANONYMOUS itself.
            mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
        except OSError as exc:
            code = exc.errno or errno.ENOMEM
            raise OSError(
                code,
                f"mmap of {nbytes} bytes (anonymous, MAP_NORESERVE) failed: {os.strerror(code)}",
            ) from None
        try:
            base = _address_of(mm)
            if node is not None:
                _mbind(base, nbytes, node)
            huge = _advise_hugepages(mm, nbytes, mode)
        except BaseException:
            mm.close()
            raise
        self._mm: mmap.mmap | None = mm
        self._mv = memoryview(mm)
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._next_fresh = 0
        self._allocated: set[int] = set()
        self._closed = False
        self.slot_bytes = sb
        self.slot_stride = stride
        self.num_slots = ns
        self.nbytes = nbytes
        self.base_address = base
        self.numa_node = node
        self.hugepages = huge

    def alloc(self) -> int | None:
        with self._lock:
            if self._closed:
                raise PoolClosed("alloc() on a closed HostSlabPool")
            if self._free:
                slot = self._free.pop()  # most recently freed first: its pages are warm
            elif self._next_fresh < self.num_slots:
                slot = self._next_fresh
                self._next_fresh = slot + 1
            else:
                return None
            self._allocated.add(slot)
            return slot

    def free(self, slot: int) -> None:
        if type(slot) is not int:
            slot = _integer("slot", slot)
        with self._lock:
            try:
                self._allocated.remove(slot)  # empty once closed
            except KeyError:
                raise self._slot_error("free", slot) from None
            self._free.append(slot)

    def view(self, slot: int) -> memoryview:
        if type(slot) is not int:
            slot = _integer("slot", slot)
        with self._lock:
            if slot in self._allocated:
                start = slot * self.slot_stride
                return self._mv[start : start + self.slot_bytes]
            raise self._slot_error("view", slot)

    def address(self, slot: int) -> int:
        if type(slot) is not int:
            slot = _integer("slot", slot)
        with self._lock:
            if slot in self._allocated:
                return self.base_address + slot * self.slot_stride
            raise self._slot_error("address", slot)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._allocated.clear()
            self._free.clear()
            self._next_fresh = 0
            mv, self._mv = self._mv, _RELEASED
            mm, self._mm = self._mm, None
        # Slices handed out by view() do not count as exports of `mv` (they share its managed
        # buffer), so releasing it always succeeds.
        mv.release()
        if mm is not None:
            # With views still alive the mmap module refuses to unmap under them (BufferError).
            # Dropping our reference instead leaves the munmap to the mmap object's
            # deallocation, which happens when the last view releases its export.
            with contextlib.suppress(BufferError):
                mm.close()

    @property
    def used(self) -> int:
        with self._lock:
            return len(self._allocated)

    @property
    def available(self) -> int:
        with self._lock:
            return 0 if self._closed else self.num_slots - len(self._allocated)

    @property
    def closed(self) -> bool:
        return self._closed

    def _slot_error(self, op: str, slot: int) -> KVortexError:
        call = f"{op}({slot})"
        if self._closed:
            return PoolClosed(f"{call} on a closed HostSlabPool")
        if not 0 <= slot < self.num_slots:
            return SlotError(
                f"{call}: slot {slot} is out of range; this pool has slots 0..{self.num_slots - 1}"
            )
        why = (
            "is not allocated (double free?)"
            if op == "free"
            else "is not allocated; alloc() it first"
        )
        return SlotError(f"{call}: slot {slot} {why}")


def _integer(name: str, value: object) -> int:
    """``value`` as an int: an ``int`` or anything with ``__index__``, never a ``bool``."""
    if type(value) is int:
        return value
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise InvalidTypeError(f"{name}={value!r} is not an integer (got {type(value).__name__})")
    return operator.index(cast(SupportsIndex, value))


def _hugepages_mode(value: object) -> Literal["off", "auto", "required"]:
    if value is True:
        return "required"
    if value is False:
        return "off"
    if not isinstance(value, str):
        raise InvalidTypeError(
            f"hugepages={value!r} is not allowed; expected 'auto', True or False "
            f"(got {type(value).__name__})"
        )
    if value == "auto":
        return "auto"
    raise InvalidArgumentError(
        f"hugepages={value!r} is not allowed; expected 'auto', True or False"
    )


def _thp_setting() -> str:
    """Content of the kernel's THP switch, e.g. ``"always [madvise] never"``; ``""`` if absent."""
    try:
        with open(_THP_PATH) as f:
            return f.readline().rstrip()
    except OSError:
        return ""


def _thp_available() -> bool:
    setting = _thp_setting()
    return "[always]" in setting or "[madvise]" in setting


def _numa_nodes() -> list[int]:
    """NUMA node ids listed under ``/sys/devices/system/node``, ascending."""
    try:
        names = [p.name for p in Path(_NODE_DIR).iterdir()]
    except OSError:
        return []
    return sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit())


def _check_numa_node(node: int) -> None:
    if node < 0:
        raise InvalidArgumentError(
            f"numa_node={node} is not allowed; expected None or a NUMA node id >= 0"
        )
    nodes = _numa_nodes()
    if node in nodes:
        return
    present = (
        "NUMA nodes present: " + ", ".join(map(str, nodes))
        if nodes
        else f"no NUMA nodes are listed under {_NODE_DIR}"
    )
    raise InvalidArgumentError(f"numa_node={node} does not exist on this machine; {present}")


def _address_of(mm: mmap.mmap) -> int:
    # from_buffer exports the mapping; the temporary is dropped at once so that close() later
    # finds no exports but the views'.
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


@functools.cache
def _syscall() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    return fn


def _mbind(address: int, length: int, node: int) -> None:
    """Bind ``[address, address + length)`` to ``node`` (the raw syscall: no libnuma)."""
    if _SYS_MBIND is None:
        raise OSError(
            errno.ENOSYS,
            f"mbind to NUMA node {node} is not supported on this platform: "
            f"{os.strerror(errno.ENOSYS)}",
        )
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    mask = (ctypes.c_ulong * (node // bits + 1))()
    mask[node // bits] = 1 << (node % bits)
    # The kernel reads maxnode - 1 bits (an off-by-one kept for ABI compatibility), so pass one
    # more than the bits the mask holds.
    maxnode = len(mask) * bits + 1
    rc = _syscall()(
        ctypes.c_long(_SYS_MBIND),
        ctypes.c_void_p(address),
        ctypes.c_ulong(length),
        ctypes.c_long(_MPOL_BIND),
        mask,
        ctypes.c_ulong(maxnode),
        ctypes.c_uint(0),
    )
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(
            code,
            f"mbind of the host slab pool ({length} bytes) to NUMA node {node} failed: "
            f"{os.strerror(code)}",
        )


def _advise_hugepages(mm: mmap.mmap, nbytes: int, mode: str) -> bool:
    """Apply ``MADV_HUGEPAGE`` as ``mode`` says; whether it was applied."""
    if mode == "off" or (mode == "auto" and not _thp_available()):
        return False
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    try:
        if advice is None:
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        mm.madvise(advice)
    except OSError as exc:
        if mode == "auto":
            return False  # best effort
        code = exc.errno or errno.EINVAL
        raise OSError(
            code,
            f"madvise(MADV_HUGEPAGE) of the host slab pool ({nbytes} bytes) failed: "
            f"{os.strerror(code)}",
        ) from None
    return True
