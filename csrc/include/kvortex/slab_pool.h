// Host slab pool: one large anonymous mapping cut into fixed-size, page-aligned slots.
//
// Each slot holds one KV chunk. Slots start on kSlotAlignment (4096-byte) boundaries because
// O_DIRECT disk I/O and DMA engines want page-aligned buffers; the slot stride is slot_bytes
// rounded up to that alignment. The mapping is MAP_NORESERVE and never touched up front, so a
// pool of tens of GiB is created in microseconds and commits memory only as slots are written.
//
// Thread safety: every member function may be called from any thread. One mutex guards the
// free list, the allocated bitmap and the closed flag; it is held for a handful of
// instructions per call and never across a system call made on behalf of a caller.
//
// Lifetime: close() (or the destructor) drops the pool's reference to the mapping. Callers that
// hand raw slot memory to someone who may outlive the pool (a Python memoryview, an in-flight
// copy) take a SlotMemory, which shares ownership of the mapping, so the munmap waits for the
// last of them.
#pragma once

#include <kvortex/errors.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace kvortex {

// A failing system call. Is-a Error with ErrorCode::kSystem (-> OSError); also keeps errno so a
// binding can raise OSError(errno, message) exactly as the Python fallback does.
class SystemCallError : public Error {
 public:
  SystemCallError(int error_number, const std::string& what_failed);
  int error_number() const noexcept { return errno_; }

 private:
  int errno_;
};

// An anonymous private mapping (MAP_NORESERVE: nothing is committed until touched), unmapped by
// the destructor. Not copyable or movable: it is owned through a shared_ptr.
class AnonymousRegion {
 public:
  explicit AnonymousRegion(std::size_t bytes);  // throws SystemCallError
  ~AnonymousRegion();
  AnonymousRegion(const AnonymousRegion&) = delete;
  AnonymousRegion& operator=(const AnonymousRegion&) = delete;

  std::uint8_t* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }

 private:
  std::uint8_t* data_;
  std::size_t size_;
};

enum class HugePages {
  kOff,       // no madvise
  kAuto,      // madvise(MADV_HUGEPAGE) when THP is available; silently nothing otherwise
  kRequired,  // THP must be available (else InvalidArgument) and madvise must succeed
};

// What the machine offers, read from sysfs (used by SlabPool, exposed for diagnostics).
struct HostMemoryInfo {
  // Content of /sys/kernel/mm/transparent_hugepage/enabled, trimmed; "" when unreadable.
  static std::string thp_setting();
  // True when thp_setting() selects "[always]" or "[madvise]".
  static bool thp_available();
  // NUMA node ids present under /sys/devices/system/node, ascending; empty when absent.
  static std::vector<int> numa_nodes();
};

inline constexpr std::size_t kSlotAlignment = 4096;

// A pointer to one slot's memory that keeps the whole mapping alive (aliasing shared_ptr).
using SlotMemory = std::shared_ptr<std::uint8_t>;

class SlabPool {
 public:
  static constexpr std::int64_t kNoSlot = -1;

  // Throws Error(kInvalidArgument) for slot_bytes < 1, num_slots < 1, a total size above
  // PTRDIFF_MAX, a negative or absent NUMA node, or kRequired hugepages without THP;
  // SystemCallError when mmap, mbind or (with kRequired) madvise fails.
  SlabPool(std::int64_t slot_bytes, std::int64_t num_slots, std::optional<int> numa_node,
           HugePages hugepages);
  ~SlabPool();
  SlabPool(const SlabPool&) = delete;
  SlabPool& operator=(const SlabPool&) = delete;

  // O(1). A free slot id, or kNoSlot when every slot is allocated. Throws kPoolClosed.
  std::int64_t alloc();
  // O(1). Throws kPoolClosed, or kSlotError for an out-of-range or unallocated slot.
  void free(std::int64_t slot);
  // Address of an allocated slot. Throws kPoolClosed / kSlotError like free().
  std::uint8_t* address(std::int64_t slot) const;
  // Like address(), but the result also keeps the mapping alive after close().
  SlotMemory memory(std::int64_t slot) const;
  // Idempotent. Frees the bookkeeping and drops the pool's reference to the mapping: the munmap
  // happens now, or when the last SlotMemory handed out is released.
  void close();

  std::int64_t slot_bytes() const noexcept { return slot_bytes_; }
  std::int64_t slot_stride() const noexcept { return slot_stride_; }
  std::int64_t num_slots() const noexcept { return num_slots_; }
  std::int64_t nbytes() const noexcept { return slot_stride_ * num_slots_; }
  // The region's address; still reported (as a number) after close.
  std::uintptr_t base_address() const noexcept { return base_address_; }
  std::optional<int> numa_node() const noexcept { return numa_node_; }
  // True when madvise(MADV_HUGEPAGE) was applied to the region.
  bool hugepages() const noexcept { return hugepages_; }
  std::int64_t used() const;       // allocated slots; 0 after close
  std::int64_t available() const;  // slots alloc() can still hand out; 0 after close
  bool closed() const;

 private:
  // Callers hold mutex_. Throws kPoolClosed / kSlotError unless `slot` is allocated.
  void check_allocated(std::int64_t slot, const char* op) const;

  const std::int64_t slot_bytes_;
  const std::int64_t slot_stride_;
  const std::int64_t num_slots_;
  const std::optional<int> numa_node_;
  bool hugepages_ = false;
  std::uintptr_t base_address_ = 0;

  mutable std::mutex mutex_;
  // Guarded by mutex_. Null once closed.
  std::shared_ptr<AnonymousRegion> region_;
  // Bookkeeping lives in its own lazily committed mapping, so creating a pool costs the same
  // for 16 slots or 16 million: [bitmap: one bit per slot][free stack: one uint64 per slot].
  std::unique_ptr<AnonymousRegion> meta_;
  std::uint64_t* allocated_bits_ = nullptr;
  std::uint64_t* free_stack_ = nullptr;
  std::int64_t free_top_ = 0;    // entries on free_stack_ (slots freed after use)
  std::int64_t next_fresh_ = 0;  // slots [next_fresh_, num_slots_) were never handed out
  std::int64_t used_ = 0;
  bool closed_ = false;
};

}  // namespace kvortex
