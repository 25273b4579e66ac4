// Disk I/O for the disk tier: batches of positional reads and writes run through Linux AIO, and
// the CRC-32 that guards every record on disk.
//
// Threading contract. Every member of BatchIO may be called from any thread, concurrently.
// run() takes an AIO context (io_setup with `depth` events) from the object's idle list for the
// duration of the call, creating one when all are busy, so concurrent calls proceed in parallel
// on separate contexts and never share a completion queue; a context goes back to the idle list
// when its call returns. close() marks the object closed (later run() calls throw kQueueClosed),
// waits for calls in progress to return, then destroys every context; it is idempotent. No
// function here touches Python: csrc/bindings/disk_io.cc converts arguments with the GIL held
// and releases it around run(), close() and crc32() of large buffers.
//
// Memory: an op's [address, address + nbytes) must stay valid, and must not be written by
// anyone else, until run() returns. With O_DIRECT the kernel transfers straight to or from it.
//
// Errors. Per-op I/O errors never throw: the op's result is -errno (ENOSPC, EIO, EFBIG, EBADF,
// EINVAL for a misaligned O_DIRECT transfer, ...). run() throws kvortex::Error(kQueueClosed)
// after close(); the constructor throws Error(kInvalidArgument) for a depth out of range and
// SystemCallError when the kernel refuses the first AIO context. Validating ops (negative
// sizes, null addresses) is the binding's job; run() trusts them.
#pragma once

#include <kvortex/slab_pool.h>  // SystemCallError

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace kvortex::disk {

// O_DIRECT wants offsets, lengths and addresses aligned to the device's logical block size;
// 4096 covers every device we target.
inline constexpr std::size_t kAlign = 4096;
inline constexpr int kMaxDepth = 4096;

// "" when this build and this kernel can run BatchIO and crc32 (zlib was found at build time;
// io_setup works here, probed once), else why not.
const char* unavailable_reason() noexcept;

struct IoOp {
  bool is_write;
  int fd;
  std::int64_t offset;   // >= 0; offset + nbytes <= INT64_MAX
  std::uintptr_t address;
  std::int64_t nbytes;   // >= 0; address != 0 when nbytes > 0
};

// Completes one op synchronously with pread/pwrite from `done` bytes on, as run() does for the
// rest of a short transfer. Returns the bytes transferred in total or -errno. A read stops at
// end of file (a short result); a read that comes back short before end of file is continued,
// the file's size (fstat) deciding which is which, so an O_DIRECT read ending at an unaligned
// end of file is not retried at an unaligned offset. A write is continued until complete.
// EINTR is retried; EAGAIN (a non-blocking fd) is reported, not spun on.
std::int64_t transfer_sync(const IoOp& op, std::int64_t done) noexcept;

class BatchIO {
 public:
  // depth: ops in flight at once per run() call, 1..kMaxDepth.
  explicit BatchIO(int depth);
  ~BatchIO();
  BatchIO(const BatchIO&) = delete;
  BatchIO& operator=(const BatchIO&) = delete;

  // Runs ops[0..n) and waits for all; results[i] is ops[i]'s bytes transferred or -errno.
  // Ops with nbytes == 0 complete with 0 without a system call. Up to depth ops are in flight
  // at once; a short transfer is completed with transfer_sync(). An op the kernel refuses at
  // submission (io_submit's error, e.g. EBADF) runs through transfer_sync() instead, so its
  // result is the errno pread/pwrite give: the same as the Python fallback's.
  void run(const IoOp* ops, std::size_t n, std::int64_t* results);
  void close();
  bool closed() const;
  int depth() const noexcept { return depth_; }

 private:
  using Context = unsigned long;  // aio_context_t

  Context acquire();
  void release(Context ctx);
  void run_on(Context ctx, const IoOp* ops, std::size_t n, std::int64_t* results);

  const int depth_;
  mutable std::mutex mutex_;
  std::condition_variable idle_or_done_;  // signalled whenever a call returns its context
  // Guarded by mutex_.
  std::vector<Context> idle_;
  int contexts_ = 0;  // alive: idle plus held by calls in progress
  int active_ = 0;    // run() calls in progress
  bool closed_ = false;
};

// zlib's CRC-32 (what zlib.crc32 returns) of data[0..n), continuing from `value`. Throws
// Error(kInvalidArgument) with unavailable_reason() in a build without zlib.
std::uint32_t crc32(const void* data, std::size_t n, std::uint32_t value);

}  // namespace kvortex::disk
