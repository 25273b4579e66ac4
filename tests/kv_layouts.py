"""KV tensors shaped and strided the way each supported vLLM version allocates them.

Shared by the layout, transfer and engine tests (and usable on CUDA by passing ``device``).
Each builder returns ``(kv_caches, block_size)`` with ``kv_caches`` a dict layer -> tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KV = dict[str, torch.Tensor]


def fa_nhd(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, device: str) -> KV:
    """vLLM 0.15 FlashAttention, NHD: per layer ``[2, B, N, H, D]``."""
    return {f"layer.{i}": torch.empty(2, B, N, H, D, dtype=dtype, device=device) for i in range(L)}


def fa_hnd(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, device: str) -> KV:
    """vLLM 0.15 FlashAttention, HND: logical ``[2, B, N, H, D]``, physical ``[2, B, H, N, D]``."""
    return {
        f"layer.{i}": torch.empty(2, B, H, N, D, dtype=dtype, device=device).transpose(2, 3)
        for i in range(L)
    }


def flashinfer(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, device: str) -> KV:
    """vLLM 0.15 FlashInfer, NHD: per layer ``[B, 2, N, H, D]``."""
    return {f"layer.{i}": torch.empty(B, 2, N, H, D, dtype=dtype, device=device) for i in range(L)}


def _shared(
    order: str, L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, device: str
) -> KV:
    """vLLM 0.33: ``[B, H, N, 2D]`` views of one buffer in physical ``order`` (e.g. "LBNHC")."""
    sizes = {"L": L, "B": B, "N": N, "H": H, "C": 2 * D}
    buf = torch.empty([sizes[a] for a in order], dtype=dtype, device=device)
    logical = buf.permute([order.index(a) for a in "LBHNC"])  # [L, B, H, N, C]
    return {f"layer.{i}": logical[i] for i in range(L)}


def lbnhc(*args: object) -> KV:
    return _shared("LBNHC", *args)  # type: ignore[arg-type]


def lbhnc(*args: object) -> KV:
    return _shared("LBHNC", *args)  # type: ignore[arg-type]


def blnhc(*args: object) -> KV:
    return _shared("BLNHC", *args)  # type: ignore[arg-type]


def blhnc(*args: object) -> KV:
    return _shared("BLHNC", *args)  # type: ignore[arg-type]


def mla_015(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, device: str) -> KV:
    """vLLM 0.15 MLA: per layer ``[B, N, C]`` (C = latent width; here H * D + 8)."""
    return {
        f"layer.{i}": torch.empty(B, N, H * D + 8, dtype=dtype, device=device) for i in range(L)
    }


def mla_033(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, device: str) -> KV:
    """vLLM 0.33 MLA: ``[B, 1, N, C]`` views of one buffer (LBNHC with one head)."""
    buf = torch.empty(L, B, N, 1, H * D + 8, dtype=dtype, device=device)
    return {f"layer.{i}": buf[i].permute(0, 2, 1, 3) for i in range(L)}


LAYOUTS: dict[str, Callable[..., KV]] = {
    "fa_nhd": fa_nhd,
    "fa_hnd": fa_hnd,
    "flashinfer": flashinfer,
    "lbnhc": lbnhc,
    "lbhnc": lbhnc,
    "blnhc": blnhc,
    "blhnc": blhnc,
    "mla_015": mla_015,
    "mla_033": mla_033,
}


def fill_random(kv: KV, seed: int) -> None:
    """Random bytes in every tensor (never zeros: they hide unwritten pages)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seen: set[int] = set()
    for t in kv.values():
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
        raw.copy_(torch.randint(0, 256, (raw.numel(),), dtype=torch.uint8, generator=gen))
