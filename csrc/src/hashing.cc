// Chained SHA-256 chunk keys over token ids (see kvortex/hashing.h and docs/keys.md).
//
// The chain is sequential by definition (h_i needs h_{i-1}), so a prompt is one pass of SHA-256
// over (32 + 4 * chunk_tokens) bytes per chunk; the only things worth optimising are avoiding
// copies (contiguous little-endian uint32 ids are hashed in place) and per-digest overhead.
//
// SHA-256 comes from OpenSSL libcrypto, which picks SHA-NI / AVX2 code at run time. We use the
// low-level SHA256_* functions where they exist: measured on this machine they cost ~50 ns less
// per digest than EVP (about 6 % at 256-token chunks, 35 % at 16-token chunks). They are
// deprecated in OpenSSL 3, so builds that compile deprecated APIs out (or define
// KVORTEX_SHA256_USE_EVP) use the EVP interface instead; both give the same digests.
#include <kvortex/errors.h>
#include <kvortex/hashing.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>

#if KVORTEX_HAVE_OPENSSL
// Must precede every OpenSSL header: silences the OpenSSL 3 deprecation attribute on SHA256_*,
// which we use on purpose (see above).
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/opensslconf.h>
#include <openssl/opensslv.h>
#if defined(KVORTEX_SHA256_USE_EVP) || defined(OPENSSL_NO_DEPRECATED_3_0) || \
    (defined(OPENSSL_VERSION_MAJOR) && OPENSSL_VERSION_MAJOR >= 4)
#define KVORTEX_SHA256_EVP 1
#include <openssl/evp.h>
#else
#include <openssl/sha.h>
#endif
#endif

namespace kvortex::hashing {
namespace {

constexpr bool kHostLittleEndian = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;

#if KVORTEX_HAVE_OPENSSL

[[noreturn]] void openssl_failed(const char* what) {
  throw Error(ErrorCode::kSystem, std::string("OpenSSL SHA-256 failed in ") + what);
}

#if KVORTEX_SHA256_EVP
const EVP_MD* sha256_md() {
#if defined(OPENSSL_VERSION_MAJOR) && OPENSSL_VERSION_MAJOR >= 3
  // Fetched once (thread-safe static init) and kept for the life of the process: EVP_sha256()
  // would repeat the provider lookup on every EVP_DigestInit_ex.
  static EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  return md;
#else
  return EVP_sha256();
#endif
}

class Sha256 {
 public:
  Sha256() : md_(sha256_md()), ctx_(EVP_MD_CTX_new()) {
    if (md_ == nullptr || ctx_ == nullptr) {
      EVP_MD_CTX_free(ctx_);
      openssl_failed("EVP_MD_fetch/EVP_MD_CTX_new");
    }
  }
  ~Sha256() { EVP_MD_CTX_free(ctx_); }
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void init() {
    if (EVP_DigestInit_ex(ctx_, md_, nullptr) != 1) openssl_failed("EVP_DigestInit_ex");
  }
  void update(const void* data, std::size_t len) {
    if (EVP_DigestUpdate(ctx_, data, len) != 1) openssl_failed("EVP_DigestUpdate");
  }
  void final(std::uint8_t* out) {
    unsigned int len = 0;
    if (EVP_DigestFinal_ex(ctx_, out, &len) != 1 || len != kKeyBytes) {
      openssl_failed("EVP_DigestFinal_ex");
    }
  }

 private:
  const EVP_MD* md_;
  EVP_MD_CTX* ctx_;
};
#else
class Sha256 {
 public:
  void init() {
    if (SHA256_Init(&ctx_) != 1) openssl_failed("SHA256_Init");
  }
  void update(const void* data, std::size_t len) {
    if (SHA256_Update(&ctx_, data, len) != 1) openssl_failed("SHA256_Update");
  }
  void final(std::uint8_t* out) {
    if (SHA256_Final(out, &ctx_) != 1) openssl_failed("SHA256_Final");
  }

 private:
  SHA256_CTX ctx_;
};
#endif

// Contiguous little-endian uint32 ids: hash straight from the caller's memory.
std::size_t hash_le_u32_bytes(const std::uint8_t* bytes, std::size_t n_tokens,
                              std::size_t chunk_tokens, const std::uint8_t* prev,
                              std::uint8_t* out) {
  const std::size_t n_keys = n_tokens / chunk_tokens;
  const std::size_t chunk_bytes = chunk_tokens * 4;
  Sha256 sha;
  for (std::size_t i = 0; i < n_keys; ++i) {
    std::uint8_t* key = out + i * kKeyBytes;
    sha.init();
    sha.update(prev, kKeyBytes);
    sha.update(bytes + i * chunk_bytes, chunk_bytes);
    sha.final(key);
    prev = key;
  }
  return n_keys;
}

template <typename U>
U byteswap(U v) {
  static_assert(std::is_unsigned_v<U>);
  if constexpr (sizeof(U) == 1) {
    return v;
  } else if constexpr (sizeof(U) == 2) {
    return __builtin_bswap16(v);
  } else if constexpr (sizeof(U) == 4) {
    return __builtin_bswap32(v);
  } else {
    return __builtin_bswap64(v);
  }
}

// One element of type T at p, in host or swapped byte order; memcpy because p may be unaligned.
template <typename T, bool Swap>
T load(const unsigned char* p) {
  using U = std::make_unsigned_t<T>;
  U u;
  std::memcpy(&u, p, sizeof u);
  if constexpr (Swap) u = byteswap(u);
  T v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// Non-zero exactly when v is outside [0, 2**32): for 8-byte values any of the high 32 bits
// (which also covers negatives), for narrower signed ones the sign bit. Pure shifts, no
// compares: 64-bit compares have no SSE2 instruction and would keep the loop below scalar-slow.
template <typename T>
std::make_unsigned_t<T> out_of_range_bits(T v) {
  using U = std::make_unsigned_t<T>;
  const auto u = static_cast<U>(v);
  if constexpr (sizeof(T) == 8) {
    return static_cast<U>(u >> 32);
  } else if constexpr (std::is_signed_v<T>) {
    return static_cast<U>(u >> (8 * sizeof(T) - 1));
  } else {
    return 0;
  }
}

// Converts ids [first, first + count) to little-endian uint32 in dst; false when any is out of
// range. The range bits are folded without branches so the loop vectorises; the rare failure is
// located afterwards by throw_first_bad(). The contiguous case gets its own loop because a
// compile-time step is what lets the compiler use vector loads.
template <typename T, bool Swap>
bool convert(const unsigned char* base, std::ptrdiff_t stride, std::size_t first,
             std::size_t count, std::uint32_t* dst) {
  const unsigned char* p = base + static_cast<std::ptrdiff_t>(first) * stride;
  std::make_unsigned_t<T> bad = 0;
  if (stride == static_cast<std::ptrdiff_t>(sizeof(T))) {
    for (std::size_t k = 0; k < count; ++k) {
      const T v = load<T, Swap>(p + k * sizeof(T));
      bad |= out_of_range_bits(v);
      const auto id = static_cast<std::uint32_t>(v);
      dst[k] = kHostLittleEndian ? id : byteswap(id);
    }
  } else {
    for (std::size_t k = 0; k < count; ++k, p += stride) {
      const T v = load<T, Swap>(p);
      bad |= out_of_range_bits(v);
      const auto id = static_cast<std::uint32_t>(v);
      dst[k] = kHostLittleEndian ? id : byteswap(id);
    }
  }
  return bad == 0;
}

template <typename T, bool Swap>
[[noreturn]] void throw_first_bad(const unsigned char* base, std::ptrdiff_t stride,
                                  std::size_t first, std::size_t count) {
  for (std::size_t k = first; k < first + count; ++k) {
    const T v = load<T, Swap>(base + static_cast<std::ptrdiff_t>(k) * stride);
    if (out_of_range_bits(v) != 0) {
      const std::string value = std::is_signed_v<T>
                                    ? std::to_string(static_cast<long long>(v))
                                    : std::to_string(static_cast<unsigned long long>(v));
      throw Error(ErrorCode::kInvalidArgument,
                  "token id " + value + " at index " + std::to_string(k) +
                      " is out of range; expected 0 <= id < 2**32");
    }
  }
  throw Error(ErrorCode::kInvalidArgument, "token id out of range");  // unreachable
}

// Any other layout: convert a block at a time into a small buffer (it stays in L1) and stream it
// into SHA-256, so memory use does not grow with chunk_tokens or the prompt.
template <typename T, bool Swap>
std::size_t hash_converted(const unsigned char* base, std::size_t n_tokens,
                           std::ptrdiff_t stride, std::size_t chunk_tokens,
                           const std::uint8_t* prev, std::uint8_t* out) {
  constexpr std::size_t kBlock = 1024;
  std::uint32_t buf[kBlock];
  const std::size_t n_keys = n_tokens / chunk_tokens;
  Sha256 sha;
  std::size_t i = 0;
  for (std::size_t key = 0; key < n_keys; ++key) {
    sha.init();
    sha.update(prev, kKeyBytes);
    const std::size_t end = i + chunk_tokens;
    while (i < end) {
      const std::size_t count = std::min(kBlock, end - i);
      if (!convert<T, Swap>(base, stride, i, count, buf)) {
        throw_first_bad<T, Swap>(base, stride, i, count);
      }
      sha.update(buf, count * 4);
      i += count;
    }
    std::uint8_t* digest = out + key * kKeyBytes;
    sha.final(digest);
    prev = digest;
  }
  // The trailing partial chunk has no key, but a bad id there is still an error.
  while (i < n_tokens) {
    const std::size_t count = std::min(kBlock, n_tokens - i);
    if (!convert<T, Swap>(base, stride, i, count, buf)) {
      throw_first_bad<T, Swap>(base, stride, i, count);
    }
    i += count;
  }
  return n_keys;
}

template <typename T>
std::size_t dispatch_swap(bool swapped, const unsigned char* base, std::size_t n,
                          std::ptrdiff_t stride, std::size_t chunk, const std::uint8_t* prev,
                          std::uint8_t* out) {
  if (swapped && sizeof(T) > 1) return hash_converted<T, true>(base, n, stride, chunk, prev, out);
  return hash_converted<T, false>(base, n, stride, chunk, prev, out);
}

#endif  // KVORTEX_HAVE_OPENSSL

void require_available() {
  const char* reason = unavailable_reason();
  if (*reason != '\0') throw Error(ErrorCode::kInvalidArgument, reason);
}

}  // namespace

const char* unavailable_reason() noexcept {
#if KVORTEX_HAVE_OPENSSL
  return "";
#else
  return "built without OpenSSL libcrypto";
#endif
}

void seed(const std::uint8_t* ns, std::size_t ns_len, std::uint8_t out[kKeyBytes]) {
  require_available();
  if (ns_len > 0xFFFFFFFFu) {
    throw Error(ErrorCode::kInvalidArgument,
                "namespace is " + std::to_string(ns_len) + " bytes; expected < 2**32");
  }
#if KVORTEX_HAVE_OPENSSL
  const std::uint8_t len_le[4] = {
      static_cast<std::uint8_t>(ns_len), static_cast<std::uint8_t>(ns_len >> 8),
      static_cast<std::uint8_t>(ns_len >> 16), static_cast<std::uint8_t>(ns_len >> 24)};
  Sha256 sha;
  sha.init();
  sha.update(kSeedTag, sizeof kSeedTag);  // sizeof counts the NUL: it is part of the tag
  sha.update(len_le, sizeof len_le);
  if (ns_len > 0) sha.update(ns, ns_len);
  sha.final(out);
#else
  (void)ns;
  (void)out;
#endif
}

std::size_t hash_chunks(const void* base, std::size_t n_tokens, std::ptrdiff_t stride_bytes,
                        IntLayout layout, std::size_t chunk_tokens, const std::uint8_t* ns,
                        std::size_t ns_len, std::uint8_t* out) {
  require_available();
  if (chunk_tokens == 0) {
    throw Error(ErrorCode::kInvalidArgument, "chunk_tokens is 0; expected an int >= 1");
  }
  if (layout.width != 1 && layout.width != 2 && layout.width != 4 && layout.width != 8) {
    throw Error(ErrorCode::kInvalidType, "token element width is " + std::to_string(layout.width) +
                                             " bytes; expected 1, 2, 4 or 8");
  }
  if (n_tokens > 0 && base == nullptr) {
    throw Error(ErrorCode::kInvalidArgument, "token buffer is null");
  }
  std::uint8_t h0[kKeyBytes];
  seed(ns, ns_len, h0);
#if KVORTEX_HAVE_OPENSSL
  const auto* bytes = static_cast<const unsigned char*>(base);
  // The ids' bytes are little-endian when their order matches a little-endian host's.
  const bool data_le = kHostLittleEndian != layout.swapped;
  if (layout.width == 4 && !layout.is_signed && data_le && stride_bytes == 4) {
    return hash_le_u32_bytes(bytes, n_tokens, chunk_tokens, h0, out);
  }
  const bool sw = layout.swapped;
  const std::size_t n = n_tokens;
  const std::size_t c = chunk_tokens;
  const int width = static_cast<int>(layout.width);
  switch (layout.is_signed ? -width : width) {
    case 1: return dispatch_swap<std::uint8_t>(sw, bytes, n, stride_bytes, c, h0, out);
    case 2: return dispatch_swap<std::uint16_t>(sw, bytes, n, stride_bytes, c, h0, out);
    case 4: return dispatch_swap<std::uint32_t>(sw, bytes, n, stride_bytes, c, h0, out);
    case 8: return dispatch_swap<std::uint64_t>(sw, bytes, n, stride_bytes, c, h0, out);
    case -1: return dispatch_swap<std::int8_t>(sw, bytes, n, stride_bytes, c, h0, out);
    case -2: return dispatch_swap<std::int16_t>(sw, bytes, n, stride_bytes, c, h0, out);
    case -4: return dispatch_swap<std::int32_t>(sw, bytes, n, stride_bytes, c, h0, out);
    default: return dispatch_swap<std::int64_t>(sw, bytes, n, stride_bytes, c, h0, out);
  }
#else
  (void)base;
  (void)stride_bytes;
  (void)out;
  return 0;
#endif
}

std::size_t hash_chunks_u32(const std::uint32_t* tokens, std::size_t n_tokens,
                            std::size_t chunk_tokens, const std::uint8_t* ns, std::size_t ns_len,
                            std::uint8_t* out) {
  return hash_chunks(tokens, n_tokens, 4, IntLayout{4, false, false}, chunk_tokens, ns, ns_len,
                     out);
}

}  // namespace kvortex::hashing
