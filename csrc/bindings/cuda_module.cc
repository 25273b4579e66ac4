// kvortex._cuda: the CUDA copy engine (csrc/src/page_copy.cu). Declares and exports only:
// argument conversion, the GIL, and the error mapping live here; all logic lives in the core.
// Linked to the static CUDA runtime, never to torch: pointers and streams arrive as ints.
#include <kvortex/errors.h>
#include <kvortex/page_copy.h>
#include <pybind11/numpy.h>

#include <cstdint>
#include <string>

#include "bindings.h"

namespace py = pybind11;

namespace {

// C-contiguous arrays of exactly this element type; numpy converts only where the cast is
// safe (e.g. int32 -> int64), anything else is a TypeError from pybind11.
template <typename T>
using Array = py::array_t<T, py::array::c_style>;

[[noreturn]] void invalid(const std::string& message) {
  throw kvortex::Error(kvortex::ErrorCode::kInvalidArgument, message);
}

template <typename T>
const T* data_1d(const Array<T>& a, const char* name) {
  if (a.ndim() != 1) {
    invalid(std::string(name) + " must be a 1-D array, got " + std::to_string(a.ndim()) +
            " dimensions");
  }
  return a.data();
}

std::uint64_t positive(std::int64_t value, const char* name) {
  if (value < 1) invalid(std::string(name) + " must be >= 1, got " + std::to_string(value));
  return static_cast<std::uint64_t>(value);
}

void copy_pages(bool to_host, int method, const Array<std::uint64_t>& plane_bases,
                std::int64_t block_stride, std::int64_t page_bytes,
                std::int64_t blocks_per_chunk, const Array<std::int64_t>& block_ids,
                const Array<std::uint64_t>& slot_addrs, std::uintptr_t stream, int max_ctas) {
  kvortex::cuda::PageCopyArgs args;
  args.to_host = to_host;
  args.method = static_cast<kvortex::cuda::CopyMethod>(method);
  args.plane_bases = data_1d(plane_bases, "plane_bases");
  args.num_planes = static_cast<std::size_t>(plane_bases.size());
  args.block_stride = positive(block_stride, "block_stride");
  args.page_bytes = positive(page_bytes, "page_bytes");
  args.blocks_per_chunk = positive(blocks_per_chunk, "blocks_per_chunk");
  args.block_ids = data_1d(block_ids, "block_ids");
  args.num_block_ids = static_cast<std::size_t>(block_ids.size());
  args.slot_addrs = data_1d(slot_addrs, "slot_addrs");
  args.num_chunks = static_cast<std::size_t>(slot_addrs.size());
  args.stream = stream;
  args.max_ctas = max_ctas;
  // The arrays stay referenced by this frame, so their buffers outlive the call.
  py::gil_scoped_release release;
  kvortex::cuda::copy_pages(args);
}

void register_host(std::int64_t ptr, std::int64_t nbytes) {
  if (ptr <= 0) {
    invalid("register_host: ptr must be a non-null address, got " + std::to_string(ptr));
  }
  if (nbytes < 1) invalid("register_host: nbytes must be >= 1, got " + std::to_string(nbytes));
  py::gil_scoped_release release;  // pinning a large region takes a while
  kvortex::cuda::register_host(static_cast<std::uintptr_t>(ptr),
                               static_cast<std::size_t>(nbytes));
}

void unregister_host(std::int64_t ptr) {
  if (ptr <= 0) {
    invalid("unregister_host: ptr must be a non-null address, got " + std::to_string(ptr));
  }
  py::gil_scoped_release release;
  kvortex::cuda::unregister_host(static_cast<std::uintptr_t>(ptr));
}

int device_count() {
  py::gil_scoped_release release;  // the first CUDA call initialises the driver
  return kvortex::cuda::device_count();
}

int driver_version() {
  py::gil_scoped_release release;
  return kvortex::cuda::driver_version();
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "KVortex CUDA copy engine: KV pages between the paged GPU KV cache and host slots";
  kvortex::bindings::register_errors(m);

  m.def("copy_pages", &copy_pages, py::arg("to_host"), py::arg("method"),
        py::arg("plane_bases"), py::arg("block_stride"), py::arg("page_bytes"),
        py::arg("blocks_per_chunk"), py::arg("block_ids"), py::arg("slot_addrs"),
        py::arg("stream"), py::arg("max_ctas"),
        R"doc(Copy C * P * blocks_per_chunk KV pages between the GPU and host slots.

Page (chunk c, plane q, block j of the chunk) lives on the GPU at
``plane_bases[q] + block_ids[c * blocks_per_chunk + j] * block_stride`` and on the host at
``slot_addrs[c] + (q * blocks_per_chunk + j) * page_bytes``. Enqueued on ``stream`` (a
cudaStream_t as int); returns without synchronising.

Args:
    to_host (bool): True: GPU -> host (store); False: host -> GPU (load).
    method (int): 0 DMA (merged runs over up to 4 copy streams, batched), 1 gather/scatter
        kernel on at most ``max_ctas`` CTAs (host memory must be registered with
        register_host), 2 naive (one cudaMemcpyAsync per page), 3 DMA without batching
        (diagnostic).
    plane_bases (numpy.ndarray[uint64], shape [P]): GPU address of block 0 of each plane.
    block_stride (int): bytes between consecutive blocks of a plane (>= page_bytes).
    page_bytes (int): bytes of one page.
    blocks_per_chunk (int): blocks per chunk.
    block_ids (numpy.ndarray[int64], shape [C * blocks_per_chunk]): engine block ids; -1
        skips that page (neither side is touched).
    slot_addrs (numpy.ndarray[uint64], shape [C]): host address of each chunk.
    stream (int): the CUDA stream.
    max_ctas (int): CTAs of the kernel method (>= 1).

Raises:
    InvalidArgumentError: inconsistent arguments (nothing was enqueued).
    TransferError: a CUDA call failed.)doc");

  m.def("register_host", &register_host, py::arg("ptr"), py::arg("nbytes"),
        R"doc(Pin and map host memory ``[ptr, ptr + nbytes)`` (cudaHostRegister, portable and
mapped). A range that is already registered counts as success.

Raises:
    InvalidArgumentError: ``ptr`` is null or ``nbytes`` < 1.
    TransferError: CUDA refused, or the mapped device address differs from ``ptr``.)doc");

  m.def("unregister_host", &unregister_host, py::arg("ptr"),
        R"doc(Undo register_host for the range starting at ``ptr``; a range that is not
registered is ignored.

Raises:
    TransferError: CUDA refused for another reason.)doc");

  m.def("device_count", &device_count,
        "Visible CUDA devices (int); 0 without a driver or GPU. Never raises.");
  m.def("runtime_version", &kvortex::cuda::runtime_version,
        "The CUDA runtime version this module links, e.g. 13000 (int).");
  m.def("driver_version", &driver_version,
        "The driver's CUDA version, e.g. 13000 (int); 0 without a driver.");
}
