# Type stub for the CUDA copy engine kvortex._cuda (csrc/bindings/cuda_module.cc). Public code
# reaches it through kvortex.transfer.Mover, never directly.
import numpy as np
import numpy.typing as npt

def copy_pages(
    to_host: bool,
    method: int,
    plane_bases: npt.NDArray[np.uint64],
    block_stride: int,
    page_bytes: int,
    blocks_per_chunk: int,
    block_ids: npt.NDArray[np.int64],
    slot_addrs: npt.NDArray[np.uint64],
    stream: int,
    max_ctas: int,
) -> None: ...
def register_host(ptr: int, nbytes: int) -> None: ...
def unregister_host(ptr: int) -> None: ...
def device_count() -> int: ...
def runtime_version() -> int: ...
def driver_version() -> int: ...
