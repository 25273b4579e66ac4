"""The serving engine's paged KV cache, reduced to *planes*.

vLLM hands a connector one tensor per attention layer (``register_kv_caches``). Whatever the
version and attention backend, each engine block maps to one fixed-size, contiguous *page* in
each of a list of planes; a plane is ``(base address, block stride in bytes)`` and every page
has ``page_bytes`` bytes. A chunk of ``blocks_per_chunk`` blocks is stored on the host as the
concatenation of its pages, plane-major: ``[plane][block in chunk][page bytes]``.

Supported (each detected from shapes and strides, never from names):

=====================  ===================================  ==========================
vLLM                   per-layer tensor                     planes
=====================  ===================================  ==========================
0.15 FlashAttention    ``[2, B, N, H, D]`` (NHD or HND)     2 per layer (K, V)
0.15 FlashInfer        ``[B, 2, N, H, D]`` (NHD or HND)     1 per layer
0.15 MLA               ``[B, N, C]``                        1 per layer
0.33 per-layer views   ``[B, H, N, C]`` (LBNHC, LBHNC)      1 per layer
0.33 block outermost   ``[B, H, N, C]`` (BLNHC, BLHNC)      1 in all (all layers of a block)
0.33 MLA               ``[B, 1, N, C]``                     1 per layer
=====================  ===================================  ==========================

Anything else raises :class:`LayoutError` saying what was found. The layout's
:attr:`PagedLayout.fingerprint` changes whenever the byte format of a stored chunk changes, so
chunks written under one format are never read back under another.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvortex.errors import InvalidArgumentError, InvalidTypeError, LayoutError

if TYPE_CHECKING:
    import torch

__all__ = ["LayoutError", "PagedLayout", "Plane", "block_id_array"]

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Plane:
    """One plane of the paged KV cache: block ``b``'s page starts at ``base + b * block_stride``."""

    layer: str
    part: str  # "kv", "k", "v", or "*" for a merged block-outermost plane
    base: int
    block_stride: int


@dataclass(frozen=True)
class _LayerPages:
    """What one layer tensor contributes, before planes of adjacent layers are merged."""

    planes: list[Plane]
    page_format: str
    page_bytes: int


@dataclass(frozen=True, eq=False)
class PagedLayout:
    """An engine's KV cache as planes; built once with :meth:`from_kv_caches`.

    Attributes:
        planes: the planes, in layer order (K before V where a layer has two).
        page_bytes: bytes of one page (equal in every plane).
        num_blocks: engine blocks per plane.
        block_size: tokens per engine block.
        dtype: the KV element type, as torch prints it (e.g. ``"torch.bfloat16"``).
        device: the tensors' device, as torch prints it (e.g. ``"cuda:0"`` or ``"cpu"``).
        kind: which supported layout was recognised.
        fingerprint: 16 hex digits naming the byte format of a page (see module docstring).
        layout_id: unique per :meth:`from_kv_caches` call: plans made for one engine instance
            are refused by another.
        tensors: the engine's tensors, kept so their memory outlives the layout.
    """

    planes: tuple[Plane, ...]
    page_bytes: int
    num_blocks: int
    block_size: int
    dtype: str
    device: str
    kind: str
    fingerprint: str
    layout_id: str
    tensors: tuple[Any, ...] = field(repr=False)

    @property
    def num_planes(self) -> int:
        return len(self.planes)

    def chunk_bytes(self, blocks_per_chunk: int) -> int:
        """Host bytes of one chunk of ``blocks_per_chunk`` blocks."""
        return self.num_planes * blocks_per_chunk * self.page_bytes

    def host_offset(self, plane: int, block_in_chunk: int, blocks_per_chunk: int) -> int:
        """Byte offset of a page inside a host chunk (plane-major order)."""
        return (plane * blocks_per_chunk + block_in_chunk) * self.page_bytes

    def block_id_array(
        self, values: object, *, name: str = "block_ids", unique: bool = False
    ) -> np.ndarray:
        """``values`` as checked engine block ids of this layout (see :func:`block_id_array`)."""
        return block_id_array(values, self.num_blocks, name=name, unique=unique)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (for logs and ``kvortex info``)."""
        return {
            "kind": self.kind,
            "planes": self.num_planes,
            "page_bytes": self.page_bytes,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "dtype": self.dtype,
            "device": self.device,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_kv_caches(
        cls,
        kv_caches: Mapping[str, torch.Tensor],
        block_size: int,
        *,
        num_blocks: int | None = None,
    ) -> PagedLayout:
        """Recognise the layout of ``kv_caches`` (layer name -> KV tensor, in layer order).

        Args:
            kv_caches: what vLLM passes to ``register_kv_caches``; every tensor on one device,
                of one dtype, with one block count.
            block_size: tokens per engine block (vLLM's ``cache_config.block_size``).
            num_blocks: optional; only needed to tell ``[2, B, ...]`` from ``[B, 2, ...]``
                when ``B == 2``.

        Raises:
            LayoutError: the tensors do not form a supported layout (the message says why).
            InvalidTypeError: ``kv_caches`` is not a non-empty mapping of tensors.
        """
        import torch

        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise LayoutError(f"block_size must be a positive int, got {block_size!r}")
        if not isinstance(kv_caches, Mapping) or not kv_caches:
            raise InvalidTypeError(
                "kv_caches must be a non-empty mapping of layer name to tensor, "
                f"got {type(kv_caches).__name__}"
            )
        tensors = list(kv_caches.items())
        for name, t in tensors:
            if not isinstance(t, torch.Tensor):
                raise InvalidTypeError(f"kv_caches[{name!r}] is a {type(t).__name__}, not a tensor")
        _check_uniform(tensors)

        layers = [_layer_pages(name, t, block_size, num_blocks) for name, t in tensors]
        formats = {lp.page_format for lp in layers}
        if len(formats) != 1:
            raise LayoutError(f"layers have different page formats: {sorted(formats)}")
        page_bytes = layers[0].page_bytes
        planes = [p for lp in layers for p in lp.planes]
        strides = {p.block_stride for p in planes}
        if len(strides) != 1:
            raise LayoutError(f"planes have different block strides: {sorted(strides)}")
        first = tensors[0][1]
        nblocks = _block_count(first, layers[0].page_format)

        merged = _merge_block_outermost(planes, page_bytes)
        kind = _kind_name(first, layers[0].page_format, merged is not None)
        if merged is not None:
            planes, page_bytes = [merged], page_bytes * len(planes)
        description = {
            "version": _FORMAT_VERSION,
            "dtype": str(first.dtype),
            "block_size": block_size,
            "page_format": layers[0].page_format,
            "planes_per_layer": len(layers[0].planes),
            "num_layers": len(layers),
            "merged_layers": merged is not None,
        }
        digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
        return cls(
            planes=tuple(planes),
            page_bytes=page_bytes,
            num_blocks=nblocks,
            block_size=block_size,
            dtype=str(first.dtype),
            device=str(first.device),
            kind=kind,
            fingerprint=digest[:16],
            layout_id=uuid.uuid4().hex,
            tensors=tuple(t for _, t in tensors),
        )


def _check_uniform(tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    for attr in ("dtype", "device"):
        values = {str(getattr(t, attr)) for _, t in tensors}
        if len(values) != 1:
            found = {name: str(getattr(t, attr)) for name, t in tensors}
            raise LayoutError(f"all KV tensors must share one {attr}; found {found}")
    shapes = {tuple(t.shape) for _, t in tensors}
    if len(shapes) != 1:
        found_shapes = {name: tuple(t.shape) for name, t in tensors}
        raise LayoutError(f"all KV tensors must have one shape; found {found_shapes}")


# Logical dimension names per recognised shape. "B" is the block dimension, "kv" the K/V
# selector; the rest describe a page's contents.
def _dim_names(t: torch.Tensor, block_size: int, num_blocks: int | None) -> tuple[str, ...]:
    shape = tuple(t.shape)
    if t.dim() == 5:
        flash_attn = shape[0] == 2 and block_size in (shape[2], shape[3])
        flash_infer = shape[1] == 2 and block_size in (shape[2], shape[3])
        if flash_attn and flash_infer:
            if num_blocks is None:
                raise LayoutError(
                    f"shape {shape} is both [2, B, ...] and [B, 2, ...]; pass num_blocks"
                )
            flash_attn = shape[1] == num_blocks
            flash_infer = not flash_attn
        tail = ("N", "H", "D") if shape[2] == block_size else ("H", "N", "D")
        if flash_attn:
            return ("kv", "B", *tail)
        if flash_infer:
            return ("B", "kv", *tail)
    elif t.dim() == 4 and shape[2] == block_size:
        return ("B", "H", "N", "C")
    elif t.dim() == 3 and shape[1] == block_size:
        return ("B", "N", "C")
    raise LayoutError(
        f"unsupported KV tensor shape {shape} (strides {tuple(t.stride())}) for block_size "
        f"{block_size}; expected [2,B,N,H,D], [B,2,N,H,D], [B,H,N,C] or [B,N,C]"
    )


def _layer_pages(
    name: str, t: torch.Tensor, block_size: int, num_blocks: int | None
) -> _LayerPages:
    names = _dim_names(t, block_size, num_blocks)
    shape, stride = tuple(t.shape), tuple(t.stride())
    bdim = names.index("B")
    item = t.element_size()
    # Dims physically outside the block dim select a plane; dims inside form the page.
    outer = [i for i in range(t.dim()) if i != bdim and shape[i] > 1 and stride[i] > stride[bdim]]
    inner = [i for i in range(t.dim()) if i != bdim and i not in outer and shape[i] > 1]
    inner.sort(key=lambda i: stride[i], reverse=True)
    expected = 1
    for i in reversed(inner):
        if stride[i] != expected:
            raise LayoutError(
                f"layer {name!r}: a block's page is not contiguous (shape {shape}, strides "
                f"{stride}); dimension {names[i]} has stride {stride[i]}, expected {expected}"
            )
        expected *= shape[i]
    page_elems = expected
    if stride[bdim] < page_elems:
        raise LayoutError(
            f"layer {name!r}: blocks overlap (block stride {stride[bdim]} elements < page "
            f"{page_elems} elements)"
        )
    if any(names[i] != "kv" for i in outer):
        raise LayoutError(
            f"layer {name!r}: only the K/V dimension may lie outside the block dimension; "
            f"found {[names[i] for i in outer]} (shape {shape}, strides {stride})"
        )
    base = t.data_ptr()
    planes = []
    for idx in itertools.product(*(range(shape[i]) for i in outer)):
        offset = sum(k * stride[i] for k, i in zip(idx, outer, strict=False)) * item
        part = "kv" if not outer else "kv"[idx[0]]
        planes.append(Plane(name, part, base + offset, stride[bdim] * item))
    page_format = ".".join(f"{names[i]}{shape[i]}" for i in inner) + f":{t.dtype}"
    return _LayerPages(planes, page_format, page_elems * item)


def _block_count(t: torch.Tensor, page_format: str) -> int:
    shape = tuple(t.shape)
    return int(shape[1] if t.dim() == 5 and shape[0] == 2 and "kv" not in page_format else shape[0])


def _merge_block_outermost(planes: list[Plane], page_bytes: int) -> Plane | None:
    """One plane for all layers when each block's pages are adjacent (BLNHC / BLHNC)."""
    if len(planes) < 2:
        return None
    stride = planes[0].block_stride
    adjacent = all(
        planes[i + 1].base == planes[i].base + page_bytes for i in range(len(planes) - 1)
    )
    if adjacent and stride == page_bytes * len(planes):
        return Plane("*", "*", planes[0].base, stride)
    return None


def _kind_name(t: torch.Tensor, page_format: str, merged: bool) -> str:
    dims = page_format.split(":")[0]
    order = "HN" if dims.find("H") < dims.find("N") and "H" in dims else "NH"
    if merged:
        return f"block-outermost (BL{order}C)"
    if t.dim() == 5:
        backend = "flashinfer" if "kv" in page_format else "flash-attn"
        return f"vllm-0.15 {backend} ({'HND' if order == 'HN' else 'NHD'})"
    if t.dim() == 3:
        return "vllm-0.15 mla"
    if tuple(t.shape)[1] == 1:
        return "vllm-0.33 single-head (MLA)"
    return f"vllm-0.33 per-layer (LB{order}C)"


def block_id_array(
    values: object, num_blocks: int, *, name: str = "block_ids", unique: bool = False
) -> np.ndarray:
    """Engine block ids as a 1-D ``int64`` array, each checked to lie in ``[0, num_blocks)``.

    Accepts a list or tuple of ints (numpy integer scalars too), or a 1-D integer numpy array
    or torch tensor (any device). Refuses with :class:`InvalidArgumentError`, before any cast:
    ``None``, strings, scalars, bools, floats, arrays of two or more dimensions, ids out of
    range (checked as Python ints, so ``2**64 - 1`` never wraps to ``-1``) and, with
    ``unique``, repeated ids. Negative ids are never valid: they are not blocks.
    """
    if values is None or isinstance(values, (str, bytes, bytearray, int, float)):
        raise InvalidArgumentError(
            f"{name} must be a 1-D sequence of ints, got {type(values).__name__} {values!r:.40}"
        )
    if isinstance(values, (list, tuple)):
        kinds = set(map(type, values))
        bad = next((k for k in kinds if not _is_int_type(k)), None)
        if bad is not None:
            value = next(v for v in values if type(v) is bad)
            raise InvalidArgumentError(f"{name} must hold ints, got {bad.__name__} {value!r:.40}")
        try:
            arr = np.asarray(values)
        except OverflowError as exc:
            raise InvalidArgumentError(f"{name}: an id is out of range: {exc}") from None
        if len(values) and arr.dtype.kind not in "iu":  # mixed ints beyond int64/uint64
            raise InvalidArgumentError(
                f"{name}: ids out of range [0, {num_blocks}): {min(values)}..{max(values)}"
            )
    else:
        if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch tensor
            values = values.detach().cpu().numpy()
        if not isinstance(values, np.ndarray):
            raise InvalidArgumentError(
                f"{name} must be a list, tuple, numpy array or torch tensor of ints, "
                f"got {type(values).__name__}"
            )
        arr = values
        if arr.ndim != 1:
            raise InvalidArgumentError(f"{name} must be 1-D, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise InvalidArgumentError(f"{name} must have an integer dtype, got {arr.dtype}")
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = arr.min(), arr.max()  # compared as Python ints: no wrap-around
    if int(low) < 0 or int(high) >= num_blocks:
        bad_id = int(low) if int(low) < 0 else int(high)
        raise InvalidArgumentError(
            f"{name}: block id {bad_id} is out of range; the engine has {num_blocks} blocks "
            f"(ids 0..{num_blocks - 1})"
        )
    ids = np.ascontiguousarray(arr, dtype=np.int64)
    if unique and len(np.unique(ids)) != len(ids):
        seen, dup = set(), None
        for b in ids.tolist():
            if b in seen:
                dup = b
                break
            seen.add(b)
        raise InvalidArgumentError(f"{name}: block id {dup} appears more than once")
    return ids


def _is_int_type(kind: type) -> bool:
    if kind is int:
        return True
    return issubclass(kind, np.integer) or (issubclass(kind, int) and not issubclass(kind, bool))
