from __future__ import annotations

import itertools

import pytest
import torch
from kv_layouts import LAYOUTS

from kvortex.errors import InvalidTypeError, LayoutError
from kvortex.layout import PagedLayout

L, B, N, H, D = 3, 10, 16, 2, 8
EXPECTED = {
    # layout: (kind prefix, planes, page bytes) for fp16
    "fa_nhd": ("vllm-0.15 flash-attn (NHD)", 2 * L, N * H * D * 2),
    "fa_hnd": ("vllm-0.15 flash-attn (HND)", 2 * L, N * H * D * 2),
    "flashinfer": ("vllm-0.15 flashinfer (NHD)", L, 2 * N * H * D * 2),
    "lbnhc": ("vllm-0.33 per-layer (LBNHC)", L, N * H * 2 * D * 2),
    "lbhnc": ("vllm-0.33 per-layer (LBHNC)", L, N * H * 2 * D * 2),
    "blnhc": ("block-outermost (BLNHC)", 1, L * N * H * 2 * D * 2),
    "blhnc": ("block-outermost (BLHNC)", 1, L * N * H * 2 * D * 2),
    "mla_015": ("vllm-0.15 mla", L, N * (H * D + 8) * 2),
    "mla_033": ("vllm-0.33 single-head (MLA)", L, N * (H * D + 8) * 2),
}


def build(name: str, dtype: torch.dtype = torch.float16) -> PagedLayout:
    return PagedLayout.from_kv_caches(LAYOUTS[name](L, B, N, H, D, dtype, "cpu"), N)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_recognised(name: str) -> None:
    layout = build(name)
    kind, planes, page = EXPECTED[name]
    assert layout.kind == kind
    assert layout.num_planes == planes
    assert layout.page_bytes == page
    assert layout.num_blocks == B
    assert layout.block_size == N
    assert layout.chunk_bytes(4) == planes * 4 * page
    assert len(layout.fingerprint) == 16


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_planes_address_pages(name: str) -> None:
    """Each plane's page for block b is exactly the bytes of that block in the tensor."""
    kv = LAYOUTS[name](L, B, N, H, D, torch.float16, "cpu")
    layout = PagedLayout.from_kv_caches(kv, N)
    owned = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kv.values()}
    for plane in layout.planes:
        for b in (0, B - 1):
            start = plane.base + b * plane.block_stride
            assert any(p <= start and start + layout.page_bytes <= p + n for p, n in owned.items())
    # Pages of different planes and blocks never overlap.
    starts = sorted(p.base + b * p.block_stride for p in layout.planes for b in range(B))
    assert all(b - a >= layout.page_bytes for a, b in itertools.pairwise(starts))


def test_fingerprint_tracks_byte_format() -> None:
    prints = {name: build(name).fingerprint for name in LAYOUTS}
    # Equal byte formats share a fingerprint: MLA in 0.15 and 0.33 store identical pages.
    assert prints["mla_015"] == prints["mla_033"]
    others = {k: v for k, v in prints.items() if k != "mla_033"}
    assert len(set(others.values())) == len(others)
    # Stable for the same shapes, different for another dtype or block size.
    assert build("lbnhc").fingerprint == prints["lbnhc"]
    assert build("lbnhc", torch.bfloat16).fingerprint != prints["lbnhc"]
    kv = LAYOUTS["lbnhc"](L, B, 8, H, D, torch.float16, "cpu")
    assert PagedLayout.from_kv_caches(kv, 8).fingerprint != prints["lbnhc"]
    # Each call is its own engine instance.
    assert build("lbnhc").layout_id != build("lbnhc").layout_id


def test_two_blocks_is_ambiguous_without_num_blocks() -> None:
    kv = {"a": torch.empty(2, 2, N, H, D, dtype=torch.float16)}
    with pytest.raises(LayoutError, match="num_blocks"):
        PagedLayout.from_kv_caches(kv, N)
    assert PagedLayout.from_kv_caches(kv, N, num_blocks=2).num_planes == 2


@pytest.mark.parametrize(
    ("kv", "match"),
    [
        ({"a": torch.empty(4, 4)}, "unsupported KV tensor shape"),
        ({"a": torch.empty(B, N, 4), "b": torch.empty(B + 1, N, 4)}, "one shape"),
        (
            {"a": torch.empty(B, N, 4), "b": torch.empty(B, N, 4, dtype=torch.float16)},
            "dtype",
        ),
        ({"a": torch.empty(B, N, 8)[:, :, ::2]}, "not contiguous"),
        ({"a": torch.empty(N, B, 4).transpose(0, 1)}, "lie outside the block|blocks overlap"),
    ],
)
def test_unsupported_layouts_raise(kv: dict[str, torch.Tensor], match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        PagedLayout.from_kv_caches(kv, N)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidTypeError):
        PagedLayout.from_kv_caches({}, N)
    with pytest.raises(InvalidTypeError):
        PagedLayout.from_kv_caches({"a": [1, 2]}, N)  # type: ignore[dict-item]
    with pytest.raises(LayoutError, match="block_size"):
        PagedLayout.from_kv_caches({"a": torch.empty(B, N, 4)}, 0)
    assert isinstance(LayoutError("x"), ValueError)
