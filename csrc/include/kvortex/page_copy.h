// Copies KV pages between the engine's paged KV cache (GPU) and host chunk slots.
//
// Plain C++ API: no Python, no torch, not even the CUDA headers (streams travel as integers),
// so the binding layer compiles with the host compiler alone. Implemented in
// csrc/src/page_copy.cu; every failing CUDA call throws
// kvortex::Error(ErrorCode::kTransfer, "<call>: <cudaGetErrorString>") and every bad argument
// kvortex::Error(ErrorCode::kInvalidArgument, ...).
//
// Addressing (see kvortex/layout.py): page (chunk c, plane q, block j of the chunk) lives
//   on the GPU at   plane_bases[q] + block_ids[c * blocks_per_chunk + j] * block_stride
//   on the host at  slot_addrs[c] + (q * blocks_per_chunk + j) * page_bytes
// i.e. a host chunk is its pages in plane-major order. Host memory must be registered with
// register_host (pinned and mapped) for the kernel method; the DMA methods also accept
// unregistered memory but then run at pageable speed and may synchronise.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvortex::cuda {

// How copy_pages moves the pages.
enum class CopyMethod : int {
  kDma = 0,     // copy engines: merged runs over up to 4 streams, batched where possible
  kKernel = 1,  // gather/scatter kernel on a few CTAs, reading/writing mapped host memory
  kNaive = 2,   // one cudaMemcpyAsync per page, no merging (the benchmark baseline)
  kDmaLoop = 3, // kDma's merged runs, always one cudaMemcpyAsync each (diagnostic: shows
                // what cudaMemcpyBatchAsync buys); never chosen by Mover
};

struct PageCopyArgs {
  bool to_host = true;  // true: GPU -> host (store); false: host -> GPU (load)
  CopyMethod method = CopyMethod::kDma;
  const std::uint64_t* plane_bases = nullptr;  // [num_planes] GPU addresses
  std::size_t num_planes = 0;
  std::uint64_t block_stride = 0;  // bytes between consecutive blocks of a plane
  std::uint64_t page_bytes = 0;    // bytes of one page (equal in every plane)
  std::uint64_t blocks_per_chunk = 0;
  const std::int64_t* block_ids = nullptr;  // [num_block_ids] = [num_chunks * blocks_per_chunk]
  std::size_t num_block_ids = 0;
  const std::uint64_t* slot_addrs = nullptr;  // [num_chunks] host addresses
  std::size_t num_chunks = 0;
  std::uintptr_t stream = 0;  // a cudaStream_t
  int max_ctas = 16;          // kernel method: at most this many CTAs
};

// Enqueues the copy of all num_chunks * num_planes * blocks_per_chunk pages on args.stream and
// returns without synchronising. Throws kInvalidArgument for inconsistent arguments (checked
// before anything is enqueued) and kTransfer when a CUDA call fails.
void copy_pages(const PageCopyArgs& args);

// Pins and maps [ptr, ptr + nbytes) (portable, mapped); a range that is already registered
// counts as success. Throws kTransfer if the mapped device address differs from ptr (no UVA).
void register_host(std::uintptr_t ptr, std::size_t nbytes);

// Undoes register_host; a range that is not registered is ignored.
void unregister_host(std::uintptr_t ptr);

// Visible CUDA devices; 0 without a driver or GPU. Never throws.
int device_count() noexcept;

// CUDART_VERSION of the runtime this module links (e.g. 13000).
int runtime_version() noexcept;

// The driver's CUDA version (e.g. 13000); 0 without a driver. Never throws.
int driver_version() noexcept;

}  // namespace kvortex::cuda
