// KV page copies between the engine's paged KV cache (GPU) and host chunk slots.
// See csrc/include/kvortex/page_copy.h for the addressing and docs/transfer.md for the paths.
//
// Everything here is enqueued on the caller's stream and returns without synchronising. Every
// CUDA status is checked; a failure becomes kvortex::Error(kTransfer, "<call>: <message>").
#include <kvortex/errors.h>
#include <kvortex/page_copy.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

namespace kvortex::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Errors

[[noreturn]] void fail(const char* call, cudaError_t err) {
  // Reset the runtime's per-thread "last error" so a later launch check does not report this
  // one again (sticky errors cannot be reset: every later call reports them anyway).
  (void)cudaGetLastError();
  throw Error(ErrorCode::kTransfer, std::string(call) + ": " + cudaGetErrorString(err));
}

void check(cudaError_t err, const char* call) {
  if (err != cudaSuccess) fail(call, err);
}

[[noreturn]] void invalid(const std::string& message) {
  throw Error(ErrorCode::kInvalidArgument, message);
}

std::string hex(std::uint64_t value) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(value));
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Validation (cheap: O(planes + chunks + block ids), no CUDA calls)

void validate(const PageCopyArgs& a) {
  const int method = static_cast<int>(a.method);
  if (method < 0 || method > 3) {
    invalid("method must be 0 (dma), 1 (kernel), 2 (naive) or 3 (dma without batching), got " +
            std::to_string(method));
  }
  if (a.num_planes == 0) invalid("plane_bases is empty; a layout has at least one plane");
  if (a.page_bytes == 0) invalid("page_bytes must be > 0, got 0");
  if (a.blocks_per_chunk == 0) invalid("blocks_per_chunk must be >= 1, got 0");
  if (a.block_stride < a.page_bytes) {
    invalid("block_stride " + std::to_string(a.block_stride) + " is smaller than page_bytes " +
            std::to_string(a.page_bytes) + ": the pages of consecutive blocks would overlap");
  }
  if (a.max_ctas < 1) invalid("max_ctas must be >= 1, got " + std::to_string(a.max_ctas));
  if (a.num_block_ids % a.blocks_per_chunk != 0 ||
      a.num_block_ids / a.blocks_per_chunk != a.num_chunks) {
    invalid(std::to_string(a.num_chunks) + " slot addresses need " +
            std::to_string(a.num_chunks * a.blocks_per_chunk) + " block ids (" +
            std::to_string(a.blocks_per_chunk) + " per chunk), got " +
            std::to_string(a.num_block_ids));
  }
  for (std::size_t q = 0; q < a.num_planes; ++q) {
    if (a.plane_bases[q] == 0) invalid("plane_bases[" + std::to_string(q) + "] is 0 (null)");
  }
  for (std::size_t c = 0; c < a.num_chunks; ++c) {
    if (a.slot_addrs[c] == 0) invalid("slot_addrs[" + std::to_string(c) + "] is 0 (null)");
  }
  for (std::size_t i = 0; i < a.num_block_ids; ++i) {
    if (a.block_ids[i] < -1) {
      invalid("block_ids[" + std::to_string(i) + "] is " + std::to_string(a.block_ids[i]) +
              "; block ids must be >= 0, or -1 to skip the page");
    }
  }
}

std::uint64_t chunk_bytes(const PageCopyArgs& a) {
  return static_cast<std::uint64_t>(a.num_planes) * a.blocks_per_chunk * a.page_bytes;
}

std::uint64_t gpu_page(const PageCopyArgs& a, std::size_t c, std::size_t q, std::size_t j) {
  const auto block = static_cast<std::uint64_t>(a.block_ids[c * a.blocks_per_chunk + j]);
  return a.plane_bases[q] + block * a.block_stride;
}

std::uint64_t host_page(const PageCopyArgs& a, std::size_t c, std::size_t q, std::size_t j) {
  return a.slot_addrs[c] + (q * a.blocks_per_chunk + j) * a.page_bytes;
}

// Runs the copy on the device that holds the KV pages, whatever device is current on the
// calling thread, and restores the caller's current device afterwards. torch usually has the
// right device current already; a fresh thread may not.
class DeviceGuard {
 public:
  explicit DeviceGuard(std::uint64_t gpu_address) {
    cudaPointerAttributes attr{};
    check(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(gpu_address)),
          "cudaPointerGetAttributes");
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
      invalid("plane_bases[0] = " + hex(gpu_address) +
              " is not GPU memory (cudaPointerGetAttributes type " +
              std::to_string(static_cast<int>(attr.type)) + ")");
    }
    device_ = attr.device;
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) {
      check(cudaSetDevice(device_), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  int device() const { return device_; }

 private:
  int device_ = 0;
  int previous_ = 0;
  bool switched_ = false;
};

// ---------------------------------------------------------------------------------------------
// DMA: copy-engine transfers

struct Run {
  std::uint64_t dst;
  std::uint64_t src;
  std::uint64_t bytes;
};

// Pages in host order (chunk, plane, block of the chunk). With merge, a page that continues
// the previous run on both sides (GPU and host addresses adjacent) extends it: a chunk's
// adjacent block ids in one plane become one run, and so do consecutive planes or chunks
// whose addresses happen to line up (a one-plane block-outermost layout with adjacent block
// ids makes a whole chunk, or several chunks in adjacent slots, one copy).
std::vector<Run> plan_runs(const PageCopyArgs& a, bool merge) {
  std::vector<Run> runs;
  runs.reserve(merge ? a.num_chunks * a.num_planes : a.num_block_ids * a.num_planes);
  for (std::size_t c = 0; c < a.num_chunks; ++c) {
    for (std::size_t q = 0; q < a.num_planes; ++q) {
      for (std::size_t j = 0; j < a.blocks_per_chunk; ++j) {
        if (a.block_ids[c * a.blocks_per_chunk + j] < 0) continue;  // -1: skip this page
        const std::uint64_t gpu = gpu_page(a, c, q, j);
        const std::uint64_t host = host_page(a, c, q, j);
        const std::uint64_t dst = a.to_host ? host : gpu;
        const std::uint64_t src = a.to_host ? gpu : host;
        if (merge && !runs.empty()) {
          Run& last = runs.back();
          if (last.dst + last.bytes == dst && last.src + last.bytes == src) {
            last.bytes += a.page_bytes;
            continue;
          }
        }
        runs.push_back(Run{dst, src, a.page_bytes});
      }
    }
  }
  return runs;
}

// Runs [first, last) with one cudaMemcpyAsync each.
void memcpy_loop(const Run* first, const Run* last, bool to_host, cudaStream_t stream) {
  const cudaMemcpyKind kind = to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
  for (const Run* r = first; r != last; ++r) {
    check(cudaMemcpyAsync(reinterpret_cast<void*>(r->dst), reinterpret_cast<const void*>(r->src),
                          r->bytes, kind, stream),
          "cudaMemcpyAsync");
  }
}

#if CUDART_VERSION >= 12080
// Set once the driver has refused batched copies as unsupported; later calls go straight to
// the loop. Relaxed: it is only a hint; a stale read costs one more refused attempt.
std::atomic<bool> g_batch_unsupported{false};

// One cudaMemcpyBatchAsync for runs [first, last). Returns false (error cleared) when the
// runtime or driver refuses the batch; the caller then enqueues the same copies one by one. A
// refused batch may have enqueued some of its copies already; copying them again is harmless
// because a transfer never writes its own sources.
bool memcpy_batch(const Run* first, const Run* last, cudaStream_t stream) {
  if (g_batch_unsupported.load(std::memory_order_relaxed)) return false;
  // The batch API rejects the legacy default stream; use the loop there.
  if (stream == nullptr || stream == cudaStreamLegacy) return false;
  const auto count = static_cast<std::size_t>(last - first);
  std::vector<void*> dsts(count);
  std::vector<void*> srcs(count);
  std::vector<std::size_t> sizes(count);
  for (std::size_t i = 0; i < count; ++i) {
    dsts[i] = reinterpret_cast<void*>(first[i].dst);
    srcs[i] = reinterpret_cast<void*>(first[i].src);
    sizes[i] = first[i].bytes;
  }
  cudaMemcpyAttributes attr{};
  // Sources are read in stream order: a store must see the kernels queued before it.
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  std::size_t attr_index = 0;  // attrs[0] applies to copies 0..count-1
  // 12.8/12.9 take (void**, void**, size_t*, ..., size_t* failIdx, stream); 13.x has const
  // arrays and no failIdx. Non-const arrays convert to either.
#if CUDART_VERSION >= 13000
  const cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), count,
                                               &attr, &attr_index, 1, stream);
#else
  std::size_t fail_index = 0;
  const cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), count,
                                               &attr, &attr_index, 1, &fail_index, stream);
#endif
  if (err == cudaSuccess) return true;
  (void)cudaGetLastError();
  if (err == cudaErrorNotSupported || err == cudaErrorCallRequiresNewerDriver) {
    g_batch_unsupported.store(true, std::memory_order_relaxed);
  }
  return false;
}
#endif

void enqueue_runs(const Run* first, const Run* last, bool to_host, cudaStream_t stream,
                  bool allow_batch) {
#if CUDART_VERSION >= 12080
  if (allow_batch && last - first > 1 && memcpy_batch(first, last, stream)) return;
#else
  (void)allow_batch;
#endif
  memcpy_loop(first, last, to_host, stream);
}

// DMA lanes. One stream's copies run one after another on one copy engine, and each copy has
// a fixed cost, so many mid-sized runs (per-layer layouts: 2048 runs of 512 KiB for 8K tokens)
// reach ~90 % of the link on one stream; spread over up to 4 streams (copy engines), the
// per-copy gaps overlap and the link saturates (measured on H200: 51.7 -> 54.4 GB/s). Lane 0
// is the caller's stream; the others are private, non-blocking streams per device and
// direction (so a concurrent store and load never queue behind each other), ordered by events:
// every lane waits for the caller's stream before its first copy (fork), and the caller's
// stream waits for every lane after its last (join), so callers see one ordinary stream-ordered
// copy.
constexpr int kMaxLanes = 4;
constexpr std::uint64_t kMinLaneBytes = 4ull << 20;  // below this a lane is not worth its events

// KVORTEX_DMA_LANES=1..4 caps the lanes (a tuning and diagnostic knob, read once per process).
int lane_cap() {
  static const int cap = [] {
    const char* env = std::getenv("KVORTEX_DMA_LANES");
    const int v = (env != nullptr && *env != '\0') ? std::atoi(env) : kMaxLanes;
    return std::min(std::max(v, 1), kMaxLanes);
  }();
  return cap;
}

int lane_count(std::size_t runs, std::uint64_t bytes) {
  const std::uint64_t by_bytes = bytes / kMinLaneBytes;
  const auto cap = static_cast<std::uint64_t>(lane_cap());
  const std::uint64_t lanes = std::min(cap, std::min<std::uint64_t>(runs, by_bytes));
  return static_cast<int>(std::max<std::uint64_t>(lanes, 1));
}

// Private stream `lane` (1..kMaxLanes-1) for `device` and direction, created on first use and
// kept for the life of the process (destroying it at exit could race with driver teardown).
cudaStream_t dma_lane(int device, bool to_host, int lane) {
  static std::mutex mutex;
  static std::vector<cudaStream_t> streams;  // [device][direction][lane]
  constexpr int kPerDevice = 2 * kMaxLanes;
  std::lock_guard<std::mutex> lock(mutex);
  const std::size_t index = static_cast<std::size_t>(device) * kPerDevice +
                            (to_host ? kMaxLanes : 0) + static_cast<std::size_t>(lane);
  if (index >= streams.size()) streams.resize((static_cast<std::size_t>(device) + 1) * kPerDevice);
  if (streams[index] == nullptr) {
    cudaStream_t s = nullptr;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    streams[index] = s;
  }
  return streams[index];
}

// An event used for one fork or join only. cudaStreamWaitEvent captures the event's state when
// it is called, and cudaEventDestroy of a recorded, unfinished event is deferred by the driver,
// so the event may be destroyed as soon as its wait is enqueued.
class OneShotEvent {
 public:
  OneShotEvent() {
    check(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  }
  ~OneShotEvent() { (void)cudaEventDestroy(event_); }
  OneShotEvent(const OneShotEvent&) = delete;
  OneShotEvent& operator=(const OneShotEvent&) = delete;
  // Make `waiter` wait for everything enqueued on `source` so far.
  void order(cudaStream_t source, cudaStream_t waiter) {
    check(cudaEventRecord(event_, source), "cudaEventRecord");
    check(cudaStreamWaitEvent(waiter, event_, 0), "cudaStreamWaitEvent");
  }

 private:
  cudaEvent_t event_ = nullptr;
};

void copy_dma(const PageCopyArgs& a, int device, cudaStream_t stream, bool allow_batch) {
  const std::vector<Run> runs = plan_runs(a, /*merge=*/true);
  std::uint64_t total = 0;
  for (const Run& r : runs) total += r.bytes;
  const int lanes = lane_count(runs.size(), total);
  const Run* begin = runs.data();
  if (lanes == 1) {
    enqueue_runs(begin, begin + runs.size(), a.to_host, stream, allow_batch);
    return;
  }
  // Lane i takes the runs whose bytes fall in [i * total / lanes, (i + 1) * total / lanes).
  std::vector<std::size_t> bounds(static_cast<std::size_t>(lanes) + 1, runs.size());
  bounds[0] = 0;
  std::uint64_t seen = 0;
  int lane = 1;
  for (std::size_t i = 0; i < runs.size() && lane < lanes; ++i) {
    seen += runs[i].bytes;
    if (seen * static_cast<std::uint64_t>(lanes) >= total * static_cast<std::uint64_t>(lane)) {
      bounds[static_cast<std::size_t>(lane++)] = i + 1;
    }
  }
  std::vector<cudaStream_t> lane_streams(static_cast<std::size_t>(lanes), stream);
  // Fork: every private lane waits for the caller's stream. An error here leaves nothing but
  // waits enqueued, so it can simply propagate.
  OneShotEvent fork;
  for (int i = 1; i < lanes; ++i) {
    lane_streams[static_cast<std::size_t>(i)] = dma_lane(device, a.to_host, i);
    fork.order(stream, lane_streams[static_cast<std::size_t>(i)]);
  }
  // Copies, then the join, which must happen even after a failed enqueue: the caller's stream
  // (and the event the Mover records on it) has to cover every copy that did get queued.
  std::exception_ptr error;
  for (int i = 0; i < lanes; ++i) {
    try {
      enqueue_runs(begin + bounds[static_cast<std::size_t>(i)],
                   begin + bounds[static_cast<std::size_t>(i) + 1], a.to_host,
                   lane_streams[static_cast<std::size_t>(i)], allow_batch);
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  for (int i = 1; i < lanes; ++i) {
    try {
      OneShotEvent join;
      join.order(lane_streams[static_cast<std::size_t>(i)], stream);
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

void copy_naive(const PageCopyArgs& a, cudaStream_t stream) {
  const std::vector<Run> runs = plan_runs(a, /*merge=*/false);
  memcpy_loop(runs.data(), runs.data() + runs.size(), a.to_host, stream);
}

// ---------------------------------------------------------------------------------------------
// Kernel: gather (GPU -> host) / scatter (host -> GPU) on a few CTAs through mapped memory

constexpr int kThreads = 512;

struct KernelParams {
  const std::uint64_t* plane_bases;  // device copies of the index arrays
  const std::uint64_t* slot_addrs;
  const std::int64_t* block_ids;
  std::uint64_t num_planes;
  std::uint64_t blocks_per_chunk;
  std::uint64_t block_stride;
  std::uint64_t page_bytes;
  std::uint64_t total_pages;
  bool to_host;
};

// Each CTA walks pages k = blockIdx.x, blockIdx.x + gridDim.x, ... in host order; its threads
// copy the page's elements of type T (the widest width every address and size is aligned to),
// issuing kUnroll loads before the matching stores so that several host (PCIe) reads are in
// flight per thread: with 512 threads x 4 x 16 bytes, one CTA keeps 32 KiB in flight and
// about 8 CTAs cover the link's bandwidth-delay product. No shared memory, no barriers.
template <typename T, int kUnroll>
__global__ void __launch_bounds__(kThreads) page_copy_kernel(KernelParams p) {
  const std::uint64_t pages_per_chunk = p.num_planes * p.blocks_per_chunk;
  const std::uint64_t n = p.page_bytes / sizeof(T);
  const std::uint64_t step = static_cast<std::uint64_t>(blockDim.x) * kUnroll;
  for (std::uint64_t k = blockIdx.x; k < p.total_pages; k += gridDim.x) {
    const std::uint64_t c = k / pages_per_chunk;
    const std::uint64_t in_chunk = k - c * pages_per_chunk;
    const std::uint64_t q = in_chunk / p.blocks_per_chunk;
    const std::uint64_t j = in_chunk - q * p.blocks_per_chunk;
    const std::int64_t id = p.block_ids[c * p.blocks_per_chunk + j];
    if (id < 0) continue;  // -1: skip this page (uniform across the CTA: no divergence)
    const auto block = static_cast<std::uint64_t>(id);
    const std::uint64_t gpu = p.plane_bases[q] + block * p.block_stride;
    const std::uint64_t host = p.slot_addrs[c] + in_chunk * p.page_bytes;
    const T* __restrict__ src = reinterpret_cast<const T*>(p.to_host ? gpu : host);
    T* __restrict__ dst = reinterpret_cast<T*>(p.to_host ? host : gpu);
    for (std::uint64_t first = threadIdx.x; first < n; first += step) {
      T v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const std::uint64_t i = first + static_cast<std::uint64_t>(u) * blockDim.x;
        if (i < n) v[u] = src[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const std::uint64_t i = first + static_cast<std::uint64_t>(u) * blockDim.x;
        if (i < n) dst[i] = v[u];
      }
    }
  }
}

// The kernel dereferences host addresses directly: an unregistered slot would fault and
// poison the whole CUDA context (the serving engine's too), so check each chunk's first and
// last byte are pinned, mapped host memory. Two driver queries per chunk.
void check_mapped(const PageCopyArgs& a) {
  const std::uint64_t bytes = chunk_bytes(a);
  for (std::size_t c = 0; c < a.num_chunks; ++c) {
    const std::uint64_t ends[2] = {a.slot_addrs[c], a.slot_addrs[c] + bytes - 1};
    for (const std::uint64_t addr : ends) {
      cudaPointerAttributes attr{};
      check(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(addr)),
            "cudaPointerGetAttributes");
      if (attr.type != cudaMemoryTypeHost || attr.devicePointer == nullptr) {
        invalid("host slot " + std::to_string(c) + " (" + hex(a.slot_addrs[c]) + ", " +
                std::to_string(bytes) + " bytes): byte " + hex(addr) +
                " is not pinned, mapped host memory; the kernel method needs the host "
                "region registered with register_host first");
      }
    }
  }
}

// Stream-ordered allocations for the kernel's index arrays come from a pool of our own per
// device, never the device's default pool: (1) internal-dependency reuse is turned off, so an
// allocation on the load stream never waits for a free on the store stream (which would
// serialise concurrent store and load) and we never make the engine's streams wait on ours;
// (2) a release threshold keeps a few MiB mapped across synchronisations, so an allocation
// is not a fresh physical mapping every time. The pools live for the whole process (destroying
// them at exit could race with driver teardown).
cudaMemPool_t index_pool(int device) {
  static std::mutex mutex;
  static std::vector<cudaMemPool_t> pools;
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<std::size_t>(device) >= pools.size()) pools.resize(device + 1, nullptr);
  if (pools[device] == nullptr) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    check(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate");
    std::uint64_t keep = 8ull << 20;
    int off = 0;
    cudaError_t err = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
    if (err == cudaSuccess) {
      err = cudaMemPoolSetAttribute(pool, cudaMemPoolReuseAllowInternalDependencies, &off);
    }
    if (err != cudaSuccess) {
      (void)cudaMemPoolDestroy(pool);
      fail("cudaMemPoolSetAttribute", err);
    }
    pools[device] = pool;
  }
  return pools[device];
}

template <typename T, int kUnroll>
void launch(const KernelParams& p, unsigned grid, cudaStream_t stream) {
  page_copy_kernel<T, kUnroll><<<grid, kThreads, 0, stream>>>(p);
}

void copy_kernel(const PageCopyArgs& a, int device, cudaStream_t stream) {
  check_mapped(a);

  // The index arrays travel in one buffer: [plane_bases | slot_addrs | block_ids].
  std::vector<std::uint64_t> packed;
  packed.reserve(a.num_planes + a.num_chunks + a.num_block_ids);
  packed.insert(packed.end(), a.plane_bases, a.plane_bases + a.num_planes);
  packed.insert(packed.end(), a.slot_addrs, a.slot_addrs + a.num_chunks);
  for (std::size_t i = 0; i < a.num_block_ids; ++i) {
    packed.push_back(static_cast<std::uint64_t>(a.block_ids[i]));
  }
  const std::size_t packed_bytes = packed.size() * sizeof(std::uint64_t);

  // Getting the indices to the device without a host sync and without a use-after-free:
  //  - the device buffer is allocated stream-ordered on `stream` (cudaMallocFromPoolAsync);
  //  - cudaMemcpyAsync from `packed`, which is pageable, returns only once the driver has
  //    copied the source into its own staging memory (CUDA "API synchronization behavior":
  //    pageable sources are staged before the call returns), so `packed` may die when this
  //    function returns even though the device-side copy is still queued. For a small copy
  //    the driver stages it without waiting for the stream; if it ever chose to wait, the
  //    copy would be slower, never wrong;
  //  - the kernel is queued after that copy on the same stream, so it reads complete indices;
  //  - cudaFreeAsync on the same stream is ordered after the kernel, so the memory returns to
  //    the pool only once the kernel has finished reading it, and the pool hands it to another
  //    stream only once that free is known complete (internal dependencies are off, see
  //    index_pool).
  void* dev = nullptr;
  check(cudaMallocFromPoolAsync(&dev, packed_bytes, index_pool(device), stream),
        "cudaMallocFromPoolAsync");
  cudaError_t err = cudaMemcpyAsync(dev, packed.data(), packed_bytes, cudaMemcpyHostToDevice,
                                    stream);
  const char* failed_call = "cudaMemcpyAsync (index arrays)";
  if (err == cudaSuccess) {
    auto* idx = static_cast<const std::uint64_t*>(dev);
    KernelParams p{};
    p.plane_bases = idx;
    p.slot_addrs = idx + a.num_planes;
    p.block_ids = reinterpret_cast<const std::int64_t*>(idx + a.num_planes + a.num_chunks);
    p.num_planes = a.num_planes;
    p.blocks_per_chunk = a.blocks_per_chunk;
    p.block_stride = a.block_stride;
    p.page_bytes = a.page_bytes;
    p.total_pages = static_cast<std::uint64_t>(a.num_block_ids) * a.num_planes;
    p.to_host = a.to_host;
    const auto grid = static_cast<unsigned>(
        std::min<std::uint64_t>(static_cast<std::uint64_t>(a.max_ctas), p.total_pages));
    // The widest access every page start and size is aligned to: page starts are plane base
    // + block * stride on the GPU and slot + k * page_bytes on the host.
    std::uint64_t bits = a.page_bytes | a.block_stride;
    for (std::size_t q = 0; q < a.num_planes; ++q) bits |= a.plane_bases[q];
    for (std::size_t c = 0; c < a.num_chunks; ++c) bits |= a.slot_addrs[c];
    if (bits % 16 == 0) {
      launch<uint4, 4>(p, grid, stream);
    } else if (bits % 8 == 0) {
      launch<uint2, 8>(p, grid, stream);
    } else if (bits % 4 == 0) {
      launch<std::uint32_t, 8>(p, grid, stream);
    } else if (bits % 2 == 0) {
      launch<std::uint16_t, 8>(p, grid, stream);
    } else {
      launch<std::uint8_t, 8>(p, grid, stream);
    }
    err = cudaGetLastError();
    failed_call = "page copy kernel launch";
  }
  // Freed in stream order whether or not the launch happened: nothing queued after this
  // point reads the buffer.
  const cudaError_t free_err = cudaFreeAsync(dev, stream);
  check(err, failed_call);
  check(free_err, "cudaFreeAsync");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public API

void copy_pages(const PageCopyArgs& args) {
  validate(args);
  if (args.num_chunks == 0) return;
  const DeviceGuard guard(args.plane_bases[0]);
  auto* stream = reinterpret_cast<cudaStream_t>(args.stream);
  switch (args.method) {
    case CopyMethod::kDma:
      copy_dma(args, guard.device(), stream, /*allow_batch=*/true);
      break;
    case CopyMethod::kKernel:
      copy_kernel(args, guard.device(), stream);
      break;
    case CopyMethod::kNaive:
      copy_naive(args, stream);
      break;
    case CopyMethod::kDmaLoop:
      copy_dma(args, guard.device(), stream, /*allow_batch=*/false);
      break;
  }
}

void register_host(std::uintptr_t ptr, std::size_t nbytes) {
  if (ptr == 0) invalid("register_host: ptr is 0 (null)");
  if (nbytes == 0) invalid("register_host: nbytes must be > 0, got 0");
  void* p = reinterpret_cast<void*>(ptr);
  bool registered_here = true;
  const cudaError_t err =
      cudaHostRegister(p, nbytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
  if (err == cudaErrorHostMemoryAlreadyRegistered) {
    (void)cudaGetLastError();  // not an error for us: clear it
    registered_here = false;
  } else {
    check(err, "cudaHostRegister");
  }
  void* dev = nullptr;
  const cudaError_t map_err = cudaHostGetDevicePointer(&dev, p, 0);
  if (map_err != cudaSuccess || dev != p) {
    (void)cudaGetLastError();
    if (registered_here) (void)cudaHostUnregister(p);
    if (map_err != cudaSuccess) fail("cudaHostGetDevicePointer", map_err);
    throw Error(ErrorCode::kTransfer,
                "cudaHostGetDevicePointer: host memory at " + hex(ptr) +
                    " maps to device address " + hex(reinterpret_cast<std::uintptr_t>(dev)) +
                    ", not the same address; KVortex needs unified virtual addressing");
  }
}

void unregister_host(std::uintptr_t ptr) {
  if (ptr == 0) invalid("unregister_host: ptr is 0 (null)");
  const cudaError_t err = cudaHostUnregister(reinterpret_cast<void*>(ptr));
  // Not registered: nothing to undo. Runtime unloading (interpreter exit): the registration
  // ends with the process.
  if (err == cudaErrorHostMemoryNotRegistered || err == cudaErrorCudartUnloading) {
    (void)cudaGetLastError();
    return;
  }
  check(err, "cudaHostUnregister");
}

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

int runtime_version() noexcept {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return CUDART_VERSION;
  }
  return v;
}

int driver_version() noexcept {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

}  // namespace kvortex::cuda
