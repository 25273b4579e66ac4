"""Moving KV pages between the engine's paged KV cache and host slots.

A :class:`Mover` is built once per engine from its :class:`~kvortex.layout.PagedLayout` and a
:class:`~kvortex.memory.HostSlabPool`. ``store(block_ids, slots)`` copies the pages of those
engine blocks into the host slots (GPU -> host), ``load(slots, block_ids)`` copies them back
(host -> GPU). Chunk ``c`` covers ``block_ids[c * blocks_per_chunk : (c + 1) * blocks_per_chunk]``
and lives in ``slots[c]``, laid out plane-major (see :mod:`kvortex.layout`).

Paths (``path="auto"`` picks DMA or the kernel for each transfer, from the size of its merged
copies; CPU tensors always take the torch path):

- ``"dma"``: copy-engine transfers (``cudaMemcpyAsync``, batched where the runtime has
  ``cudaMemcpyBatchAsync``), adjacent pages merged into one copy. Barely disturbs the model's
  kernels; best when pages (or runs of adjacent pages) are large.
- ``"kernel"``: a gather/scatter kernel on a few CTAs reading or writing the registered host
  memory directly; best for small pages (per-layer layouts with 16-token blocks).
- ``"torch"``: indexing plus ``copy_``; the fallback, and the only path for CPU tensors.

Both CUDA paths run on side streams ordered after the current (compute) stream and complete
asynchronously: the returned :class:`TransferHandle` can be polled (``done()``) or waited on.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kvortex import _loader
from kvortex import backend as _backend
from kvortex.errors import (
    BackendUnavailable,
    InvalidArgumentError,
    InvalidTypeError,
    LayoutError,
    PoolClosed,
    SlotError,
    TransferError,
)

if TYPE_CHECKING:
    import torch

    from kvortex.layout import PagedLayout
    from kvortex.memory import HostSlabPool

__all__ = ["PATHS", "Mover", "TransferHandle", "resolve_path"]

PATHS = ("auto", "dma", "kernel", "torch")
_METHOD_CODE = {"dma": 0, "kernel": 1, "naive": 2}
# Inside the Mover (and in the CUDA engine's id arrays) a block id of _SKIP leaves that page
# alone on both sides. Callers never pass it: they say which pages to skip with ``skip=``, and
# every id they pass is checked to be a real block.
_SKIP = -1
# Pages (or merged runs of adjacent pages) at least this large go through the copy engines.
DMA_MIN_BYTES = 256 * 1024


def resolve_path(path: object, backend: str | None) -> str:
    """The Mover path for a requested ``path`` under a hot-path ``backend`` setting.

    ``"auto"`` becomes ``"torch"`` when the effective backend (``backend``, else the process
    default ``KVORTEX_BACKEND``) is ``"python"``: a pure-Python run then copies through torch
    too, not through the CUDA engine. An explicit path is kept.
    """
    if not isinstance(path, str) or path not in PATHS:
        raise InvalidArgumentError(f"transfer path {path!r}; expected one of {', '.join(PATHS)}")
    effective = _backend.default_backend() if backend is None else backend
    return "torch" if path == "auto" and effective == "python" else path


class TransferHandle:
    """Completion of one store or load. ``done()`` polls, ``wait()`` blocks.

    Attributes:
        direction: ``"store"`` (engine -> host) or ``"load"`` (host -> engine).
        num_chunks: chunks moved.
        nbytes: bytes moved.
    """

    __slots__ = ("_event", "_keepalive", "direction", "nbytes", "num_chunks")

    def __init__(
        self, direction: str, num_chunks: int, nbytes: int, event: Any = None, keepalive: Any = None
    ) -> None:
        self.direction = direction
        self.num_chunks = num_chunks
        self.nbytes = nbytes
        self._event = event
        self._keepalive = keepalive

    def done(self) -> bool:
        """True once every byte has landed (never blocks)."""
        if self._event is None:
            return True
        try:
            finished = bool(self._event.query())
        except RuntimeError as exc:
            raise TransferError(f"{self.direction} failed on the device: {exc}") from exc
        if finished:
            self._keepalive = None
        return finished

    def wait(self) -> None:
        """Block until the transfer finished; raise :class:`TransferError` if it failed."""
        if self._event is None:
            return
        try:
            self._event.synchronize()
        except RuntimeError as exc:
            raise TransferError(f"{self.direction} failed on the device: {exc}") from exc
        self._keepalive = None

    def wait_on_stream(self, stream: Any = None) -> None:
        """Make ``stream`` (default: the current CUDA stream) wait for this transfer without
        blocking the host: kernels queued there afterwards see the loaded pages."""
        if self._event is None:
            return
        import torch

        (stream or torch.cuda.current_stream()).wait_event(self._event)


class Mover:
    """Copies chunks between one engine's paged KV cache and one host pool.

    Args:
        layout: the engine's layout (:meth:`PagedLayout.from_kv_caches`).
        pool: host slots; each slot must hold ``layout.chunk_bytes(blocks_per_chunk)`` bytes.
        blocks_per_chunk: engine blocks per chunk (``chunk_tokens // block_size``).
        path: ``"auto"``, ``"dma"``, ``"kernel"`` or ``"torch"`` (see the module docstring).
        max_ctas: CTAs of the gather/scatter kernel (a few saturate the host link; more only
            take SMs from the model).
    """

    def __init__(
        self,
        layout: PagedLayout,
        pool: HostSlabPool,
        blocks_per_chunk: int,
        *,
        path: str = "auto",
        max_ctas: int = 8,
    ) -> None:
        if isinstance(blocks_per_chunk, bool) or not isinstance(blocks_per_chunk, int):
            raise InvalidTypeError(f"blocks_per_chunk must be an int, got {blocks_per_chunk!r}")
        if blocks_per_chunk < 1:
            raise InvalidArgumentError(f"blocks_per_chunk must be >= 1, got {blocks_per_chunk}")
        if path not in PATHS:
            raise InvalidArgumentError(f"path={path!r}; expected one of {', '.join(PATHS)}")
        if isinstance(max_ctas, bool) or not isinstance(max_ctas, int) or max_ctas < 1:
            raise InvalidArgumentError(f"max_ctas must be a positive int, got {max_ctas!r}")
        self.layout = layout
        self.pool = pool
        self.blocks_per_chunk = blocks_per_chunk
        self.chunk_bytes = layout.chunk_bytes(blocks_per_chunk)
        if pool.slot_bytes < self.chunk_bytes:
            raise InvalidArgumentError(
                f"host slots of {pool.slot_bytes} bytes cannot hold a chunk of "
                f"{self.chunk_bytes} bytes ({layout.num_planes} planes x {blocks_per_chunk} "
                f"blocks x {layout.page_bytes} bytes)"
            )
        self.max_ctas = max_ctas
        self._on_cuda = layout.device.startswith("cuda")
        self.path = self.check_path(layout, path)
        self._closed = False
        self._inflight: list[TransferHandle] = []
        self._lock = threading.Lock()
        self._plane_views = _plane_views(layout)
        self._plane_bases = np.array([p.base for p in layout.planes], dtype=np.uint64)
        self._cuda: Any = None
        if self._on_cuda:
            import torch

            self._device = torch.device(layout.device)
            self._store_stream = torch.cuda.Stream(self._device)
            self._load_stream = torch.cuda.Stream(self._device)
        if self.path != "torch":
            self._cuda = _loader.cuda().module
            _register_pool(self._cuda, pool)
        pool.add_close_callback(self._on_pool_close)

    # -- public API ---------------------------------------------------------------------------

    def store(
        self,
        block_ids: Sequence[int] | Any,
        slots: Sequence[int],
        *,
        skip: Sequence[bool] | Any = None,
        layout_id: str | None = None,
        after: Any = None,
    ) -> TransferHandle:
        """Copy the pages of ``block_ids`` into ``slots`` (engine -> host), asynchronously.

        Args:
            block_ids: ``len(slots) * blocks_per_chunk`` engine block ids (list, numpy or
                tensor of ints), chunk by chunk, each in ``[0, layout.num_blocks)``.
            slots: allocated host slots, one per chunk.
            skip: optional, one bool per block id: True leaves that page alone on both sides
                (e.g. blocks the engine already holds from its own prefix cache).
            layout_id: when given, must be this mover's ``layout.layout_id`` (a plan made for
                another engine instance is refused).
            after: a ``torch.cuda.Event`` the copy waits for; default: all work queued so far
                on the calling thread's current stream.
        """
        return self._transfer(True, block_ids, slots, skip, layout_id, after)

    def load(
        self,
        slots: Sequence[int],
        block_ids: Sequence[int] | Any,
        *,
        skip: Sequence[bool] | Any = None,
        layout_id: str | None = None,
        after: Any = None,
    ) -> TransferHandle:
        """Copy ``slots`` into the pages of ``block_ids`` (host -> engine), asynchronously.

        Arguments as for :meth:`store`. Before reading the blocks, wait on the handle (host)
        or call ``handle.wait_on_stream()`` (device).
        """
        return self._transfer(False, block_ids, slots, skip, layout_id, after)

    def close(self) -> None:
        """Wait for in-flight transfers; further use raises. Idempotent.

        A transfer being prepared on another thread finishes launching first (both hold the
        mover's lock), so closing the pool right after never leaves a copy queued against
        unmapped or unregistered memory.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._inflight = self._inflight, []
        for handle in pending:
            handle.wait()

    def __enter__(self) -> Mover:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def check_path(layout: PagedLayout, requested: str) -> str:
        """The path a Mover over ``layout`` would run for ``requested`` (raises as the
        constructor would, without building anything): ``"auto"``, ``"dma"``, ``"kernel"``
        or ``"torch"``; ``"auto"`` on CUDA is decided per transfer (see ``_method_for``)."""
        if requested not in PATHS:
            raise InvalidArgumentError(f"path={requested!r}; expected one of {', '.join(PATHS)}")
        if requested == "torch":
            return "torch"
        if not layout.device.startswith("cuda"):
            if requested != "auto":
                raise InvalidArgumentError(
                    f"path={requested!r} needs CUDA tensors; the KV cache is on {layout.device}"
                )
            return "torch"
        loaded = _loader.cuda()
        if loaded.module is None:
            if requested != "auto":
                raise BackendUnavailable(
                    f"the CUDA copy engine is unavailable: {loaded.reason}", loaded.reason
                )
            return "torch"
        return requested

    def path_for(self, block_ids: Sequence[int] | Any) -> str:
        """The path a transfer of ``block_ids`` takes: ``"dma"``, ``"kernel"`` or ``"torch"``."""
        if self.path == "torch":
            return "torch"
        code = self._method_for(self.layout.block_id_array(block_ids))
        return next(name for name, c in _METHOD_CODE.items() if c == code)

    def _method_for(self, ids: np.ndarray) -> int:
        """DMA when the transfer's merged copies are large, else the gather/scatter kernel.

        A copy merges pages of adjacent block ids within a chunk (and, in one-plane
        block-outermost layouts, a page already holds every layer), so the mean run is
        ``page_bytes * blocks / runs``. Measured on an H200 (docs/PERF.md): the copy engines
        reach the link from runs of ~256 KiB up and barely slow the model; below that, per-copy
        overhead dominates and the kernel on a few CTAs is faster.
        """
        if self.path != "auto":
            return _METHOD_CODE[self.path]
        per_chunk = ids.reshape(-1, self.blocks_per_chunk)
        runs = per_chunk.shape[0] + int(np.count_nonzero(np.diff(per_chunk, axis=1) != 1))
        mean_run = self.layout.page_bytes * len(ids) / max(runs, 1)
        return _METHOD_CODE["dma" if mean_run >= DMA_MIN_BYTES else "kernel"]

    def _transfer(
        self,
        to_host: bool,
        block_ids: Sequence[int] | Any,
        slots: Sequence[int],
        skip: Sequence[bool] | Any,
        layout_id: str | None,
        after: Any,
    ) -> TransferHandle:
        # The lock spans checks, address lookup and launch: close() (also run by the pool's
        # close) cannot unmap the slots between the check that the pool is open and the copy.
        with self._lock:
            ids, addrs = self._validate(block_ids, slots, skip, layout_id)
            return self._submit(to_host, ids, addrs, list(slots), after)

    def _validate(
        self,
        block_ids: Sequence[int] | Any,
        slots: Sequence[int],
        skip: Sequence[bool] | Any,
        layout_id: str | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._closed:
            raise TransferError("this Mover is closed")
        if layout_id is not None and layout_id != self.layout.layout_id:
            raise LayoutError(
                f"the plan was made for layout {layout_id}, but this mover serves layout "
                f"{self.layout.layout_id} (another engine instance)"
            )
        ids = self.layout.block_id_array(block_ids)
        if isinstance(slots, (str, bytes)) or not isinstance(slots, Sequence):
            raise InvalidTypeError(f"slots must be a sequence of ints, got {type(slots).__name__}")
        if len(ids) != len(slots) * self.blocks_per_chunk:
            raise InvalidArgumentError(
                f"{len(slots)} slots need {len(slots) * self.blocks_per_chunk} block ids "
                f"({self.blocks_per_chunk} per chunk), got {len(ids)}"
            )
        if skip is not None:
            mask = _skip_mask(skip, len(ids))
            if mask.any():
                ids = ids.copy()
                ids[mask] = _SKIP
        try:
            addrs = np.array([self.pool.address(s) for s in slots], dtype=np.uint64)
        except (SlotError, PoolClosed):
            raise
        except TypeError as exc:
            raise InvalidTypeError(f"slots must be ints: {exc}") from exc
        if len(set(slots)) != len(slots):
            raise InvalidArgumentError(f"slots repeat: {list(slots)}")
        return ids, addrs

    def _submit(
        self, to_host: bool, ids: np.ndarray, addrs: np.ndarray, slots: list[int], after: Any
    ) -> TransferHandle:
        direction = "store" if to_host else "load"
        nbytes = len(slots) * self.chunk_bytes
        if not slots:
            return TransferHandle(direction, 0, 0)
        if not self._on_cuda:
            self._torch_copy(to_host, ids, slots)
            return TransferHandle(direction, len(slots), nbytes)
        import torch

        stream = self._store_stream if to_host else self._load_stream
        # Order after the compute stream: a store must see the forward pass's writes; a load
        # must not overwrite blocks that queued kernels still read.
        if after is not None:
            stream.wait_event(after)
        else:
            stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(stream):
            if self.path == "torch":
                keepalive = self._torch_copy(to_host, ids, slots)
            else:
                keepalive = None
                self._cuda_copy(to_host, self._method_for(ids), ids, addrs, stream.cuda_stream)
            event = torch.cuda.Event()
            event.record(stream)
        handle = TransferHandle(direction, len(slots), nbytes, event, keepalive)
        self._inflight = [h for h in self._inflight if not _settled(h)]  # under self._lock
        self._inflight.append(handle)
        return handle

    def _cuda_copy(
        self, to_host: bool, method: int, ids: np.ndarray, addrs: np.ndarray, stream: int
    ) -> None:
        try:
            self._cuda.copy_pages(
                to_host,
                method,
                self._plane_bases,
                self.layout.planes[0].block_stride,
                self.layout.page_bytes,
                self.blocks_per_chunk,
                ids,
                addrs,
                stream,
                self.max_ctas,
            )
        except TransferError:
            raise
        except RuntimeError as exc:
            raise TransferError(str(exc)) from exc

    def _torch_copy(self, to_host: bool, ids: np.ndarray, slots: list[int]) -> list[Any]:
        """The fallback: per chunk and plane, ``index_select`` / ``index_copy_``."""
        import torch

        planes = self._plane_views
        device = planes[0].device
        index = torch.from_numpy(ids).to(device, non_blocking=True)
        bpc, page = self.blocks_per_chunk, self.layout.page_bytes
        keepalive: list[Any] = [index]
        for c, slot in enumerate(slots):
            view = self.pool.view(slot)
            host = torch.frombuffer(view, dtype=torch.uint8)[: self.chunk_bytes]
            host = host.view(len(planes), bpc, page)
            chunk_ids = index[c * bpc : (c + 1) * bpc]
            keep = ids[c * bpc : (c + 1) * bpc] != _SKIP
            if not keep.any():
                continue
            if not keep.all():  # some pages skipped: move only the others
                rows = torch.from_numpy(np.flatnonzero(keep)).to(device)
                chunk_ids = chunk_ids.index_select(0, rows)
                host_rows = torch.from_numpy(np.flatnonzero(keep))
                self._copy_rows(to_host, planes, chunk_ids, host, host_rows, keepalive)
            else:
                self._copy_rows(to_host, planes, chunk_ids, host, None, keepalive)
            keepalive.append(view)
        return keepalive

    @staticmethod
    def _copy_rows(
        to_host: bool,
        planes: list[torch.Tensor],
        chunk_ids: torch.Tensor,
        host: torch.Tensor,
        host_rows: torch.Tensor | None,
        keepalive: list[Any],
    ) -> None:
        """Copy the pages of ``chunk_ids`` between every plane and the host chunk ``host``
        (``[planes, blocks_per_chunk, page_bytes]``), at ``host_rows`` (None: all rows)."""
        import torch

        device = planes[0].device
        for p, plane in enumerate(planes):
            if to_host:
                if host_rows is not None:
                    host[p].index_copy_(0, host_rows, plane.index_select(0, chunk_ids).cpu())
                elif device.type == "cpu":
                    torch.index_select(plane, 0, chunk_ids, out=host[p])
                else:
                    gathered = plane.index_select(0, chunk_ids)
                    host[p].copy_(gathered)
                    keepalive.append(gathered)
            else:
                src = host[p] if host_rows is None else host[p].index_select(0, host_rows)
                if device.type != "cpu":
                    src = src.to(device)
                plane.index_copy_(0, chunk_ids, src)
                keepalive.append(src)

    def _on_pool_close(self) -> None:
        self.close()
        if self._cuda is not None:
            _unregister_pool(self._cuda, self.pool)


def _settled(handle: TransferHandle) -> bool:
    """Done, or failed (its owner learns of the failure from its own handle)."""
    try:
        return handle.done()
    except TransferError:
        return True


def _skip_mask(skip: Any, count: int) -> np.ndarray:
    """``skip`` as a bool array of ``count`` entries (list, tuple, numpy or torch of bools)."""
    if hasattr(skip, "detach") and hasattr(skip, "cpu"):
        skip = skip.detach().cpu().numpy()
    if isinstance(skip, (list, tuple)) and not all(type(v) is bool for v in skip):
        raise InvalidTypeError("skip must hold bools, one per block id")
    mask = np.asarray(skip)
    if mask.dtype != np.bool_ or mask.ndim != 1:
        raise InvalidTypeError(f"skip must be a 1-D bool sequence, got {mask.dtype} {mask.shape}")
    if len(mask) != count:
        raise InvalidArgumentError(f"skip has {len(mask)} entries for {count} block ids")
    return mask


def _plane_views(layout: PagedLayout) -> list[torch.Tensor]:
    """A ``[num_blocks, page_bytes]`` uint8 view of every plane (zero copy)."""
    import torch

    storages: dict[int, torch.Tensor] = {}
    for t in layout.tensors:
        s = t.untyped_storage()
        storages.setdefault(s.data_ptr(), torch.empty(0, dtype=torch.uint8, device=t.device))
        storages[s.data_ptr()].set_(s)
    views = []
    for plane in layout.planes:
        owner = max((p for p in storages if p <= plane.base), default=None)
        if owner is None:
            raise LayoutError(f"plane at {plane.base:#x} lies in no registered tensor")
        views.append(
            torch.as_strided(
                storages[owner],
                (layout.num_blocks, layout.page_bytes),
                (plane.block_stride, 1),
                plane.base - owner,
            )
        )
    return views


# The pool region is registered with CUDA once, however many movers use it.
_registered: dict[int, int] = {}
_registered_lock = threading.Lock()


def _register_pool(cuda: Any, pool: HostSlabPool) -> None:
    with _registered_lock:
        key = pool.base_address
        if key not in _registered:
            cuda.register_host(pool.base_address, pool.nbytes)
        _registered[key] = _registered.get(key, 0) + 1


def _unregister_pool(cuda: Any, pool: HostSlabPool) -> None:
    with _registered_lock:
        key = pool.base_address
        count = _registered.get(key, 0) - 1
        if count <= 0:
            _registered.pop(key, None)
            cuda.unregister_host(key)
        else:
            _registered[key] = count
