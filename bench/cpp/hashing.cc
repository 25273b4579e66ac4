// Microbenchmark of the chunk-hashing core alone (kvortex::hashing, no Python): GB/s of token
// bytes (4 per token) for contiguous uint32 ids (hashed in place), int64 ids (converted with
// range checks) and strided uint32 ids, at several prompt lengths and chunk sizes.
//
//   cmake -S . -B build -DKVORTEX_BUILD_BENCH=ON && cmake --build build --target bench_hashing
//   build/bench_hashing [--quick]
#include <kvortex/hashing.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

namespace kh = kvortex::hashing;
using Clock = std::chrono::steady_clock;

template <typename Fn>
double median_seconds(int runs, Fn&& fn) {
  fn();  // warm-up: page faults, OpenSSL's CPU feature probe
  std::vector<double> samples;
  samples.reserve(static_cast<std::size_t>(runs));
  for (int r = 0; r < runs; ++r) {
    const auto t0 = Clock::now();
    fn();
    samples.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

std::uint32_t pseudo_id(std::size_t i) {
  return static_cast<std::uint32_t>((i * 2654435761u) % 128256u);  // a Llama-3-sized vocab
}

void report(const char* layout, std::size_t n, std::size_t chunk, double seconds) {
  std::printf("%-14s tokens=%-7zu chunk=%-4zu median %8.1f us  %5.2f GB/s  (%zu keys)\n", layout,
              n, chunk, seconds * 1e6, static_cast<double>(n) * 4 / seconds / 1e9, n / chunk);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const int runs = quick ? 5 : 51;
  const char* reason = kh::unavailable_reason();
  if (*reason != '\0') {
    std::printf("native hashing unavailable: %s\n", reason);
    return 0;
  }
  const std::vector<std::size_t> sizes =
      quick ? std::vector<std::size_t>{4096} : std::vector<std::size_t>{4096, 32768, 131072};
  const std::uint8_t ns[] = {'b', 'e', 'n', 'c', 'h'};
  for (std::size_t chunk : {std::size_t{256}, std::size_t{16}}) {
    for (std::size_t n : sizes) {
      std::vector<std::uint32_t> u32(n);
      std::vector<std::int64_t> i64(n);
      std::vector<std::uint32_t> spread(2 * n);
      for (std::size_t i = 0; i < n; ++i) {
        u32[i] = pseudo_id(i);
        i64[i] = pseudo_id(i);
        spread[2 * i] = pseudo_id(i);
      }
      std::vector<std::uint8_t> keys((n / chunk) * kh::kKeyBytes);
      report("u32 in place", n, chunk, median_seconds(runs, [&] {
               kh::hash_chunks_u32(u32.data(), n, chunk, ns, sizeof ns, keys.data());
             }));
      report("i64 converted", n, chunk, median_seconds(runs, [&] {
               kh::hash_chunks(i64.data(), n, 8, kh::IntLayout{8, true, false}, chunk, ns,
                               sizeof ns, keys.data());
             }));
      report("u32 stride 2", n, chunk, median_seconds(runs, [&] {
               kh::hash_chunks(spread.data(), n, 8, kh::IntLayout{4, false, false}, chunk, ns,
                               sizeof ns, keys.data());
             }));
    }
  }
  return 0;
}
