// kvortex._native.SPSCQueue: the lock-free ring of csrc/include/kvortex/spsc_ring.h holding
// owned PyObject references, with blocking waits that release the GIL.
//
// Written against the CPython C API rather than through pybind11 classes: put/get are the hot
// path of a queue that moves one Python object per call, and pybind11's generic dispatcher
// (argument casting, overload loop, keyword handling) costs several times the ring operation.
// Measured (Python 3.11, pybind11 3.1, 2-core AMD EPYC VM): a pybind11 class doing the same
// try_put + try_get pair took ~320 ns per call, these METH_FASTCALL methods ~65 ns, a list's
// append + pop (the interpreter's floor for a C method call) ~30 ns. pybind11 is used only to
// register the type on the module.
//
// References: put() takes a new reference to the object (Py_INCREF) before it enters the ring;
// get() hands that reference to the caller; whatever is left when the queue dies is released
// in tp_clear/tp_dealloc, which run with the GIL.
//
// The GIL: every push and every pop happens with the GIL held; only the waiting (spin, then
// sleep on an EventCount) runs without it. This makes the queue safe even if Python code breaks
// the one-producer/one-consumer rule (the GIL serialises ring operations), and it is what lets
// the garbage collector walk the ring (tp_traverse) while no operation is in flight.
#include <kvortex/errors.h>
#include <kvortex/spsc_ring.h>
// Before <structmember.h>: bindings.h brings in pybind11, which includes Python.h first.
#include "bindings.h"
#include <structmember.h>  // T_PYSSIZET, READONLY (Python 3.10/3.11 spelling)

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <new>

namespace kvortex::bindings {
namespace {

using Clock = std::chrono::steady_clock;

// A blocked call wakes at least this often to run Python signal handlers (Ctrl-C) with the GIL.
constexpr auto kSignalPollInterval = std::chrono::milliseconds(50);
// Polling before a blocked call sleeps (GIL released): kSpinIterations cpu_relax spins, then
// sched_yield until kPollBudget has passed; see wait_released for what is polled and why.
constexpr unsigned kSpinIterations = 16;
constexpr auto kPollBudget = std::chrono::microseconds(50);
// A timeout of this many seconds or more means "wait forever" (and keeps the deadline
// arithmetic far from overflowing the clock). kvortex/queue.py uses the same value.
constexpr double kForeverSeconds = 1e9;

// The Python exception classes of kvortex/errors.py, looked up once at import. Leaked on
// purpose, like csrc/bindings/errors.cc does: a raise may happen during interpreter shutdown.
PyObject* g_invalid_argument = nullptr;
PyObject* g_invalid_type = nullptr;
PyObject* g_queue_timeout = nullptr;
PyObject* g_queue_closed = nullptr;
// The constant (False, None) that try_get returns when the queue is empty.
PyObject* g_empty_result = nullptr;

// Everything the two sides share. Heap-allocated apart from the Python object because the
// ring is over-aligned (64) and Python's allocator does not guarantee that alignment.
struct QueueState {
  explicit QueueState(std::size_t capacity) : ring(capacity) {}

  SpscRing<PyObject*> ring;
  // The consumer sleeps here when the ring is empty; the producer notifies after each push.
  alignas(kCacheLine) EventCount not_empty;
  // The producer sleeps here when the ring is full; the consumer notifies after each pop.
  alignas(kCacheLine) EventCount not_full;
  // Set once by close(). Read by both sides with and without the GIL (in wait predicates).
  alignas(kCacheLine) std::atomic<bool> closed{false};
  // parked[kProducer] / parked[kConsumer]: how many threads of that side are inside
  // wait_released, i.e. have released (or are about to release) the GIL. A hint only, read in
  // the other side's poll loop; see wait_released. On its own line: written once per wait.
  alignas(kCacheLine) std::atomic<int> parked[2] = {0, 0};
};

enum Side { kProducer = 0, kConsumer = 1 };

struct QueueObject {
  PyObject_HEAD
  QueueState* state;
  PyObject* weakrefs;
};

QueueState& state_of(PyObject* self) { return *reinterpret_cast<QueueObject*>(self)->state; }

bool is_closed(const QueueState& s) {
  // acquire: pairs with the release store in close(); a waiter that sees the flag sees
  // everything close()'s caller did before (nothing the queue relies on, but it is free).
  return s.closed.load(std::memory_order_acquire);
}

// ---- argument parsing ------------------------------------------------------------------------

// `type(obj).__name__` as a new reference (error path only).
PyObject* type_name(PyObject* obj) {
  return PyObject_GetAttrString(reinterpret_cast<PyObject*>(Py_TYPE(obj)), "__name__");
}

// Fills out[0..n) from positional args and keywords for a method with parameters names[0..n),
// of which the first `required` are mandatory. Mirrors Python's own TypeError messages.
bool parse_args(const char* func, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
                const char* const* names, Py_ssize_t n, Py_ssize_t required, PyObject** out) {
  if (nargs > n) {
    PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments (%zd given)", func, n, nargs);
    return false;
  }
  for (Py_ssize_t i = 0; i < n; ++i) out[i] = i < nargs ? args[i] : nullptr;
  if (kwnames != nullptr) {
    const Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nkw; ++k) {
      PyObject* key = PyTuple_GET_ITEM(kwnames, k);
      Py_ssize_t i = 0;
      while (i < n && PyUnicode_CompareWithASCIIString(key, names[i]) != 0) ++i;
      if (i == n) {
        PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", func, key);
        return false;
      }
      if (out[i] != nullptr) {
        PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", func,
                     names[i]);
        return false;
      }
      out[i] = args[nargs + k];
    }
  }
  for (Py_ssize_t i = 0; i < required; ++i) {
    if (out[i] == nullptr) {
      PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", func, names[i]);
      return false;
    }
  }
  return true;
}

// A parsed timeout: wait forever, do not wait at all, or wait until `deadline`.
struct Timeout {
  enum Kind { kForever, kNoWait, kDeadline } kind = kForever;
  Clock::time_point deadline{};
  PyObject* given = nullptr;  // the caller's object, for the QueueTimeout message

  bool expired() const {
    return kind == kNoWait || (kind == kDeadline && Clock::now() >= deadline);
  }
};

// The same rules as kvortex/queue.py's _parse_timeout: None, or an int (not bool) or float
// >= 0; NaN and negatives are InvalidArgumentError, anything else InvalidTypeError.
bool parse_timeout(PyObject* obj, Timeout& out) {
  out.given = obj;
  if (obj == nullptr || obj == Py_None) {
    out.kind = Timeout::kForever;
    return true;
  }
  double seconds = 0.0;
  if (PyLong_Check(obj) && !PyBool_Check(obj)) {
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (value == -1 && PyErr_Occurred()) return false;
    if (overflow != 0) {
      seconds = overflow > 0 ? HUGE_VAL : -1.0;
    } else {
      seconds = static_cast<double>(value);
    }
  } else if (PyFloat_Check(obj)) {
    seconds = PyFloat_AS_DOUBLE(obj);
  } else {
    PyObject* name = type_name(obj);
    if (name == nullptr) return false;
    PyErr_Format(g_invalid_type,
                 "timeout must be None or a number of seconds (int or float), got %R of type %U",
                 obj, name);
    Py_DECREF(name);
    return false;
  }
  if (std::isnan(seconds) || seconds < 0.0) {
    PyErr_Format(g_invalid_argument, "timeout must be None or >= 0 seconds, got %R", obj);
    return false;
  }
  if (seconds >= kForeverSeconds) {
    out.kind = Timeout::kForever;
  } else if (seconds == 0.0) {
    out.kind = Timeout::kNoWait;
  } else {
    out.kind = Timeout::kDeadline;
    out.deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(seconds));
  }
  return true;
}

// ---- waiting ---------------------------------------------------------------------------------

enum class Wait { kReady, kSliceOver, kError };

// Waits with the GIL released until ready() holds, the deadline passes, or one signal-poll
// interval passes; then re-takes the GIL and runs pending signal handlers. The caller loops.
// ready() must read only lock-free state (it runs without the GIL).
//
// The hand-off. Both sides need the GIL for every ring operation, so when, say, the consumer
// waits on an empty ring, becoming ready is not enough: if it calls for the GIL while the
// producer still holds it (the producer usually goes on putting), it sleeps on the GIL's
// condition variable and later pays a futex wake-up, several microseconds, on every hand-off.
// So the first wait of a call polls (spins, then yields) until the ring is ready AND the other
// side is parked here (it released the GIL, so taking it is immediate); only when that poll
// budget (kPollBudget) is spent does it take the GIL on ready() alone, or sleep on the
// eventcount. With two Python threads streaming items this took a capacity-64 queue from
// ~1.3 M to ~8.5 M items/s on a 2-core VM (bench/queue.py); a 20 us budget was too short for
// the other side to fill or drain a capacity-1024 ring, 100 us gained nothing over 50 us.
// `spin` is false after the first slice: a caller that already slept would only burn a core by
// polling again. The cost where the other side never parks here (say a consumer polling with
// try_get and sleeping): each blocked call polls up to kPollBudget before taking the GIL.
template <typename Ready>
Wait wait_released(QueueState& s, Side side, EventCount& event, const Ready& ready,
                   const Timeout& timeout, bool spin) {
  const std::atomic<int>& other_parked = s.parked[side == kProducer ? kConsumer : kProducer];
  // relaxed (both updates): `parked` is a scheduling hint, never used to reason about the
  // ring's contents; a stale value only makes one poll take the GIL a little early or late.
  s.parked[side].fetch_add(1, std::memory_order_relaxed);
  bool ok = false;
  Py_BEGIN_ALLOW_THREADS
  if (spin) {
    Clock::time_point poll_end = Clock::now() + kPollBudget;
    if (timeout.kind == Timeout::kDeadline && timeout.deadline < poll_end) {
      poll_end = timeout.deadline;
    }
    ok = spin_until(
        [&] { return ready() && other_parked.load(std::memory_order_relaxed) > 0; },
        kSpinIterations, poll_end);
    ok = ok || ready();  // budget spent: go for the GIL if we can make progress at all
  }
  if (!ok) {
    Clock::time_point until = Clock::now() + kSignalPollInterval;
    if (timeout.kind == Timeout::kDeadline && timeout.deadline < until) until = timeout.deadline;
    ok = event.wait_until(ready, until);
  }
  s.parked[side].fetch_sub(1, std::memory_order_relaxed);
  Py_END_ALLOW_THREADS
  if (ok) return Wait::kReady;
  // Only the main thread runs handlers; elsewhere this is a cheap no-op.
  if (PyErr_CheckSignals() < 0) return Wait::kError;
  return Wait::kSliceOver;
}

// ---- methods ---------------------------------------------------------------------------------

// Pushes `obj` (already increfed by the caller). On failure the reference is released.
PyObject* put_owned(QueueState& s, PyObject* obj, const Timeout& timeout) {
  const auto has_room = [&s] { return !s.ring.full_approx() || is_closed(s); };
  for (bool first = true;; first = false) {
    if (s.ring.try_push(obj)) {
      s.not_empty.notify();
      Py_RETURN_NONE;
    }
    if (timeout.expired()) {
      Py_DECREF(obj);
      PyErr_Format(g_queue_timeout, "put() timed out after %R s: the queue stayed full",
                   timeout.given != nullptr ? timeout.given : Py_None);
      return nullptr;
    }
    if (wait_released(s, kProducer, s.not_full, has_room, timeout, first) == Wait::kError) {
      Py_DECREF(obj);
      return nullptr;
    }
    if (is_closed(s)) {
      Py_DECREF(obj);
      PyErr_SetString(g_queue_closed, "put() on a closed queue");
      return nullptr;
    }
  }
}

PyObject* queue_put(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  QueueState& s = state_of(self);
  PyObject* obj = nullptr;
  Timeout timeout;
  if (nargs == 1 && kwnames == nullptr) {
    obj = args[0];  // the common call, q.put(x): no parsing beyond this
  } else {
    static const char* const names[] = {"obj", "timeout"};
    PyObject* parsed[2];
    if (!parse_args("put", args, nargs, kwnames, names, 2, 1, parsed)) return nullptr;
    obj = parsed[0];
    if (!parse_timeout(parsed[1], timeout)) return nullptr;
  }
  if (is_closed(s)) {
    PyErr_SetString(g_queue_closed, "put() on a closed queue");
    return nullptr;
  }
  Py_INCREF(obj);  // the ring's reference, handed to the consumer by get()
  return put_owned(s, obj, timeout);
}

PyObject* queue_get(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  QueueState& s = state_of(self);
  Timeout timeout;
  if (nargs != 0 || kwnames != nullptr) {
    static const char* const names[] = {"timeout"};
    PyObject* parsed[1];
    if (!parse_args("get", args, nargs, kwnames, names, 1, 0, parsed)) return nullptr;
    if (!parse_timeout(parsed[0], timeout)) return nullptr;
  }
  const auto has_item = [&s] { return !s.ring.empty_approx() || is_closed(s); };
  for (bool first = true;; first = false) {
    PyObject* item = nullptr;
    if (s.ring.try_pop(item)) {
      s.not_full.notify();
      return item;  // the reference put() took now belongs to the caller
    }
    // Checked after the failed pop: items queued before close() are still delivered.
    if (is_closed(s)) {
      PyErr_SetString(g_queue_closed, "get() on a closed and empty queue");
      return nullptr;
    }
    if (timeout.expired()) {
      PyErr_Format(g_queue_timeout, "get() timed out after %R s: the queue stayed empty",
                   timeout.given != nullptr ? timeout.given : Py_None);
      return nullptr;
    }
    if (wait_released(s, kConsumer, s.not_empty, has_item, timeout, first) == Wait::kError) {
      return nullptr;
    }
  }
}

PyObject* queue_try_put(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                        PyObject* kwnames) {
  QueueState& s = state_of(self);
  PyObject* obj = nullptr;
  if (nargs == 1 && kwnames == nullptr) {
    obj = args[0];
  } else {
    static const char* const names[] = {"obj"};
    if (!parse_args("try_put", args, nargs, kwnames, names, 1, 1, &obj)) return nullptr;
  }
  if (is_closed(s)) {
    PyErr_SetString(g_queue_closed, "try_put() on a closed queue");
    return nullptr;
  }
  Py_INCREF(obj);
  if (s.ring.try_push(obj)) {
    s.not_empty.notify();
    Py_RETURN_TRUE;
  }
  Py_DECREF(obj);  // the caller still holds its own reference: this never frees
  Py_RETURN_FALSE;
}

PyObject* queue_try_get(PyObject* self, PyObject* /*unused*/) {
  QueueState& s = state_of(self);
  PyObject* item = nullptr;
  if (s.ring.try_pop(item)) {
    s.not_full.notify();
    PyObject* result = PyTuple_New(2);
    if (result == nullptr) {
      // Out of memory after the pop. The item cannot go back to the head of the ring (a push
      // appends at the tail and would break FIFO order), so it is released and the MemoryError
      // reported.
      Py_DECREF(item);
      return nullptr;
    }
    Py_INCREF(Py_True);
    PyTuple_SET_ITEM(result, 0, Py_True);
    PyTuple_SET_ITEM(result, 1, item);  // steals the ring's reference
    return result;
  }
  if (is_closed(s)) {
    PyErr_SetString(g_queue_closed, "try_get() on a closed and empty queue");
    return nullptr;
  }
  Py_INCREF(g_empty_result);
  return g_empty_result;
}

PyObject* queue_close(PyObject* self, PyObject* /*unused*/) {
  QueueState& s = state_of(self);
  // release: see is_closed(). The notify() calls below carry the seq_cst fence that pairs
  // with a waiter's registration, so a waiter either sees the flag or gets woken.
  s.closed.store(true, std::memory_order_release);
  s.not_empty.notify();
  s.not_full.notify();
  Py_RETURN_NONE;
}

PyObject* queue_reduce(PyObject* /*self*/, PyObject* /*unused*/) {
  // A queue is a channel between two live threads; a pickled or copied one would be a
  // different, disconnected queue. Refuse, as kvortex/queue.py's fallback does.
  PyErr_SetString(PyExc_TypeError, "an SPSCQueue cannot be pickled or copied");
  return nullptr;
}

Py_ssize_t queue_len(PyObject* self) {
  return static_cast<Py_ssize_t>(state_of(self).ring.size_approx());
}

PyObject* queue_get_closed(PyObject* self, void* /*unused*/) {
  return PyBool_FromLong(is_closed(state_of(self)) ? 1 : 0);
}

PyObject* queue_get_capacity(PyObject* self, void* /*unused*/) {
  return PyLong_FromSize_t(state_of(self).ring.capacity());
}

PyObject* queue_repr(PyObject* self) {
  QueueState& s = state_of(self);
  return PyUnicode_FromFormat("<kvortex._native.SPSCQueue capacity=%zu len=%zu%s>",
                              s.ring.capacity(), s.ring.size_approx(),
                              is_closed(s) ? " closed" : "");
}

// ---- lifetime --------------------------------------------------------------------------------

PyObject* queue_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"capacity", nullptr};
  PyObject* capacity_obj = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:SPSCQueue", const_cast<char**>(kwlist),
                                   &capacity_obj)) {
    return nullptr;
  }
  // Same checks and messages as kvortex/queue.py's _check_capacity.
  if (!PyLong_Check(capacity_obj) || PyBool_Check(capacity_obj)) {
    PyObject* name = type_name(capacity_obj);
    if (name == nullptr) return nullptr;
    PyErr_Format(g_invalid_type, "capacity must be an int, got %R of type %U", capacity_obj,
                 name);
    Py_DECREF(name);
    return nullptr;
  }
  int overflow = 0;
  const long long capacity = PyLong_AsLongLongAndOverflow(capacity_obj, &overflow);
  if (capacity == -1 && PyErr_Occurred()) return nullptr;
  if (overflow != 0 || capacity < 1 ||
      static_cast<unsigned long long>(capacity) > kMaxRingCapacity) {
    PyErr_Format(g_invalid_argument, "capacity must be between 1 and %zu, got %R",
                 kMaxRingCapacity, capacity_obj);
    return nullptr;
  }
  QueueState* state = nullptr;
  try {
    state = new QueueState(static_cast<std::size_t>(capacity));
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
  auto* self = reinterpret_cast<QueueObject*>(type->tp_alloc(type, 0));
  if (self == nullptr) {
    delete state;
    return nullptr;
  }
  self->state = state;
  self->weakrefs = nullptr;
  return reinterpret_cast<PyObject*>(self);
}

// Drops every queued reference. Runs with the GIL and with no put/get in flight (each holds a
// reference to the queue, so the queue cannot be cleared or freed under one).
void drain(QueueState& s) {
  PyObject* item = nullptr;
  while (s.ring.try_pop(item)) Py_DECREF(item);
}

int queue_traverse(PyObject* self, visitproc visit, void* arg) {
  Py_VISIT(Py_TYPE(self));  // heap types own a reference to their type
  QueueState* s = reinterpret_cast<QueueObject*>(self)->state;
  if (s == nullptr) return 0;
  // The GC runs with the GIL, and every push and pop holds the GIL: the ring is quiescent.
  int status = 0;
  s->ring.for_each_unsynchronized([&](PyObject* const& item) {
    if (status == 0) status = visit(item, arg);
  });
  return status;
}

int queue_clear(PyObject* self) {
  QueueState* s = reinterpret_cast<QueueObject*>(self)->state;
  if (s != nullptr) drain(*s);
  return 0;
}

void queue_dealloc(PyObject* self) {
  auto* q = reinterpret_cast<QueueObject*>(self);
  PyTypeObject* type = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  if (q->weakrefs != nullptr) PyObject_ClearWeakRefs(self);
  if (q->state != nullptr) {
    drain(*q->state);
    delete q->state;
    q->state = nullptr;
  }
  type->tp_free(self);
  Py_DECREF(type);
}

// ---- type ------------------------------------------------------------------------------------

PyMethodDef queue_methods[] = {
    {"put", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(queue_put)),
     METH_FASTCALL | METH_KEYWORDS,
     "put(obj, timeout=None) -> None\n\nAppend obj; block while full. timeout: None = forever, "
     "0 = no wait, else seconds.\nRaises QueueTimeout, QueueClosed."},
    {"get", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(queue_get)),
     METH_FASTCALL | METH_KEYWORDS,
     "get(timeout=None) -> object\n\nRemove and return the oldest item; block while empty.\n"
     "Raises QueueTimeout; QueueClosed once closed and empty."},
    {"try_put", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(queue_try_put)),
     METH_FASTCALL | METH_KEYWORDS,
     "try_put(obj) -> bool\n\nAppend obj if there is room; False when full. Raises QueueClosed."},
    {"try_get", queue_try_get, METH_NOARGS,
     "try_get() -> tuple[bool, object]\n\n(True, item), or (False, None) when empty.\n"
     "Raises QueueClosed once closed and empty."},
    {"close", queue_close, METH_NOARGS,
     "close() -> None\n\nClose the queue (idempotent) and wake every blocked caller."},
    {"__reduce__", queue_reduce, METH_NOARGS, "Refuses: a queue cannot be pickled or copied."},
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef queue_getset[] = {
    {"closed", queue_get_closed, nullptr, "Whether close() was called.", nullptr},
    {"capacity", queue_get_capacity, nullptr, "The most items the queue holds.", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyMemberDef queue_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(QueueObject, weakrefs), READONLY, nullptr},
    {nullptr, 0, 0, 0, nullptr},
};

PyType_Slot queue_slots[] = {
    {Py_tp_doc, const_cast<char*>(
                    "SPSCQueue(capacity)\n\nBounded lock-free FIFO of Python objects for one "
                    "producer thread and one consumer thread.\nUse kvortex.queue.SPSCQueue.")},
    {Py_tp_new, reinterpret_cast<void*>(queue_new)},
    {Py_tp_dealloc, reinterpret_cast<void*>(queue_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void*>(queue_traverse)},
    {Py_tp_clear, reinterpret_cast<void*>(queue_clear)},
    {Py_tp_repr, reinterpret_cast<void*>(queue_repr)},
    {Py_tp_methods, queue_methods},
    {Py_tp_getset, queue_getset},
    {Py_tp_members, queue_members},
    {Py_mp_length, reinterpret_cast<void*>(queue_len)},
    {0, nullptr},
};

PyType_Spec queue_spec = {
    "kvortex._native.SPSCQueue",
    sizeof(QueueObject),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    queue_slots,
};

PyObject* error_class(pybind11::module_& errors, const char* name) {
  return pybind11::object(errors.attr(name)).release().ptr();
}

}  // namespace

void init_queue(pybind11::module_& m) {
  pybind11::module_ errors = pybind11::module_::import("kvortex.errors");
  g_invalid_argument = error_class(errors, "InvalidArgumentError");
  g_invalid_type = error_class(errors, "InvalidTypeError");
  g_queue_timeout = error_class(errors, "QueueTimeout");
  g_queue_closed = error_class(errors, "QueueClosed");
  g_empty_result = PyTuple_Pack(2, Py_False, Py_None);
  if (g_empty_result == nullptr) throw pybind11::error_already_set();

  PyObject* type = PyType_FromSpec(&queue_spec);
  if (type == nullptr) throw pybind11::error_already_set();
  m.attr("SPSCQueue") = pybind11::reinterpret_steal<pybind11::object>(type);
  m.attr("SPSC_MAX_CAPACITY") = kMaxRingCapacity;
  m.attr("HOT_PATHS")["queue"] = "";
}

}  // namespace kvortex::bindings
