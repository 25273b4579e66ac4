"""SPSCQueue: one contract, tested over the native ring and the Python fallback."""

from __future__ import annotations

import copy
import gc
import pickle
import sys
import time
import weakref
from collections import deque

import pytest
from conftest import run_isolated
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvortex import backend as backends
from kvortex.errors import (
    BackendUnavailable,
    InvalidArgumentError,
    InvalidTypeError,
    QueueClosed,
    QueueTimeout,
)
from kvortex.queue import MAX_CAPACITY, PythonSPSCQueue, SPSCQueue

NATIVE_OK = backends.native_reason("queue") == ""


class Payload:
    """A plain object: weak-referenceable, compared by identity."""

    def __init__(self, tag: int) -> None:
        self.tag = tag


# ---- construction and backend choice ----------------------------------------------------------


def test_backend_choice(queue_backend: str) -> None:
    q = SPSCQueue(5, backend=queue_backend)
    assert isinstance(q, SPSCQueue)
    if queue_backend == "python":
        assert type(q) is PythonSPSCQueue
    else:
        assert type(q).__module__ == "kvortex._native"
    assert q.capacity == 5
    assert not q.closed
    assert len(q) == 0


def test_capacity_keyword_and_default_backend(queue_backend: str) -> None:
    q = SPSCQueue(capacity=3, backend=queue_backend)
    assert q.capacity == 3
    assert isinstance(SPSCQueue(2), SPSCQueue)  # process default backend
    assert isinstance(SPSCQueue(2, backend="auto"), SPSCQueue)


def test_subscripted_construction(queue_backend: str) -> None:
    q = SPSCQueue[int](2, backend=queue_backend)
    q.put(7)
    assert isinstance(q, SPSCQueue)
    assert q.get() == 7


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="turbo"):
        SPSCQueue(4, backend="turbo")


def test_native_backend_unavailable_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvortex import backend

    monkeypatch.setattr(backend, "native_reason", lambda hot_path: "simulated: not built")
    with pytest.raises(BackendUnavailable, match="simulated"):
        SPSCQueue(4, backend="native")
    assert isinstance(SPSCQueue(4, backend="auto"), PythonSPSCQueue)


@pytest.mark.skipif(not NATIVE_OK, reason="needs the native core")
def test_native_limit_matches_python() -> None:
    from kvortex import _native

    assert _native.SPSC_MAX_CAPACITY == MAX_CAPACITY


# ---- FIFO, capacity, len -----------------------------------------------------------------------


def test_fifo_order_interleaved(queue_backend: str) -> None:
    q = SPSCQueue(7, backend=queue_backend)
    for i in range(3):
        q.put(i)
    out = []
    for start in range(3, 1003, 4):  # 3 stay queued: each round peaks at exactly 7
        for i in range(start, start + 4):
            q.put(i)
        assert len(q) == 7
        out.append(q.get())
        out.append(q.get(timeout=0))
        ok, item = q.try_get()
        assert ok
        out.append(item)
        out.append(q.get(timeout=1.0))
    while len(q):
        out.append(q.get(timeout=0))
    assert out == list(range(1003))


@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 1024])
def test_capacity_is_exact(queue_backend: str, capacity: int) -> None:
    q = SPSCQueue(capacity, backend=queue_backend)
    for i in range(capacity):
        assert q.try_put(i)
        assert len(q) == i + 1
    assert not q.try_put("one too many")
    assert len(q) == capacity
    with pytest.raises(QueueTimeout):
        q.put("one too many", timeout=0)
    # Wrap the indices around a few times: the limit stays exact wherever head and tail are.
    expected = deque(range(capacity))
    for serial in range(3 * capacity + 5):
        assert q.get() == expected.popleft()
        assert q.try_put(("refill", serial))
        expected.append(("refill", serial))
        assert not q.try_put("still full")
        assert len(q) == capacity
    assert [q.get() for _ in range(capacity)] == list(expected)
    assert q.capacity == capacity


def test_large_capacity_accepted(queue_backend: str) -> None:
    q = SPSCQueue(1 << 20, backend=queue_backend)
    for i in range(10_000):
        q.put(i)
    assert len(q) == 10_000
    assert [q.get() for _ in range(10_000)] == list(range(10_000))


def test_cannot_be_pickled_or_copied(queue_backend: str) -> None:
    q = SPSCQueue(2, backend=queue_backend)
    q.put(1)
    with pytest.raises(TypeError, match="pickled or copied"):
        pickle.dumps(q)
    with pytest.raises(TypeError, match="pickled or copied"):
        copy.copy(q)
    assert q.get() == 1


def test_len_tracks_contents(queue_backend: str) -> None:
    q = SPSCQueue(4, backend=queue_backend)
    assert len(q) == 0
    q.put("a")
    q.put("b")
    assert len(q) == 2
    q.get()
    assert len(q) == 1
    q.try_get()
    assert len(q) == 0
    assert q.try_get() == (False, None)


# ---- timeouts ---------------------------------------------------------------------------------


def test_zero_timeout_does_not_wait(queue_backend: str) -> None:
    q = SPSCQueue(1, backend=queue_backend)
    t0 = time.monotonic()
    with pytest.raises(QueueTimeout, match="empty"):
        q.get(timeout=0)
    with pytest.raises(QueueTimeout):
        q.get(timeout=0.0)
    q.put(1)
    with pytest.raises(QueueTimeout, match="full"):
        q.put(2, timeout=0)
    assert time.monotonic() - t0 < 0.5
    assert q.get(timeout=0) == 1


@pytest.mark.parametrize("timeout", [0.05, 0.12])
def test_timeout_takes_about_the_timeout(queue_backend: str, timeout: float) -> None:
    q = SPSCQueue(2, backend=queue_backend)
    t0 = time.monotonic()
    with pytest.raises(QueueTimeout) as err:
        q.get(timeout=timeout)
    elapsed = time.monotonic() - t0
    assert timeout - 0.005 <= elapsed < timeout + 1.0
    assert repr(timeout) in str(err.value)
    q.put(1)
    q.put(2)
    t0 = time.monotonic()
    with pytest.raises(QueueTimeout):
        q.put(3, timeout=timeout)
    elapsed = time.monotonic() - t0
    assert timeout - 0.005 <= elapsed < timeout + 1.0
    assert len(q) == 2


def test_timeout_forms_accepted(queue_backend: str) -> None:
    q = SPSCQueue(3, backend=queue_backend)
    q.put("int", timeout=1)
    q.put("inf", timeout=float("inf"))
    q.put("huge", timeout=10**400)  # beyond any clock: means "forever", like None
    assert q.get(timeout=1) == "int"
    assert q.get(timeout=2.5) == "inf"
    assert q.get(timeout=None) == "huge"
    q.put(obj="keywords", timeout=0.5)
    assert q.get(timeout=0.5) == "keywords"


def test_timeout_error_is_builtin_timeout(queue_backend: str) -> None:
    q = SPSCQueue(1, backend=queue_backend)
    with pytest.raises(TimeoutError):
        q.get(timeout=0)


# ---- close ------------------------------------------------------------------------------------


def test_close_drains_then_raises(queue_backend: str) -> None:
    q = SPSCQueue(4, backend=queue_backend)
    q.put("a")
    q.put("b")
    q.put("c")
    q.close()
    assert q.closed
    assert len(q) == 3
    assert q.get() == "a"
    assert q.try_get() == (True, "b")
    assert q.get(timeout=0) == "c"
    with pytest.raises(QueueClosed):
        q.get()
    with pytest.raises(QueueClosed):
        q.get(timeout=0)
    with pytest.raises(QueueClosed):
        q.get(timeout=0.05)
    with pytest.raises(QueueClosed):
        q.try_get()


def test_put_after_close_raises(queue_backend: str) -> None:
    q = SPSCQueue(2, backend=queue_backend)
    q.close()
    q.close()  # idempotent
    assert q.closed
    with pytest.raises(QueueClosed):
        q.put(1)
    with pytest.raises(QueueClosed):
        q.put(1, timeout=0)
    with pytest.raises(QueueClosed):
        q.try_put(1)
    assert len(q) == 0


def test_closed_wins_over_full_and_timeout(queue_backend: str) -> None:
    q = SPSCQueue(1, backend=queue_backend)
    q.put(1)
    q.close()
    with pytest.raises(QueueClosed):
        q.put(2, timeout=0)  # full AND closed: closed is the answer
    with pytest.raises(QueueClosed):
        q.try_put(2)
    assert q.get() == 1


def test_blocked_callers_are_woken_by_close(queue_backend: str) -> None:
    out = run_isolated(
        f"""
        import threading, time
        from kvortex.errors import QueueClosed
        from kvortex.queue import SPSCQueue

        def blocked(call):
            result = []
            def run():
                t0 = time.monotonic()
                try:
                    call()
                    result.append("returned")
                except QueueClosed:
                    result.append(time.monotonic() - t0)
            t = threading.Thread(target=run)
            t.start()
            return t, result

        for timeout in (None, 30.0):
            empty = SPSCQueue(2, backend={queue_backend!r})
            getter, got = blocked(lambda: empty.get(timeout=timeout))
            full = SPSCQueue(1, backend={queue_backend!r})
            full.put("x")
            putter, put = blocked(lambda: full.put("y", timeout=timeout))
            time.sleep(0.2)
            assert getter.is_alive() and putter.is_alive()
            empty.close()
            full.close()
            getter.join(10)
            putter.join(10)
            assert not getter.is_alive() and not putter.is_alive()
            assert isinstance(got[0], float) and 0.15 < got[0] < 10, got
            assert isinstance(put[0], float) and 0.15 < put[0] < 10, put
            assert full.get() == "x"  # what was queued before close is still there
        print("ok")
        """,
        timeout=60,
    )
    assert out.strip() == "ok"


def test_blocked_get_receives_item_from_other_thread(queue_backend: str) -> None:
    out = run_isolated(
        f"""
        import threading, time
        from kvortex.queue import SPSCQueue

        q = SPSCQueue(1, backend={queue_backend!r})
        sentinel = object()
        got = []
        t = threading.Thread(target=lambda: got.append(q.get()))
        t.start()
        time.sleep(0.15)
        q.put(sentinel)
        t.join(10)
        assert got and got[0] is sentinel
        # and a blocked put proceeds once the consumer makes room
        q.put(1)
        t = threading.Thread(target=lambda: q.put(2))
        t.start()
        time.sleep(0.15)
        assert t.is_alive()
        assert q.get() == 1
        t.join(10)
        assert not t.is_alive() and q.get(timeout=5) == 2
        print("ok")
        """,
        timeout=60,
    )
    assert out.strip() == "ok"


@pytest.mark.parametrize("op", ["get", "put"])
def test_ctrl_c_interrupts_a_blocked_call(queue_backend: str, op: str) -> None:
    out = run_isolated(
        f"""
        import os, signal, threading, time
        from kvortex.queue import SPSCQueue

        q = SPSCQueue(1, backend={queue_backend!r})
        if {op!r} == "put":
            q.put("fill")
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            q.get() if {op!r} == "get" else q.put("blocked")
        except KeyboardInterrupt:
            elapsed = time.monotonic() - t0
            assert 0.15 < elapsed < 5, elapsed
            print("interrupted", len(q))
        """,
        timeout=60,
    )
    assert out.split() == ["interrupted", "0" if op == "get" else "1"]


# ---- object identity and references -------------------------------------------------------


def test_objects_come_out_as_the_same_objects(queue_backend: str) -> None:
    q = SPSCQueue(8, backend=queue_backend)
    items = [Payload(i) for i in range(8)] + [None, "s", 3.5]
    for item in items[:8]:
        q.put(item)
    assert all(q.get() is item for item in items[:8])
    for item in items[8:]:
        assert q.try_put(item)
    assert [q.try_get()[1] for _ in items[8:]] == items[8:]


def test_references_are_taken_and_handed_over(queue_backend: str) -> None:
    q = SPSCQueue(4, backend=queue_backend)
    obj = Payload(1)
    base = sys.getrefcount(obj)
    q.put(obj)
    assert sys.getrefcount(obj) == base + 1  # the queue holds one reference
    out = q.get()
    assert out is obj
    del out
    assert sys.getrefcount(obj) == base
    for _ in range(1000):
        q.put(obj)
        q.try_put(obj)
        q.get()
        q.try_get()
    assert sys.getrefcount(obj) == base  # no leak over many round trips
    # A failed try_put / timed-out put must not keep a reference either.
    for _ in range(4):
        q.put(obj)
    assert sys.getrefcount(obj) == base + 4
    for _ in range(100):
        assert not q.try_put(obj)
        with pytest.raises(QueueTimeout):
            q.put(obj, timeout=0)
    assert sys.getrefcount(obj) == base + 4
    q.close()
    for _ in range(100):
        with pytest.raises(QueueClosed):
            q.put(obj)
    while len(q):
        q.get()
    assert sys.getrefcount(obj) == base


def test_dropping_the_queue_releases_its_items(queue_backend: str) -> None:
    q = SPSCQueue(5, backend=queue_backend)
    refs = []
    for i in range(3):
        item = Payload(i)
        refs.append(weakref.ref(item))
        q.put(item)
    del item
    assert all(r() is not None for r in refs)
    queue_ref = weakref.ref(q)
    del q
    assert queue_ref() is None
    assert all(r() is None for r in refs)  # released at once, no gc.collect() needed


def test_reference_cycle_through_the_queue_is_collected(queue_backend: str) -> None:
    q = SPSCQueue(2, backend=queue_backend)
    item = Payload(0)
    item.tag = q  # type: ignore[assignment]  # item -> queue -> item
    q.put(item)
    item_ref, queue_ref = weakref.ref(item), weakref.ref(q)
    del item, q
    gc.collect()
    assert item_ref() is None
    assert queue_ref() is None


# ---- misuse: the same error class (and message) from both backends ---------------------------

BAD_CAPACITIES = [
    (0, InvalidArgumentError),
    (-1, InvalidArgumentError),
    (MAX_CAPACITY + 1, InvalidArgumentError),
    (10**30, InvalidArgumentError),
    (-(10**30), InvalidArgumentError),
    (True, InvalidTypeError),
    (False, InvalidTypeError),
    (2.0, InvalidTypeError),
    ("8", InvalidTypeError),
    (None, InvalidTypeError),
]

BAD_TIMEOUTS = [
    (-1, InvalidArgumentError),
    (-0.001, InvalidArgumentError),
    (float("-inf"), InvalidArgumentError),
    (float("nan"), InvalidArgumentError),
    (-(10**400), InvalidArgumentError),
    (True, InvalidTypeError),
    ("1", InvalidTypeError),
    (b"1", InvalidTypeError),
    ([1], InvalidTypeError),
    (1j, InvalidTypeError),
]


@pytest.mark.parametrize(("capacity", "error"), BAD_CAPACITIES)
def test_bad_capacity(queue_backend: str, capacity: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="capacity") as info:
        SPSCQueue(capacity, backend=queue_backend)  # type: ignore[arg-type]
    assert repr(capacity) in str(info.value)


@pytest.mark.parametrize(("timeout", "error"), BAD_TIMEOUTS)
@pytest.mark.parametrize("op", ["put", "get"])
def test_bad_timeout(queue_backend: str, timeout: object, error: type[Exception], op: str) -> None:
    q = SPSCQueue(2, backend=queue_backend)
    q.put("x")  # neither full nor empty: only the argument can fail the call
    with pytest.raises(error, match="timeout") as info:
        if op == "put":
            q.put("y", timeout=timeout)  # type: ignore[arg-type]
        else:
            q.get(timeout=timeout)  # type: ignore[arg-type]
    assert repr(timeout) in str(info.value)
    assert len(q) == 1  # nothing happened
    q.close()
    with pytest.raises(error):  # arguments are checked before the queue's state
        q.put("y", timeout=timeout)  # type: ignore[arg-type]


def test_wrong_call_shapes_are_type_errors(queue_backend: str) -> None:
    q = SPSCQueue(2, backend=queue_backend)
    with pytest.raises(TypeError):
        q.put()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        q.put(1, 2, 3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        q.put(1, timeout=1, timeot=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        q.get(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        q.try_put()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        q.try_get(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        SPSCQueue(backend=queue_backend)  # type: ignore[call-arg]
    assert len(q) == 0


@pytest.mark.skipif(not NATIVE_OK, reason="compares the native and Python messages")
@pytest.mark.parametrize(
    "call",
    [
        *(lambda b, c=c: SPSCQueue(c, backend=b) for c, _ in BAD_CAPACITIES),
        *(lambda b, t=t: SPSCQueue(1, backend=b).get(timeout=t) for t, _ in BAD_TIMEOUTS),
        lambda b: SPSCQueue(1, backend=b).get(timeout=0),
        lambda b: SPSCQueue(1, backend=b).get(timeout=0.01),
        lambda b: _closed(b).put(1),
        lambda b: _closed(b).try_put(1),
        lambda b: _closed(b).get(),
        lambda b: _closed(b).try_get(),
    ],
)
def test_backends_agree_on_error_class_and_message(call: object) -> None:
    outcomes = []
    for b in ("python", "native"):
        try:
            call(b)  # type: ignore[operator]
        except Exception as exc:  # comparing whatever each backend raised
            outcomes.append((type(exc), str(exc)))
    assert len(outcomes) == 2
    assert outcomes[0] == outcomes[1]


def _closed(backend: str) -> SPSCQueue[int]:
    q: SPSCQueue[int] = SPSCQueue(1, backend=backend)
    q.close()
    return q


# ---- a reference model, driven by hypothesis ------------------------------------------------


class QueueModel(RuleBasedStateMachine):
    """Single-thread sequences of every operation, checked against a deque and a flag."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.model: deque[Payload] = deque()
        self.closed = False
        self.capacity = 0
        self.serial = 0

    @initialize(capacity=st.integers(min_value=1, max_value=9))
    def make(self, capacity: int) -> None:
        self.q: SPSCQueue[Payload] = SPSCQueue(capacity, backend=self.backend)
        self.capacity = capacity

    def _item(self) -> Payload:
        self.serial += 1
        return Payload(self.serial)

    @rule()
    def try_put(self) -> None:
        item = self._item()
        if self.closed:
            with pytest.raises(QueueClosed):
                self.q.try_put(item)
        elif len(self.model) == self.capacity:
            assert self.q.try_put(item) is False
        else:
            assert self.q.try_put(item) is True
            self.model.append(item)

    @rule()
    def put_no_wait(self) -> None:
        item = self._item()
        if self.closed:
            with pytest.raises(QueueClosed):
                self.q.put(item, timeout=0)
        elif len(self.model) == self.capacity:
            with pytest.raises(QueueTimeout):
                self.q.put(item, timeout=0)
        else:
            self.q.put(item, timeout=0)
            self.model.append(item)

    @precondition(lambda self: len(self.model) < self.capacity and not self.closed)
    @rule()
    def put_blocking_with_room(self) -> None:
        item = self._item()
        self.q.put(item)
        self.model.append(item)

    @rule()
    def try_get(self) -> None:
        if self.model:
            ok, item = self.q.try_get()
            assert ok is True
            assert item is self.model.popleft()
        elif self.closed:
            with pytest.raises(QueueClosed):
                self.q.try_get()
        else:
            assert self.q.try_get() == (False, None)

    @rule()
    def get_no_wait(self) -> None:
        if self.model:
            assert self.q.get(timeout=0) is self.model.popleft()
        elif self.closed:
            with pytest.raises(QueueClosed):
                self.q.get(timeout=0)
        else:
            with pytest.raises(QueueTimeout):
                self.q.get(timeout=0)

    @precondition(lambda self: bool(self.model))
    @rule()
    def get_blocking_with_item(self) -> None:
        assert self.q.get() is self.model.popleft()

    @rule()
    def close(self) -> None:
        self.q.close()
        self.closed = True

    @invariant()
    def agrees(self) -> None:
        if self.capacity:
            assert len(self.q) == len(self.model)
            assert self.q.closed == self.closed
            assert self.q.capacity == self.capacity


def test_matches_reference_model(queue_backend: str) -> None:
    run_state_machine_as_test(
        lambda: QueueModel(queue_backend),
        settings=settings(max_examples=150, stateful_step_count=60, deadline=None),
    )


# ---- two threads, many items ------------------------------------------------------------------

STRESS = """
import threading, time
from kvortex.errors import QueueClosed, QueueTimeout
from kvortex.queue import SPSCQueue

backend, capacity, n = {backend!r}, {capacity}, {n}
q = SPSCQueue(capacity, backend=backend)
received = []
errors = []

def producer():
    try:
        for i in range(n):
            mode = i % 4
            if mode == 0:
                q.put(i)
            elif mode == 1:
                q.put(i, timeout=30)
            elif mode == 2:
                if not q.try_put(i):
                    q.put(i, timeout=30)
            else:
                try:
                    q.put(i, timeout=0)
                except QueueTimeout:
                    q.put(i)
    except BaseException as exc:
        errors.append(exc)
    finally:
        q.close()

def consumer():
    i = 0
    try:
        while True:
            mode = i % 3
            try:
                if mode == 0:
                    item = q.get()
                elif mode == 1:
                    item = q.get(timeout=30)
                else:
                    ok, item = q.try_get()
                    if not ok:
                        item = q.get(timeout=30)
            except QueueClosed:
                return
            received.append(item)
            i += 1
    except BaseException as exc:
        errors.append(exc)

threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
t0 = time.monotonic()
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
assert len(received) == n, len(received)
assert received == list(range(n)), "order"
print("ok", round(time.monotonic() - t0, 2))
"""


@pytest.mark.parametrize(("capacity", "n"), [(1, 50_000), (7, 100_000), (64, 200_000)])
def test_two_thread_stress(queue_backend: str, capacity: int, n: int) -> None:
    out = run_isolated(STRESS.format(backend=queue_backend, capacity=capacity, n=n), timeout=120)
    assert out.startswith("ok")


CLOSE_MID_STREAM = """
import threading, time
from kvortex.errors import QueueClosed
from kvortex.queue import SPSCQueue

q = SPSCQueue({capacity}, backend={backend!r})
put_count = [0]
received = []

def producer():
    i = 0
    try:
        while True:
            q.put(i) if i % 2 else q.put(i, timeout=30)
            i += 1
            put_count[0] = i
    except QueueClosed:
        pass

def consumer():
    try:
        while True:
            received.append(q.get(timeout=30))
    except QueueClosed:
        pass

threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
for t in threads:
    t.start()
time.sleep(0.3)
q.close()  # from a third thread, while both are busy
for t in threads:
    t.join(30)
assert not any(t.is_alive() for t in threads)
assert put_count[0] > 0
assert received == list(range(put_count[0])), (len(received), put_count[0])
print("ok", put_count[0])
"""


@pytest.mark.parametrize("capacity", [1, 64])
def test_close_mid_stream_loses_nothing(queue_backend: str, capacity: int) -> None:
    """Every item whose put() returned is delivered, in order, even when close() races."""
    out = run_isolated(CLOSE_MID_STREAM.format(backend=queue_backend, capacity=capacity), 60)
    assert out.startswith("ok")
