#include <kvortex/disk_io.h>

#include <errno.h>
#include <linux/aio_abi.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <string>
#include <system_error>
#include <type_traits>

#ifdef KVORTEX_HAVE_ZLIB
#include <zlib.h>
#endif

namespace kvortex::disk {

namespace {

static_assert(std::is_same_v<aio_context_t, unsigned long>,
              "BatchIO::Context must be the kernel's aio_context_t");

// A sync transfer moves at most this much per call; the kernel caps one call near 2 GiB
// (MAX_RW_COUNT) anyway, and a bounded request keeps size_t -> ssize_t conversions exact.
constexpr std::int64_t kSyncChunk = std::int64_t{1} << 30;

// The raw AIO system calls (<linux/aio_abi.h>): no libaio needed. Each returns -1 and sets errno
// on failure, like every syscall(2).
long sys_io_setup(unsigned nr_events, aio_context_t* ctx) {
  return syscall(SYS_io_setup, nr_events, ctx);
}
long sys_io_destroy(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
long sys_io_submit(aio_context_t ctx, long n, struct iocb** iocbs) {
  return syscall(SYS_io_submit, ctx, n, iocbs);
}
long sys_io_getevents(aio_context_t ctx, long min_nr, long nr, struct io_event* events) {
  return syscall(SYS_io_getevents, ctx, min_nr, nr, events, nullptr);
}

std::string errno_text(int error_number) {
  return std::error_code(error_number, std::generic_category()).message();
}

#ifdef KVORTEX_HAVE_ZLIB
constexpr bool kHaveZlib = true;
#else
constexpr bool kHaveZlib = false;
#endif

std::string compute_unavailable_reason() {
  if (!kHaveZlib) return "zlib (zlib.h, libz) not found at build time";
  aio_context_t ctx = 0;
  if (sys_io_setup(1, &ctx) != 0) {
    const int err = errno;
    return "Linux AIO is unavailable here: io_setup failed: " + errno_text(err);
  }
  sys_io_destroy(ctx);
  return "";
}

// Whether a read that has already moved `done` bytes has reached end of file: only a regular
// file has a size to compare with; anything else is read until pread returns 0.
// Returns 1 (at EOF), 0 (not), or -errno when fstat fails.
int at_eof(const IoOp& op, std::int64_t done) noexcept {
  struct stat st {};
  if (fstat(op.fd, &st) != 0) return -errno;
  return S_ISREG(st.st_mode) && op.offset + done >= st.st_size ? 1 : 0;
}

}  // namespace

const char* unavailable_reason() noexcept {
  // Computed once, thread-safely (a function-local static); later calls cost a load.
  static const std::string reason = compute_unavailable_reason();
  return reason.c_str();
}

std::int64_t transfer_sync(const IoOp& op, std::int64_t done) noexcept {
  auto* base = reinterpret_cast<char*>(op.address);
  while (done < op.nbytes) {
    if (!op.is_write && done > 0) {
      const int eof = at_eof(op, done);
      if (eof < 0) return eof;
      if (eof == 1) return done;
    }
    const auto want = static_cast<std::size_t>(std::min(op.nbytes - done, kSyncChunk));
    const ssize_t r = op.is_write ? pwrite(op.fd, base + done, want, op.offset + done)
                                  : pread(op.fd, base + done, want, op.offset + done);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    // A write that makes no progress would loop forever; a read of 0 bytes is end of file.
    if (r == 0) return op.is_write ? -EIO : done;
    done += r;
  }
  return done;
}

BatchIO::BatchIO(int depth) : depth_(depth) {
  if (depth < 1 || depth > kMaxDepth) {
    throw Error(ErrorCode::kInvalidArgument, "depth=" + std::to_string(depth) +
                                                 " is not allowed; expected 1 <= depth <= " +
                                                 std::to_string(kMaxDepth));
  }
  // One context up front, so that a kernel without AIO (or out of aio-max-nr) fails here, and
  // so that run() can always wait for a context instead of failing when it cannot make one.
  aio_context_t ctx = 0;
  if (sys_io_setup(static_cast<unsigned>(depth), &ctx) != 0) {
    throw SystemCallError(errno, "io_setup(" + std::to_string(depth) + ")");
  }
  idle_.push_back(ctx);
  contexts_ = 1;
}

BatchIO::~BatchIO() { close(); }

void BatchIO::close() {
  std::vector<Context> doomed;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    closed_ = true;
    // Calls in progress keep their buffers in flight until they return; destroying their
    // contexts under them would leave the kernel writing into memory the caller then frees.
    idle_or_done_.wait(lock, [this] { return active_ == 0; });
    doomed.swap(idle_);
    contexts_ = 0;
  }
  for (Context ctx : doomed) sys_io_destroy(ctx);
}

bool BatchIO::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

BatchIO::Context BatchIO::acquire() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) throw Error(ErrorCode::kQueueClosed, "run() on a closed BatchIO");
    ++active_;
    if (!idle_.empty()) {
      const Context ctx = idle_.back();
      idle_.pop_back();
      return ctx;
    }
  }
  // Every context is busy: make one more for this call (outside the lock: io_setup is a
  // system call). If the kernel refuses (aio-max-nr reached), wait for a busy one to come
  // back, unless none is left to wait for.
  aio_context_t ctx = 0;
  const bool made = sys_io_setup(static_cast<unsigned>(depth_), &ctx) == 0;
  const int err = errno;
  std::unique_lock<std::mutex> lock(mutex_);
  if (made) {
    ++contexts_;
    return ctx;
  }
  idle_or_done_.wait(lock, [this] { return !idle_.empty() || contexts_ == 0; });
  if (idle_.empty()) {
    --active_;
    lock.unlock();
    idle_or_done_.notify_all();
    throw SystemCallError(err, "io_setup(" + std::to_string(depth_) + ")");
  }
  const Context reused = idle_.back();
  idle_.pop_back();
  return reused;
}

void BatchIO::release(Context ctx) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (ctx != 0) {
      idle_.push_back(ctx);
    } else {
      --contexts_;  // destroyed by a failed call
    }
    --active_;
  }
  idle_or_done_.notify_all();
}

void BatchIO::run(const IoOp* ops, std::size_t n, std::int64_t* results) {
  const Context ctx = acquire();
  try {
    run_on(ctx, ops, n, results);
  } catch (...) {
    // run_on throws only after io_getevents itself failed. io_destroy waits for the requests
    // still in flight, so nothing writes into the caller's buffers once we return.
    sys_io_destroy(ctx);
    release(0);
    throw;
  }
  release(ctx);
}

void BatchIO::run_on(Context ctx, const IoOp* ops, std::size_t n, std::int64_t* results) {
  // Zero-length ops complete at once; the others each get one control block.
  std::vector<struct iocb> cbs;
  cbs.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    const IoOp& op = ops[i];
    results[i] = 0;
    if (op.nbytes == 0) continue;
    struct iocb cb;
    std::memset(&cb, 0, sizeof cb);
    cb.aio_data = i;  // comes back in the completion event
    cb.aio_lio_opcode = op.is_write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
    cb.aio_fildes = static_cast<std::uint32_t>(op.fd);
    cb.aio_buf = op.address;
    cb.aio_nbytes = static_cast<std::uint64_t>(op.nbytes);
    cb.aio_offset = op.offset;
    cbs.push_back(cb);
  }
  const std::size_t m = cbs.size();
  std::vector<struct iocb*> pending(m);
  for (std::size_t j = 0; j < m; ++j) pending[j] = &cbs[j];
  std::vector<struct io_event> events(static_cast<std::size_t>(depth_));

  std::size_t next = 0;  // pending[next..m) are not submitted yet
  long in_flight = 0;
  while (next < m || in_flight > 0) {
    while (next < m && in_flight < depth_) {
      const long want = std::min<long>(depth_ - in_flight, static_cast<long>(m - next));
      const long r = sys_io_submit(ctx, want, &pending[next]);
      if (r > 0) {
        next += static_cast<std::size_t>(r);
        in_flight += r;
        continue;
      }
      const int err = r == 0 ? EAGAIN : errno;
      if (err == EINTR) continue;
      // Out of kernel resources with requests in flight: reaping frees some.
      if (err == EAGAIN && in_flight > 0) break;
      // The kernel refused pending[next] itself (a bad fd, a file without AIO support, a read
      // from a write-only fd), or has no resources at all: run that one op synchronously.
      // pread/pwrite then give the errno the Python fallback reports for it.
      const auto i = static_cast<std::size_t>(pending[next]->aio_data);
      results[i] = transfer_sync(ops[i], 0);
      ++next;
    }
    if (in_flight == 0) continue;
    const long got = sys_io_getevents(ctx, 1, in_flight, events.data());
    if (got < 0) {
      if (errno == EINTR) continue;
      throw SystemCallError(errno, "io_getevents");
    }
    for (long k = 0; k < got; ++k) {
      const auto i = static_cast<std::size_t>(events[static_cast<std::size_t>(k)].data);
      const auto res = static_cast<std::int64_t>(events[static_cast<std::size_t>(k)].res);
      --in_flight;
      // A short transfer (end of file, a signal, the kernel's per-call cap) is finished here,
      // synchronously; it is rare enough not to be worth another submission. So is an op a
      // signal interrupted before it moved anything (the fallback's preadv retries EINTR too).
      if (res == -EINTR) {
        results[i] = transfer_sync(ops[i], 0);
      } else {
        results[i] = res < 0 || res >= ops[i].nbytes ? res : transfer_sync(ops[i], res);
      }
    }
  }
}

std::uint32_t crc32(const void* data, std::size_t n, std::uint32_t value) {
#ifndef KVORTEX_HAVE_ZLIB
  (void)data;
  (void)n;
  (void)value;
  throw Error(ErrorCode::kInvalidArgument, unavailable_reason());
#else
  // zlib returns 0, not `value`, for a null buffer; an empty input changes nothing.
  if (n == 0) return value;
  const auto* p = static_cast<const Bytef*>(data);
  uLong crc = value;
#if ZLIB_VERNUM >= 0x1290
  crc = crc32_z(crc, p, n);
#else
  while (n > 0) {  // crc32() takes a 32-bit length
    const auto step = static_cast<uInt>(std::min<std::size_t>(n, UINT_MAX & ~std::size_t{4095}));
    crc = ::crc32(crc, p, step);
    p += step;
    n -= step;
  }
#endif
  return static_cast<std::uint32_t>(crc);
#endif
}

}  // namespace kvortex::disk
