// Chunk keys: the chained SHA-256 of a prompt's token ids (format in docs/keys.md).
//
//   seed  h_{-1} = SHA-256("KVortex/chunk-hash/v1\0" || u32le(len(namespace)) || namespace)
//   key   h_i    = SHA-256(h_{i-1} || u32le(t) for every token t of chunk i)
//
// One key per FULL chunk of `chunk_tokens` tokens; a trailing partial chunk gets no key but its
// tokens are still validated. No Python here: csrc/bindings/hashing.cc adapts Python objects.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvortex::hashing {

inline constexpr std::size_t kKeyBytes = 32;

// Domain-separation tag that starts the seed preimage; the terminating NUL is hashed too.
inline constexpr char kSeedTag[] = "KVortex/chunk-hash/v1";

// "" when this build can hash (it has OpenSSL libcrypto), else why it cannot. When it is not
// "", every function below throws kvortex::Error(kInvalidArgument) with that reason.
const char* unavailable_reason() noexcept;

// How one token id is stored in a caller's buffer.
struct IntLayout {
  unsigned width;  // bytes per element: 1, 2, 4 or 8
  bool is_signed;  // two's complement when true
  bool swapped;    // stored in the opposite byte order to the host's
};

// The seed h_{-1} for `ns` (ns_len < 2**32).
void seed(const std::uint8_t* ns, std::size_t ns_len, std::uint8_t out[kKeyBytes]);

// Keys for `n_tokens` ids read from `base` with a stride of `stride_bytes` (may be negative or
// unaligned) in `layout`. Writes n_tokens / chunk_tokens keys (32 bytes each) to `out` and
// returns that count. Every id, including those of the trailing partial chunk, must satisfy
// 0 <= id < 2**32; the first that does not raises Error(kInvalidArgument) naming its value and
// index (before anything is returned; `out` may have been partly written). Contiguous host-order
// uint32 ids on a little-endian host are hashed in place, without a copy. Thread-safe; holds no
// global state beyond an immutable, lazily created digest handle.
std::size_t hash_chunks(const void* base, std::size_t n_tokens, std::ptrdiff_t stride_bytes,
                        IntLayout layout, std::size_t chunk_tokens, const std::uint8_t* ns,
                        std::size_t ns_len, std::uint8_t* out);

// Convenience for contiguous host-order uint32 ids (what bench/cpp/hashing.cc measures).
std::size_t hash_chunks_u32(const std::uint32_t* tokens, std::size_t n_tokens,
                            std::size_t chunk_tokens, const std::uint8_t* ns, std::size_t ns_len,
                            std::uint8_t* out);

}  // namespace kvortex::hashing
