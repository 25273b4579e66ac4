"""kvortex.hashing.hash_chunks over both implementations (the ``hash_backend`` fixture).

The keys are pinned to the specification (docs/keys.md) three ways: the committed golden
vectors (written by an independent reference, tests/golden/make_hash_vectors.py), the worked
example of docs/keys.md, and a stdlib reference inside this file used by the property tests.
"""

from __future__ import annotations

import array
import ast
import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REQUIRE_NATIVE, run_isolated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvortex import backend as kv_backend
from kvortex.errors import InvalidArgumentError, InvalidTypeError
from kvortex.hashing import KEY_BYTES, hash_chunks

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "hash_vectors.json").read_text())["cases"]
MAX_ID = 2**32 - 1
# Hypothesis draws arguments per example; the backend fixture is a constant string, safe to share.
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)

ids = st.integers(min_value=0, max_value=MAX_ID)


def reference(tokens: list[int], chunk_tokens: int, namespace: bytes = b"") -> list[bytes]:
    """docs/keys.md, verbatim: the oracle for the property tests."""
    h = hashlib.sha256(
        b"KVortex/chunk-hash/v1\x00" + struct.pack("<I", len(namespace)) + namespace
    ).digest()
    out = []
    for start in range(0, len(tokens) - chunk_tokens + 1, chunk_tokens):
        chunk = tokens[start : start + chunk_tokens]
        h = hashlib.sha256(h + struct.pack(f"<{chunk_tokens}I", *chunk)).digest()
        out.append(h)
    return out


def require_native() -> None:
    reason = kv_backend.native_reason("hashing")
    if reason and not REQUIRE_NATIVE:
        pytest.skip(f"native hashing: {reason}")


# --- the format ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_golden_vectors(hash_backend: str, case: dict[str, Any]) -> None:
    ns = bytes.fromhex(case["namespace_hex"])
    expected = [bytes.fromhex(k) for k in case["keys"]]
    assert len(expected) == len(case["tokens"]) // case["chunk_tokens"]
    for tokens in (case["tokens"], np.array(case["tokens"], dtype=np.uint32)):
        keys = hash_chunks(tokens, case["chunk_tokens"], namespace=ns, backend=hash_backend)
        assert keys == expected


def test_golden_file_covers_the_edge_sizes() -> None:
    shapes = {(len(c["tokens"]), c["chunk_tokens"]) for c in GOLDEN}
    assert {(0, 256), (1, 256), (255, 256), (256, 256), (257, 256), (768, 256)} <= shapes
    assert {c["chunk_tokens"] for c in GOLDEN} == {1, 16, 256}
    assert any(c["namespace_hex"] for c in GOLDEN)
    assert any(MAX_ID in c["tokens"] for c in GOLDEN)


def _worked_example() -> dict[str, Any]:
    text = (ROOT / "docs" / "keys.md").read_text()
    block = text.split("## Worked example", 1)[1].split("```", 2)[1]
    fields = {
        m[1]: ast.literal_eval(m[2])
        for m in re.finditer(r"^(tokens|chunk_tokens|namespace)\s*=\s*(.+)$", block, re.M)
    }
    fields["seed"] = bytes.fromhex(re.search(r"^seed = ([0-9a-f]{64})$", block, re.M)[1])  # type: ignore[index]
    keys = re.findall(r"^key\[(\d+)\] = ([0-9a-f]{64})$", block, re.M)
    assert [int(i) for i, _ in keys] == list(range(len(keys)))
    fields["keys"] = [bytes.fromhex(k) for _, k in keys]
    return fields


def test_docs_worked_example(hash_backend: str) -> None:
    ex = _worked_example()
    ns = ex["namespace"]
    seed = hashlib.sha256(b"KVortex/chunk-hash/v1\x00" + struct.pack("<I", len(ns)) + ns)
    assert seed.digest() == ex["seed"]
    assert len(ex["keys"]) == 2 and len(ex["tokens"]) == 9
    assert reference(ex["tokens"], ex["chunk_tokens"], ns) == ex["keys"]
    keys = hash_chunks(ex["tokens"], ex["chunk_tokens"], namespace=ns, backend=hash_backend)
    assert keys == ex["keys"]


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 47, 48, 49])
def test_one_key_per_full_chunk(hash_backend: str, n: int) -> None:
    tokens = list(range(1000, 1000 + n))
    keys = hash_chunks(tokens, 16, backend=hash_backend)
    assert len(keys) == n // 16
    assert all(type(k) is bytes and len(k) == KEY_BYTES for k in keys)
    assert keys == reference(tokens, 16)


def test_default_chunk_is_256_tokens(hash_backend: str) -> None:
    tokens = [7] * 600
    assert hash_chunks(tokens, backend=hash_backend) == reference(tokens, 256)


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(ids, max_size=300),
    chunk_tokens=st.integers(min_value=1, max_value=40),
    namespace=st.binary(max_size=40),
)
def test_native_matches_python(tokens: list[int], chunk_tokens: int, namespace: bytes) -> None:
    require_native()
    native = hash_chunks(tokens, chunk_tokens, namespace=namespace, backend="native")
    python = hash_chunks(tokens, chunk_tokens, namespace=namespace, backend="python")
    assert native == python == reference(tokens, chunk_tokens, namespace)


@settings(max_examples=100, deadline=None)
@given(
    tokens=st.lists(st.integers(min_value=0, max_value=2**15 - 1), max_size=200),
    chunk_tokens=st.integers(min_value=1, max_value=20),
    dtype=st.sampled_from(["<i2", ">i2", "<u2", ">i4", "<i8", ">u8", "<u4"]),
    step=st.integers(min_value=-3, max_value=3).filter(bool),
)
def test_native_matches_python_on_strided_arrays(
    tokens: list[int], chunk_tokens: int, dtype: str, step: int
) -> None:
    require_native()
    # Interleave junk so that the view with this step sees exactly `tokens`.
    backing = np.full(len(tokens) * abs(step), 2**14, dtype=dtype)
    view = backing[:: abs(step)] if step > 0 else backing[::-1][:: abs(step)]
    view[:] = tokens
    native = hash_chunks(view, chunk_tokens, backend="native")
    assert native == hash_chunks(view, chunk_tokens, backend="python")
    assert native == reference(tokens, chunk_tokens)


# --- containers and dtypes ------------------------------------------------------------------


SMALL = [0, 1, 127, 5, 99, 3, 64, 2, 100, 17, 8, 126, 42, 33, 1, 0, 77]  # fits int8
WIDE = [0, 70000, 2**31 + 5, MAX_ID, 1, 65535, 2**31 - 1, 12, 2**32 - 2]  # needs 32 bits


def _small_containers() -> list[tuple[str, Any]]:
    cases: list[tuple[str, Any]] = [("list", SMALL), ("tuple", tuple(SMALL))]
    cases += [(f"array {tc}", array.array(tc, SMALL)) for tc in "bBhHiIlLqQ"]
    for name in ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]:
        dt = np.dtype(name)
        cases.append((f"numpy {name}", np.array(SMALL, dtype=dt)))
        cases.append((f"numpy {name} swapped", np.array(SMALL, dtype=dt.newbyteorder())))
    strided = np.zeros((len(SMALL), 3), dtype=np.int32)
    strided[:, 1] = SMALL
    cases.append(("numpy column of 2-D", strided[:, 1]))
    cases.append(("numpy reversed twice", np.array(SMALL[::-1], dtype=">i8")[::-1]))
    every_other = np.zeros(2 * len(SMALL), dtype=np.uint32)
    every_other[::2] = SMALL
    cases.append(("numpy step 2", every_other[::2]))
    cases.append(("memoryview", memoryview(array.array("H", SMALL))))
    cases.append(
        (
            "numpy unaligned",
            np.frombuffer(b"\0" + np.array(SMALL, "<u4").tobytes(), "<u4", offset=1),
        )
    )
    return cases


CONTAINERS = _small_containers()


@pytest.mark.parametrize("tokens", [t for _, t in CONTAINERS], ids=[n for n, _ in CONTAINERS])
def test_container_and_dtype_do_not_change_keys(hash_backend: str, tokens: Any) -> None:
    expected = reference(SMALL, 4, b"ns")
    assert len(expected) == 4
    assert hash_chunks(tokens, 4, namespace=b"ns", backend=hash_backend) == expected


@pytest.mark.parametrize(
    "tokens",
    [
        WIDE,
        array.array("I", WIDE),
        array.array("q", WIDE),
        np.array(WIDE, dtype=np.uint32),
        np.array(WIDE, dtype=">u4"),
        np.array(WIDE, dtype=np.int64),
        np.array(WIDE, dtype=">u8"),
    ],
    ids=["list", "array I", "array q", "uint32", ">u4", "int64", ">u8"],
)
def test_wide_ids_agree_across_dtypes(hash_backend: str, tokens: Any) -> None:
    assert hash_chunks(tokens, 3, backend=hash_backend) == reference(WIDE, 3)


def test_zero_stride_broadcast_view(hash_backend: str) -> None:
    view = np.broadcast_to(np.int64(7), (40,))
    assert view.strides == (0,)
    assert hash_chunks(view, 8, backend=hash_backend) == reference([7] * 40, 8)


def test_int_subclasses_are_ints(hash_backend: str) -> None:
    import enum

    class Tok(enum.IntEnum):
        A = 5
        B = 2**32 - 1

    assert hash_chunks([Tok.A, Tok.B], 1, backend=hash_backend) == reference([5, MAX_ID], 1)


TORCH_DTYPES = ["int8", "uint8", "int16", "int32", "int64", "uint16", "uint32", "uint64"]


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_tensors(hash_backend: str, dtype: str) -> None:
    import torch

    tensor = torch.tensor(SMALL, dtype=torch.int64).to(getattr(torch, dtype))
    expected = reference(SMALL, 4)
    assert hash_chunks(tensor, 4, backend=hash_backend) == expected
    doubled = torch.zeros(2 * len(SMALL), dtype=getattr(torch, dtype))
    doubled[1::2] = tensor
    assert not doubled[1::2].is_contiguous()
    assert hash_chunks(doubled[1::2], 4, backend=hash_backend) == expected


def test_torch_wide_ids(hash_backend: str) -> None:
    import torch

    tensor = torch.tensor(WIDE, dtype=torch.int64)
    assert hash_chunks(tensor, 3, backend=hash_backend) == reference(WIDE, 3)


# --- properties -----------------------------------------------------------------------------


@settings(FIXTURE_OK, max_examples=80)
@given(
    tokens=st.lists(ids, max_size=200),
    cut=st.integers(min_value=0, max_value=200),
    chunk_tokens=st.integers(min_value=1, max_value=24),
)
def test_keys_of_a_prefix_are_a_prefix(
    hash_backend: str, tokens: list[int], cut: int, chunk_tokens: int
) -> None:
    full = hash_chunks(tokens, chunk_tokens, backend=hash_backend)
    prefix = hash_chunks(tokens[:cut], chunk_tokens, backend=hash_backend)
    assert prefix == full[: len(prefix)]
    assert len(prefix) == min(cut, len(tokens)) // chunk_tokens


@settings(FIXTURE_OK, max_examples=60)
@given(tokens=st.lists(ids, min_size=8, max_size=64), i=st.integers(min_value=0, max_value=7))
def test_changing_one_id_changes_its_key_and_all_later(
    hash_backend: str, tokens: list[int], i: int
) -> None:
    changed = list(tokens)
    changed[i] = (changed[i] + 1) % 2**32
    a = hash_chunks(tokens, 4, backend=hash_backend)
    b = hash_chunks(changed, 4, backend=hash_backend)
    first = i // 4
    assert a[:first] == b[:first]
    assert all(x != y for x, y in zip(a[first:], b[first:], strict=True))


def test_namespaces_separate_keys(hash_backend: str) -> None:
    tokens = list(range(64))
    by_ns = {
        ns: hash_chunks(tokens, 16, namespace=ns, backend=hash_backend)
        for ns in [b"", b"\x00", b"a", b"b", b"model-a|bf16", b"model-a|fp8", b"\x00" * 4]
    }
    all_keys = [k for keys in by_ns.values() for k in keys]
    assert len(set(all_keys)) == len(all_keys) == 7 * 4


def test_namespace_bytes_like_forms_agree(hash_backend: str) -> None:
    tokens = list(range(32))
    expected = reference(tokens, 8, b"tenant-7")
    for ns in (b"tenant-7", bytearray(b"tenant-7"), memoryview(b"xtenant-7")[1:]):
        assert hash_chunks(tokens, 8, namespace=ns, backend=hash_backend) == expected


def test_same_keys_in_processes_with_other_hash_seeds(
    hash_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = [(i * 7919) % 150_000 for i in range(1000)]
    here = [k.hex() for k in hash_chunks(tokens, 64, namespace=b"m", backend=hash_backend)]
    code = f"""
        from kvortex.hashing import hash_chunks
        tokens = [(i * 7919) % 150_000 for i in range(1000)]
        keys = hash_chunks(tokens, 64, namespace=b"m", backend={hash_backend!r})
        print(",".join(k.hex() for k in keys))
    """
    for seed in ("0", "1", "4242"):
        monkeypatch.setenv("PYTHONHASHSEED", seed)
        assert run_isolated(code).strip().split(",") == here


def test_process_default_backend(hash_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_BACKEND", hash_backend)
    assert hash_chunks([1, 2, 3, 4], 2) == reference([1, 2, 3, 4], 2)


# --- large inputs and threads ---------------------------------------------------------------


def test_large_prompt_crosses_the_gil_release_threshold(hash_backend: str) -> None:
    from kvortex import _loader

    n = 300_007
    if hash_backend == "native":
        assert n > _loader.native().module.HASH_GIL_RELEASE_TOKENS  # type: ignore[union-attr]
    arr = (np.arange(n, dtype=np.int64) * 2654435761) % 2**32
    expected = hash_chunks(arr.astype(np.uint32), 256, backend="python")
    assert len(expected) == n // 256
    assert hash_chunks(arr, 256, backend=hash_backend) == expected
    assert hash_chunks(arr.tolist(), 256, backend=hash_backend) == expected
    assert hash_chunks(arr.astype(">u4")[::-1][::-1], 256, backend=hash_backend) == expected
    # An error found with the GIL released still surfaces as the right exception.
    arr[-1] = -7
    with pytest.raises(InvalidArgumentError, match=rf"-7 at index {n - 1}\b"):
        hash_chunks(arr, 256, backend=hash_backend)


def test_concurrent_threads_get_the_same_keys(hash_backend: str) -> None:
    out = run_isolated(
        f"""
        import threading
        import numpy as np
        from kvortex.hashing import hash_chunks

        n = 300_000
        arr = ((np.arange(n, dtype=np.int64) * 2654435761) % 2**32).astype(np.uint32)
        lst = arr.tolist()
        expected = hash_chunks(arr, 256, backend={hash_backend!r})
        results, errors = [], []

        def work(tokens):
            try:
                for _ in range(3):
                    results.append(hash_chunks(tokens, 256, backend={hash_backend!r}))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in (arr, lst, arr[::-1][::-1])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(results) == 9 and all(r == expected for r in results)
        print("ok", len(expected))
        """,
        timeout=120,
    )
    assert out.split() == ["ok", str(300_000 // 256)]


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "value", "index"),
    [
        ([-1], "-1", 0),
        ([2**32], "4294967296", 0),
        ([0, 5, 2**32 + 5, -1], "4294967301", 2),
        ([1, 2, 3, 2**70], str(2**70), 3),
        ([1, 2, 3, 4, 5, -9], "-9", 5),  # in the trailing partial chunk
        ((0, -(2**70)), str(-(2**70)), 1),
        (np.array([1, 2, -3], dtype=np.int64), "-3", 2),
        (np.array([1, 2, -3], dtype=">i2"), "-3", 2),
        (np.array([7, 2**32], dtype=np.uint64), "4294967296", 1),
        (np.array([7, 2**63 + 1], dtype=">u8"), str(2**63 + 1), 1),
        (np.array([0, 0, 0, 0, 0, -128], dtype=np.int8), "-128", 5),
        (np.array([-1, 9, 3, 9, 5], dtype=np.int32)[::-2], "-1", 2),
        (array.array("q", [3, -(2**63)]), str(-(2**63)), 1),
        (array.array("b", [3, -1]), "-1", 1),
    ],
)
def test_out_of_range_ids(hash_backend: str, tokens: Any, value: str, index: int) -> None:
    with pytest.raises(
        InvalidArgumentError, match=rf"(?<![\d-]){re.escape(value)} at index {index}\b"
    ):
        hash_chunks(tokens, 4, backend=hash_backend)


def test_out_of_range_torch(hash_backend: str) -> None:
    import torch

    with pytest.raises(InvalidArgumentError, match=r"-4 at index 2\b"):
        hash_chunks(torch.tensor([1, 2, -4]), 4, backend=hash_backend)


@pytest.mark.parametrize(
    ("tokens", "error", "index"),
    [
        ([1, -1, 1.5], InvalidArgumentError, 1),
        ([1, 1.5, -1], InvalidTypeError, 1),
        ([1, 2, 3, True], InvalidTypeError, 3),
        ([None], InvalidTypeError, 0),
        ([0, "1"], InvalidTypeError, 1),
        ([0, 1.0], InvalidTypeError, 1),
        ([0, 1, np.int64(3)], InvalidTypeError, 2),
        ((0, 1, 2, 3, 4, 5, b"x"), InvalidTypeError, 6),
    ],
)
def test_first_bad_element_is_reported(
    hash_backend: str, tokens: Any, error: type[Exception], index: int
) -> None:
    with pytest.raises(error, match=rf"index {index}\b"):
        hash_chunks(tokens, 4, backend=hash_backend)


@pytest.mark.parametrize(
    ("tokens", "named"),
    [
        (np.array([1, 0], dtype=bool), "bool"),
        (np.array([1.0, 2.0], dtype=np.float32), "float32"),
        (np.array([1.0], dtype=np.float16), "float16"),
        (np.array([1j]), "complex128"),
        (np.array([1, 2], dtype=object), "object"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "datetime64"),
        (array.array("d", [1.0]), "typecode 'd'"),
        (memoryview(array.array("f", [1.0])), "format 'f'"),
        (np.zeros((2, 3), dtype=np.int32), r"\(2, 3\)"),
        (np.zeros((0, 4), dtype=np.uint32), r"\(0, 4\)"),
        (np.array(5, dtype=np.int64), r"shape \(\)"),
        (np.zeros((2, 3), dtype=np.float64), r"\(2, 3\)"),
        (np.zeros((2, 2), dtype=np.int32).data, r"\(2, 2\)"),
        (np.zeros(3, dtype=[("a", "<i4")]), "dtype"),
        (b"\x01\x02", "bytes"),
        (bytearray(b"\x01"), "bytearray"),
        ("hello", "str"),
        (range(10), "range"),
        (iter([1, 2]), "iterator"),
        ({1: 2}, "dict"),
        (5, "int"),
        (None, "NoneType"),
        (np.int64(5), "int64"),
    ],
)
def test_bad_token_containers(hash_backend: str, tokens: Any, named: str) -> None:
    with pytest.raises(InvalidTypeError, match=named):
        hash_chunks(tokens, 4, backend=hash_backend)


@pytest.mark.parametrize(
    ("make", "error", "named"),
    [
        (lambda t: t.tensor([True, False]), InvalidTypeError, "torch.bool"),
        (lambda t: t.tensor([1.0, 2.0]), InvalidTypeError, "torch.float32"),
        (lambda t: t.tensor([1.0], dtype=t.bfloat16), InvalidTypeError, "torch.bfloat16"),
        (lambda t: t.tensor([1j]), InvalidTypeError, "complex"),
        (lambda t: t.zeros(2, 3, dtype=t.int64), InvalidTypeError, r"\(2, 3\)"),
        (lambda t: t.tensor(5), InvalidTypeError, r"shape \(\)"),
        (lambda t: t.zeros(4, dtype=t.int64, device="meta"), InvalidArgumentError, "meta"),
        (lambda t: t.zeros(4, dtype=t.int64).to_sparse(), InvalidTypeError, "sparse"),
    ],
)
def test_bad_torch_tensors(
    hash_backend: str, make: Any, error: type[Exception], named: str
) -> None:
    import torch

    with pytest.raises(error, match=named):
        hash_chunks(make(torch), 4, backend=hash_backend)


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"chunk_tokens": 0}, InvalidArgumentError, "chunk_tokens is 0"),
        ({"chunk_tokens": -16}, InvalidArgumentError, "-16"),
        ({"chunk_tokens": 2**64}, InvalidArgumentError, str(2**64)),
        ({"chunk_tokens": 16.0}, InvalidTypeError, "float"),
        ({"chunk_tokens": "256"}, InvalidTypeError, "str"),
        ({"chunk_tokens": True}, InvalidTypeError, "bool"),
        ({"chunk_tokens": None}, InvalidTypeError, "NoneType"),
        ({"namespace": "model"}, InvalidTypeError, "str"),
        ({"namespace": 5}, InvalidTypeError, "int"),
        ({"namespace": None}, InvalidTypeError, "NoneType"),
        ({"algo": "md5"}, InvalidArgumentError, "'md5'.*sha256"),
        ({"algo": "SHA256"}, InvalidArgumentError, "'SHA256'.*sha256"),
        ({"algo": None}, InvalidArgumentError, "None.*sha256"),
        ({"backend": "fast"}, InvalidArgumentError, "fast"),
    ],
)
def test_bad_arguments(
    hash_backend: str, kwargs: dict[str, Any], error: type[Exception], named: str
) -> None:
    args: dict[str, Any] = {"chunk_tokens": 4, "backend": hash_backend, **kwargs}
    with pytest.raises(error, match=named):
        hash_chunks([1, 2, 3, 4], **args)


def test_errors_are_also_builtin_errors(hash_backend: str) -> None:
    with pytest.raises(ValueError):
        hash_chunks([-1], 1, backend=hash_backend)
    not_ints: Any = [1.5]
    with pytest.raises(TypeError):
        hash_chunks(not_ints, 1, backend=hash_backend)


def test_short_input_still_validated(hash_backend: str) -> None:
    # Fewer ids than one chunk: no keys, but a bad id is still an error.
    assert hash_chunks([1, 2], 256, backend=hash_backend) == []
    with pytest.raises(InvalidArgumentError):
        hash_chunks([1, -2], 256, backend=hash_backend)
    with pytest.raises(InvalidTypeError):
        hash_chunks(np.array([1.0]), 256, backend=hash_backend)


def test_backend_env_is_read_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_BACKEND", "nonsense")
    with pytest.raises(InvalidArgumentError, match="nonsense"):
        hash_chunks([1], 1)
    monkeypatch.setenv("KVORTEX_BACKEND", "python")
    assert hash_chunks([1], 1) == reference([1], 1)
    assert os.environ["KVORTEX_BACKEND"] == "python"
