// C++ microbenchmark of kvortex::SlabPool, without Python: what the core itself costs.
//
// Cases: alloc+free pairs on one thread; a burst (alloc every slot, then free them all);
// memory() (what a Python view() costs in the core: a checked lookup plus a shared_ptr copy);
// alloc+free pairs on 2 and 4 threads sharing one pool (mutex contention); creating and
// destroying a 16 GiB pool. Each case is timed in batches; median and p99 of the per-op time.
//
// Build: ./scripts/dev-build.sh -DKVORTEX_BUILD_BENCH=ON ; run: build/bench_pool [--quick]
#include <kvortex/slab_pool.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Result {
  double median_ns;
  double p99_ns;
};

// Runs `batch` `repeat` times (after one warm-up); returns ns per op, ops = ops_per_batch.
Result time_batches(const std::function<void()>& batch, int repeat, double ops_per_batch) {
  batch();
  std::vector<double> ns;
  ns.reserve(static_cast<std::size_t>(repeat));
  for (int i = 0; i < repeat; ++i) {
    const auto t0 = Clock::now();
    batch();
    const auto t1 = Clock::now();
    ns.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / ops_per_batch);
  }
  std::sort(ns.begin(), ns.end());
  const std::size_t n = ns.size();
  const double median = n % 2 ? ns[n / 2] : (ns[n / 2 - 1] + ns[n / 2]) / 2;
  const std::size_t p99_index = std::min(n - 1, static_cast<std::size_t>(0.99 * (n - 1) + 0.5));
  return {median, ns[p99_index]};
}

void print(const char* name, const Result& r) {
  std::printf("%-22s %10.1f ns %10.1f ns %12.2f Mops/s\n", name, r.median_ns, r.p99_ns,
              1e3 / r.median_ns);
}

// Keeps the optimiser from discarding results.
volatile std::uintptr_t g_sink = 0;

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const int repeat = quick ? 5 : 25;
  const int pairs = quick ? 100'000 : 1'000'000;
  constexpr std::int64_t kSlots = 1024;

  std::printf("# kvortex::SlabPool microbenchmark (%s)\n", quick ? "quick" : "full");
  std::printf("%-22s %13s %13s %19s\n", "case", "median/op", "p99/op", "throughput");

  kvortex::SlabPool pool(4096, kSlots, std::nullopt, kvortex::HugePages::kAuto);
  std::vector<std::int64_t> held;
  for (int i = 0; i < kSlots / 2; ++i) held.push_back(pool.alloc());

  print("alloc+free (pair)", time_batches(
                                 [&] {
                                   for (int i = 0; i < pairs; ++i) pool.free(pool.alloc());
                                 },
                                 repeat, pairs));

  print("memory(slot)", time_batches(
                            [&] {
                              for (int i = 0; i < pairs; ++i) {
                                g_sink = reinterpret_cast<std::uintptr_t>(
                                    pool.memory(held[static_cast<std::size_t>(i) % held.size()])
                                        .get());
                              }
                            },
                            repeat, pairs));
  for (std::int64_t s : held) pool.free(s);

  std::vector<std::int64_t> burst(kSlots);
  const int bursts = std::max(1, pairs / static_cast<int>(kSlots));
  print("burst alloc/free (op)", time_batches(
                                     [&] {
                                       for (int b = 0; b < bursts; ++b) {
                                         for (auto& s : burst) s = pool.alloc();
                                         for (auto s : burst) pool.free(s);
                                       }
                                     },
                                     repeat, 2.0 * bursts * kSlots));

  for (int threads : {2, 4}) {
    const int per_thread = pairs / threads;
    const Result r = time_batches(
        [&] {
          std::vector<std::thread> workers;
          for (int t = 0; t < threads; ++t) {
            workers.emplace_back([&] {
              for (int i = 0; i < per_thread; ++i) pool.free(pool.alloc());
            });
          }
          for (auto& w : workers) w.join();
        },
        repeat, static_cast<double>(per_thread) * threads);
    print((std::to_string(threads) + " threads (pair)").c_str(), r);
  }

  const Result create = time_batches(
      [] {
        kvortex::SlabPool big(32 << 20, 512, std::nullopt, kvortex::HugePages::kAuto);
        g_sink = big.base_address();
      },
      repeat, 1);
  std::printf("%-22s %10.1f us %10.1f us\n", "create+close 16 GiB", create.median_ns / 1e3,
              create.p99_ns / 1e3);
  return 0;
}
