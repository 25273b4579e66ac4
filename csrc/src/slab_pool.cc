#include <kvortex/slab_pool.h>

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <system_error>
#include <utility>

namespace kvortex {

namespace {

constexpr std::int64_t kMaxRegionBytes = std::numeric_limits<std::ptrdiff_t>::max();
constexpr const char* kThpPath = "/sys/kernel/mm/transparent_hugepage/enabled";
constexpr const char* kNodeDir = "/sys/devices/system/node";

std::string errno_text(int error_number) {
  // std::generic_category().message() is strerror() text, computed thread-safely.
  return std::error_code(error_number, std::generic_category()).message();
}

std::string join(const std::vector<int>& values) {
  std::string out;
  for (int v : values) {
    if (!out.empty()) out += ", ";
    out += std::to_string(v);
  }
  return out;
}

// Validates the sizes and returns the slot stride (slot_bytes rounded up to kSlotAlignment).
std::int64_t checked_stride(std::int64_t slot_bytes, std::int64_t num_slots) {
  if (slot_bytes < 1) {
    throw Error(ErrorCode::kInvalidArgument, "slot_bytes=" + std::to_string(slot_bytes) +
                                                 " is not allowed; expected an integer >= 1");
  }
  if (num_slots < 1) {
    throw Error(ErrorCode::kInvalidArgument, "num_slots=" + std::to_string(num_slots) +
                                                 " is not allowed; expected an integer >= 1");
  }
  constexpr auto align = static_cast<std::int64_t>(kSlotAlignment);
  std::int64_t total = 0;
  const bool overflow = slot_bytes > kMaxRegionBytes - (align - 1) ||
                        __builtin_mul_overflow((slot_bytes + align - 1) / align * align,
                                               num_slots, &total);
  if (overflow) {
    throw Error(ErrorCode::kInvalidArgument,
                "slot_bytes=" + std::to_string(slot_bytes) + " x num_slots=" +
                    std::to_string(num_slots) + " is too large: the region (slots rounded up to " +
                    std::to_string(kSlotAlignment) + " bytes) must be at most " +
                    std::to_string(kMaxRegionBytes) + " bytes");
  }
  return (slot_bytes + align - 1) / align * align;
}

void check_numa_node(std::optional<int> node) {
  if (!node) return;
  if (*node < 0) {
    throw Error(ErrorCode::kInvalidArgument,
                "numa_node=" + std::to_string(*node) +
                    " is not allowed; expected None or a NUMA node id >= 0");
  }
  const std::vector<int> nodes = HostMemoryInfo::numa_nodes();
  if (std::find(nodes.begin(), nodes.end(), *node) != nodes.end()) return;
  throw Error(ErrorCode::kInvalidArgument,
              "numa_node=" + std::to_string(*node) + " does not exist on this machine; " +
                  (nodes.empty() ? std::string("no NUMA nodes are listed under ") + kNodeDir
                                 : "NUMA nodes present: " + join(nodes)));
}

void bind_to_node(const AnonymousRegion& region, int node) {
#ifdef SYS_mbind
  // The raw syscall keeps libnuma out of our dependencies. MPOL_BIND from <linux/mempolicy.h>.
  constexpr int kMpolBind = 2;
  constexpr std::size_t kBitsPerWord = 8 * sizeof(unsigned long);
  std::vector<unsigned long> mask(static_cast<std::size_t>(node) / kBitsPerWord + 1, 0UL);
  mask[static_cast<std::size_t>(node) / kBitsPerWord] |= 1UL << (node % kBitsPerWord);
  // The kernel reads maxnode - 1 bits (an off-by-one kept for ABI compatibility), so pass one
  // more than the bits the mask holds.
  const unsigned long maxnode = mask.size() * kBitsPerWord + 1;
  const long rc = ::syscall(SYS_mbind, region.data(), region.size(), kMpolBind, mask.data(),
                            maxnode, 0U);
  if (rc != 0) {
    const int err = errno;
    throw SystemCallError(err, "mbind of the host slab pool (" + std::to_string(region.size()) +
                                   " bytes) to NUMA node " + std::to_string(node) + " failed");
  }
#else
  (void)region;
  throw SystemCallError(ENOSYS, "mbind to NUMA node " + std::to_string(node) +
                                    " is not supported on this platform");
#endif
}

// Returns whether MADV_HUGEPAGE was applied.
bool advise_hugepages(const AnonymousRegion& region, HugePages mode) {
  if (mode == HugePages::kOff) return false;
  if (mode == HugePages::kAuto && !HostMemoryInfo::thp_available()) return false;
#ifdef MADV_HUGEPAGE
  if (::madvise(region.data(), region.size(), MADV_HUGEPAGE) == 0) return true;
  const int err = errno;
  if (mode == HugePages::kAuto) return false;  // "auto" means best effort
  throw SystemCallError(err, "madvise(MADV_HUGEPAGE) of the host slab pool (" +
                                 std::to_string(region.size()) + " bytes) failed");
#else
  (void)region;
  if (mode == HugePages::kAuto) return false;
  throw SystemCallError(ENOSYS, "madvise(MADV_HUGEPAGE) is not supported on this platform");
#endif
}

inline std::uint64_t bit_of(std::int64_t slot) { return std::uint64_t{1} << (slot & 63); }

}  // namespace

SystemCallError::SystemCallError(int error_number, const std::string& what_failed)
    : Error(ErrorCode::kSystem, what_failed + ": " + errno_text(error_number)),
      errno_(error_number) {}

AnonymousRegion::AnonymousRegion(std::size_t bytes) : data_(nullptr), size_(bytes) {
  // MAP_NORESERVE: no swap/commit accounting up front; pages are committed as they are touched,
  // which is what lets a 16 GiB pool come up instantly on a machine with less free memory.
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    throw SystemCallError(err, "mmap of " + std::to_string(bytes) +
                                   " bytes (anonymous, MAP_NORESERVE) failed");
  }
  data_ = static_cast<std::uint8_t*>(p);
}

AnonymousRegion::~AnonymousRegion() {
  // munmap of a range we mapped ourselves cannot fail in a way we could act on.
  ::munmap(data_, size_);
}

std::string HostMemoryInfo::thp_setting() {
  std::ifstream in(kThpPath);
  std::string line;
  if (!in || !std::getline(in, line)) return "";
  const auto end = line.find_last_not_of(" \t\r\n");
  return end == std::string::npos ? "" : line.substr(0, end + 1);
}

bool HostMemoryInfo::thp_available() {
  const std::string s = thp_setting();
  return s.find("[always]") != std::string::npos || s.find("[madvise]") != std::string::npos;
}

std::vector<int> HostMemoryInfo::numa_nodes() {
  std::vector<int> nodes;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(kNodeDir, ec), end; !ec && it != end;
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() <= 4 || name.compare(0, 4, "node") != 0 || name.size() > 13) continue;
    if (!std::all_of(name.begin() + 4, name.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    nodes.push_back(std::stoi(name.substr(4)));
  }
  std::sort(nodes.begin(), nodes.end());
  return nodes;
}

SlabPool::SlabPool(std::int64_t slot_bytes, std::int64_t num_slots, std::optional<int> numa_node,
                   HugePages hugepages)
    : slot_bytes_(slot_bytes),
      slot_stride_(checked_stride(slot_bytes, num_slots)),
      num_slots_(num_slots),
      numa_node_(numa_node) {
  check_numa_node(numa_node);
  if (hugepages == HugePages::kRequired && !HostMemoryInfo::thp_available()) {
    const std::string setting = HostMemoryInfo::thp_setting();
    throw Error(ErrorCode::kInvalidArgument,
                std::string("hugepages=True needs transparent huge pages, but ") + kThpPath +
                    (setting.empty() ? " is missing or unreadable"
                                     : " reads '" + setting + "'"));
  }
  auto region = std::make_shared<AnonymousRegion>(static_cast<std::size_t>(nbytes()));
  const auto words = static_cast<std::size_t>((num_slots + 63) / 64);
  meta_ = std::make_unique<AnonymousRegion>((words + static_cast<std::size_t>(num_slots)) *
                                            sizeof(std::uint64_t));
  // Fresh anonymous pages read as zero: the bitmap starts all-free without being written.
  allocated_bits_ = reinterpret_cast<std::uint64_t*>(meta_->data());
  free_stack_ = allocated_bits_ + words;
  if (numa_node) bind_to_node(*region, *numa_node);
  hugepages_ = advise_hugepages(*region, hugepages);
  base_address_ = reinterpret_cast<std::uintptr_t>(region->data());
  region_ = std::move(region);
}

SlabPool::~SlabPool() { close(); }

std::int64_t SlabPool::alloc() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) throw Error(ErrorCode::kPoolClosed, "alloc() on a closed HostSlabPool");
  std::int64_t slot;
  if (free_top_ > 0) {
    // Reuse the most recently freed slot first: its pages are committed and likely cached.
    slot = static_cast<std::int64_t>(free_stack_[--free_top_]);
  } else if (next_fresh_ < num_slots_) {
    slot = next_fresh_++;
  } else {
    return kNoSlot;
  }
  allocated_bits_[slot >> 6] |= bit_of(slot);
  ++used_;
  return slot;
}

void SlabPool::free(std::int64_t slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_allocated(slot, "free");
  allocated_bits_[slot >> 6] &= ~bit_of(slot);
  // At most num_slots_ distinct slots are allocated, so the stack never outgrows its room.
  free_stack_[free_top_++] = static_cast<std::uint64_t>(slot);
  --used_;
}

std::uint8_t* SlabPool::address(std::int64_t slot) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_allocated(slot, "address");
  return region_->data() + slot * slot_stride_;
}

SlotMemory SlabPool::memory(std::int64_t slot) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_allocated(slot, "view");
  // Aliasing constructor: shares ownership of the region, points at the slot.
  return SlotMemory(region_, region_->data() + slot * slot_stride_);
}

void SlabPool::close() {
  std::shared_ptr<AnonymousRegion> region;
  std::unique_ptr<AnonymousRegion> meta;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return;
    closed_ = true;
    region = std::move(region_);
    meta = std::move(meta_);
    allocated_bits_ = nullptr;
    free_stack_ = nullptr;
    free_top_ = next_fresh_ = used_ = 0;
  }
  // The munmaps (region: only if no SlotMemory is outstanding) run here, outside the lock.
}

std::int64_t SlabPool::used() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return used_;
}

std::int64_t SlabPool::available() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_ ? 0 : num_slots_ - used_;
}

bool SlabPool::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

void SlabPool::check_allocated(std::int64_t slot, const char* op) const {
  if (!closed_ && slot >= 0 && slot < num_slots_ &&
      (allocated_bits_[slot >> 6] & bit_of(slot)) != 0) {
    return;
  }
  // Cold path: only now is it worth building a message.
  const std::string call = std::string(op) + "(" + std::to_string(slot) + ")";
  if (closed_) throw Error(ErrorCode::kPoolClosed, call + " on a closed HostSlabPool");
  if (slot < 0 || slot >= num_slots_) {
    throw Error(ErrorCode::kSlotError, call + ": slot " + std::to_string(slot) +
                                           " is out of range; this pool has slots 0.." +
                                           std::to_string(num_slots_ - 1));
  }
  throw Error(ErrorCode::kSlotError,
              call + ": slot " + std::to_string(slot) +
                  (std::string(op) == "free" ? " is not allocated (double free?)"
                                             : " is not allocated; alloc() it first"));
}

}  // namespace kvortex
