// A bounded single-producer / single-consumer ring, lock-free on both ends, and the eventcount
// that lets either end sleep without a lock on the other end's fast path.
//
// Generic C++ (no Python): the element type is a template parameter. csrc/bindings/queue.cc
// stores PyObject* in it; bench/cpp/queue.cc moves integers through it.
//
// Threading contract: at any moment at most one thread calls the producer methods (try_push,
// try_emplace) and at most one thread calls the consumer methods (try_pop). The two may be
// different threads and run truly concurrently. Observers (size_approx, empty_approx,
// full_approx) may be called from either of those two threads.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

#include <kvortex/errors.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace kvortex {

// 64 bytes is the coherence granule on x86-64 and most AArch64 cores. Spelled out instead of
// std::hardware_destructive_interference_size, whose value GCC warns may change between
// compiler versions (an ABI hazard under -Werror), and which Clang long lacked.
inline constexpr std::size_t kCacheLine = 64;

// The largest capacity a ring accepts: 2**30 elements (8 GiB of slots for pointers; the
// allocation is reserved, and touched only as the ring fills).
inline constexpr std::size_t kMaxRingCapacity = std::size_t{1} << 30;

// Tells the core we are spinning: on x86 `pause` de-pipelines the loop (saves power, and stops
// the memory-order machine clear when the watched line changes); on ARM `yield` does the same.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__) || defined(__arm__)
  asm volatile("yield" ::: "memory");
#endif
}

template <typename T>
class SpscRing {
  static_assert(std::is_nothrow_move_constructible_v<T>,
                "SpscRing moves elements out of slots and must not throw half way");
  static_assert(std::is_nothrow_destructible_v<T>, "SpscRing destroys elements in noexcept paths");

 public:
  // A ring that holds at most `capacity` elements: exactly that many, not a rounded-up power of
  // two (the slot array is a power of two internally so that an index maps to a slot with a
  // mask, but fullness is decided against `capacity`). Throws Error(kInvalidArgument) when
  // capacity is 0 or above kMaxRingCapacity, std::bad_alloc when the slots cannot be reserved.
  explicit SpscRing(std::size_t capacity)
      : capacity_(checked_capacity(capacity)),
        mask_(slot_count(capacity_) - 1),
        slots_(allocate_slots(slot_count(capacity_))) {}

  ~SpscRing() {
    // Whatever was pushed and never popped is destroyed here. The destructor runs after both
    // threads are done with the ring (the owner's job), so plain loads would do; relaxed atomic
    // loads say the same without a data race on paper.
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed);
    for (std::uint64_t i = head_.load(std::memory_order_relaxed); i != tail; ++i) {
      slot(i)->~T();
    }
    ::operator delete(static_cast<void*>(slots_), std::align_val_t{kCacheLine});
  }

  SpscRing(const SpscRing&) = delete;
  SpscRing& operator=(const SpscRing&) = delete;
  SpscRing(SpscRing&&) = delete;
  SpscRing& operator=(SpscRing&&) = delete;

  std::size_t capacity() const noexcept { return static_cast<std::size_t>(capacity_); }

  // ---- producer side -----------------------------------------------------------------------

  // Constructs an element in the next free slot; false (and nothing constructed) when full.
  template <typename... Args>
  bool try_emplace(Args&&... args) noexcept(std::is_nothrow_constructible_v<T, Args&&...>) {
    // relaxed: tail_ is written only by this (the producer) thread, so we read our own last
    // store; no other thread's writes need to become visible through this load.
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed);
    if (tail - head_cache_ == capacity_) {
      // Looks full by our cached view of head_; refresh it. The cache is what keeps the
      // consumer's cache line from bouncing to us on every push: we read head_ only when the
      // ring appears full, i.e. at most once per `capacity` pushes in steady state.
      //
      // acquire: pairs with the consumer's release store of head_ in try_pop. Everything the
      // consumer did to a slot before advancing head_ past it (moving the element out,
      // destroying it) happens-before our construction of a new element in that same slot.
      head_cache_ = head_.load(std::memory_order_acquire);
      if (tail - head_cache_ == capacity_) return false;
    }
    ::new (static_cast<void*>(slot(tail))) T(std::forward<Args>(args)...);
    // release: publishes the element constructed above. The consumer's acquire load of tail_
    // that observes tail + 1 also observes the fully constructed element.
    tail_.store(tail + 1, std::memory_order_release);
    return true;
  }

  bool try_push(const T& value) noexcept(std::is_nothrow_copy_constructible_v<T>) {
    return try_emplace(value);
  }
  bool try_push(T&& value) noexcept { return try_emplace(std::move(value)); }

  // ---- consumer side -----------------------------------------------------------------------

  // Moves the oldest element into `out`; false (and `out` untouched) when empty.
  bool try_pop(T& out) noexcept(std::is_nothrow_move_assignable_v<T>) {
    // relaxed: head_ is written only by this (the consumer) thread.
    const std::uint64_t head = head_.load(std::memory_order_relaxed);
    if (head == tail_cache_) {
      // Looks empty by our cached view of tail_; refresh it (same reasoning as head_cache_).
      //
      // acquire: pairs with the producer's release store of tail_ in try_emplace, so the
      // element in slot(head) is fully constructed before we read it.
      tail_cache_ = tail_.load(std::memory_order_acquire);
      if (head == tail_cache_) return false;
    }
    T* element = slot(head);
    out = std::move(*element);
    element->~T();
    // release: hands the slot back to the producer. Our move-out and destruction above
    // happen-before the producer reuses the slot (its acquire load of head_ pairs with this).
    head_.store(head + 1, std::memory_order_release);
    return true;
  }

  // ---- observers (either side) -------------------------------------------------------------

  // Number of elements. Exact when called by one side while the other side is idle; otherwise
  // a value the ring held at some moment during the call, give or take the other side's
  // in-flight operation.
  std::size_t size_approx() const noexcept {
    // acquire on both: cheap on x86/ARM and keeps the result a value both sides did publish.
    // Read head_ first: tail_ only grows, so tail read after head is >= that head, and the
    // difference can never underflow.
    const std::uint64_t head = head_.load(std::memory_order_acquire);
    const std::uint64_t tail = tail_.load(std::memory_order_acquire);
    return static_cast<std::size_t>(tail - head);
  }

  // The waiting side asks these inside its wait predicate; see EventCount for the ordering.
  bool empty_approx() const noexcept {
    // acquire: a consumer that sees the ring non-empty and then pops must see the element;
    // try_pop re-reads tail_ with acquire anyway, so this is belt and braces, and free on x86.
    return tail_.load(std::memory_order_acquire) == head_.load(std::memory_order_acquire);
  }
  bool full_approx() const noexcept {
    // acquire: as above, for the producer looking at head_.
    return tail_.load(std::memory_order_acquire) - head_.load(std::memory_order_acquire) ==
           capacity_;
  }

  // Visits every element from oldest to newest without removing it. NOT synchronised with
  // push or pop: the caller must guarantee that neither side runs concurrently (the Python
  // binding calls it from the garbage collector, under the GIL that every push and pop holds).
  template <typename F>
  void for_each_unsynchronized(F&& visit) const {
    // relaxed: by the caller's guarantee both indices are stable and their last writes
    // happened-before this call through whatever excludes the other threads (the GIL).
    const std::uint64_t tail = tail_.load(std::memory_order_relaxed);
    for (std::uint64_t i = head_.load(std::memory_order_relaxed); i != tail; ++i) {
      visit(static_cast<const T&>(*slot(i)));
    }
  }

 private:
  static std::uint64_t checked_capacity(std::size_t capacity) {
    if (capacity < 1 || capacity > kMaxRingCapacity) {
      throw Error(ErrorCode::kInvalidArgument,
                  "capacity must be between 1 and " + std::to_string(kMaxRingCapacity) +
                      ", got " + std::to_string(capacity));
    }
    return capacity;
  }

  static std::size_t slot_count(std::uint64_t capacity) noexcept {
    std::size_t n = 1;
    while (n < capacity) n <<= 1;
    return n;
  }

  static T* allocate_slots(std::size_t count) {
    // Cache-line aligned and rounded up to whole lines, so the first and last slots never share
    // a line with some unrelated heap object that another thread writes.
    std::size_t bytes = count * sizeof(T);
    bytes = (bytes + kCacheLine - 1) / kCacheLine * kCacheLine;
    return static_cast<T*>(::operator new(bytes, std::align_val_t{kCacheLine}));
  }

  T* slot(std::uint64_t index) const noexcept {
    return slots_ + static_cast<std::size_t>(index & mask_);
  }

  // Indices count pushes and pops since construction and never wrap in practice (2**64
  // operations); slot = index & mask_, size = tail - head. Using free-running counters rather
  // than wrapped ones is what lets the ring be filled to exactly `capacity_` with no spare slot.
  //
  // Layout: three cache lines. Read-only fields first, then the producer's line, then the
  // consumer's line; alignas(kCacheLine) on each group is the explicit padding that stops the
  // producer's stores to tail_ from invalidating the consumer's line holding head_ (and vice
  // versa). The cached opposite index sits on the line of the thread that owns it, so it costs
  // no coherence traffic at all.

  // Line 0: written once in the constructor, then only read by both sides.
  alignas(kCacheLine) const std::uint64_t capacity_;
  const std::uint64_t mask_;
  T* const slots_;

  // Line 1: producer-owned.
  alignas(kCacheLine) std::atomic<std::uint64_t> tail_{0};  // next index to write
  std::uint64_t head_cache_ = 0;  // producer's last seen head_; never read by the consumer

  // Line 2: consumer-owned. The class's alignment (64) rounds sizeof up to a whole line, so
  // an object that the allocator places after this one (aligned new honours the 64) starts on
  // a fresh line and cannot false-share with head_.
  alignas(kCacheLine) std::atomic<std::uint64_t> head_{0};  // next index to read
  std::uint64_t tail_cache_ = 0;  // consumer's last seen tail_; never read by the producer
};

// An eventcount: lets a thread sleep until a condition on lock-free state becomes true, while
// the thread that makes it true pays only a fence and one load when nobody sleeps.
//
// Waiter:   wait_until(ready, deadline) where ready() reads the lock-free state.
// Notifier: change the state (any store, e.g. the ring's release store of tail_), then notify().
//
// Why no wakeup is lost (a Dekker-style handshake; both fences are seq_cst):
//   waiter:    waiters_ += 1;  fence(seq_cst);  check ready()       -> sleep if not ready
//   notifier:  publish state;  fence(seq_cst);  load waiters_       -> wake if non-zero
// The two fences are totally ordered. If the waiter's fence comes first, the notifier's load
// after its own fence sees waiters_ >= 1 and wakes it. If the notifier's fence comes first, the
// waiter's ready() after its fence sees the published state and does not sleep. Either way the
// waiter cannot sleep on a condition that is already true with nobody to wake it.
//
// The mutex closes the remaining gap, between the waiter's ready() check and its actual sleep:
// the waiter holds mu_ from before the increment until cv_.wait releases it atomically, and
// notify() takes mu_ before signalling, so the signal cannot fall between check and sleep.
class EventCount {
 public:
  // Wakes every sleeping waiter. Call after the state change that may make them ready.
  void notify() noexcept {
    // seq_cst fence: the notifier half of the handshake above. It orders the caller's state
    // change (typically a release store) before the load of waiters_ below, which a release
    // store followed by a plain load would not (store->load reordering is allowed).
    std::atomic_thread_fence(std::memory_order_seq_cst);
    // relaxed: the fence above provides the ordering; the fast path is this one load.
    if (waiters_.load(std::memory_order_relaxed) == 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    // Signalled under the lock: a waiter cannot be between its ready() check and its sleep,
    // and the condition variable cannot be destroyed by a woken waiter's owner mid-call.
    cv_.notify_all();
  }

  // Sleeps until ready() returns true or `deadline` passes; returns ready()'s last value.
  // ready() is called with the internal mutex held, so it must only read lock-free state.
  template <typename Ready, typename Clock, typename Duration>
  bool wait_until(Ready&& ready, const std::chrono::time_point<Clock, Duration>& deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    // seq_cst: the waiter half of the handshake; the fence below orders this increment before
    // every ready() check (the RMW alone would not stop a later relaxed/acquire load of the
    // ring's indices from being satisfied before the increment is visible).
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    bool ok = ready();
    while (!ok) {
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) {
        ok = ready();
        break;
      }
      ok = ready();  // woken (or spuriously): re-check, the condition is the truth
    }
    // relaxed: only a notifier reads waiters_, and a stale non-zero value merely costs it one
    // unnecessary lock + notify; the mutex release below orders this for the next waiter.
    waiters_.fetch_sub(1, std::memory_order_relaxed);
    return ok;
  }

 private:
  std::atomic<std::uint32_t> waiters_{0};
  std::mutex mu_;
  std::condition_variable cv_;
};

// Polls ready() before a caller falls back to EventCount::wait_until: first `spins` checks with
// cpu_relax between them (the other side is running on another core and about to act: no
// syscall at all), then checks with std::this_thread::yield between them until `yield_until`
// (the other side may need this very core: on an oversubscribed machine yielding hands it over,
// while on an idle core the yield returns at once and acts as a slower spin). True as soon as
// ready() holds. A futex sleep plus wake costs several microseconds, more on a loaded machine;
// this bounded poll avoids it whenever the other side answers quickly. The yield phase is
// bounded by time, not by count: on a busy core one yield can give the CPU away for a whole
// scheduler slice, and a count would then add up to milliseconds.
template <typename Ready, typename Clock, typename Duration>
bool spin_until(Ready&& ready, unsigned spins,
                const std::chrono::time_point<Clock, Duration>& yield_until) {
  for (unsigned i = 0; i < spins; ++i) {
    if (ready()) return true;
    cpu_relax();
  }
  while (!ready()) {
    if (Clock::now() >= yield_until) return ready();
    std::this_thread::yield();
  }
  return true;
}

}  // namespace kvortex
