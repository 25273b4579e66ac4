// Two-thread microbenchmark of kvortex::SpscRing alone (no Python): items per second from a
// producer thread to a consumer thread, for several capacities and two waiting strategies:
//   spin:     try_push / try_pop in a loop with cpu_relax() when full / empty (the raw ring);
//   blocking: what the Python binding does without the GIL: poll briefly (spin_until), then
//             sleep on an EventCount; every push/pop notifies the other side's EventCount.
// Every run checks that the consumer saw 0..N-1 in order.
//
// Build: cmake -DKVORTEX_BUILD_BENCH=ON ... ; run: build/bench_queue [--quick] [--items N]
//        [--repeat R]
#include <kvortex/spsc_ring.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Result {
  double seconds;
  bool in_order;
};

Result run_spin(std::size_t capacity, std::uint64_t n) {
  kvortex::SpscRing<std::uint64_t> ring(capacity);
  bool in_order = true;
  const auto t0 = Clock::now();
  std::thread consumer([&] {
    std::uint64_t expected = 0, value = 0;
    while (expected < n) {
      if (ring.try_pop(value)) {
        in_order = in_order && value == expected;
        ++expected;
      } else {
        kvortex::cpu_relax();
      }
    }
  });
  for (std::uint64_t i = 0; i < n; ++i) {
    while (!ring.try_push(i)) kvortex::cpu_relax();
  }
  consumer.join();
  return {std::chrono::duration<double>(Clock::now() - t0).count(), in_order};
}

Result run_blocking(std::size_t capacity, std::uint64_t n) {
  kvortex::SpscRing<std::uint64_t> ring(capacity);
  kvortex::EventCount not_empty, not_full;
  // The binding's poll budget: 16 spins, then yields for up to 50 us.
  constexpr unsigned kSpins = 16;
  constexpr auto kYieldFor = std::chrono::microseconds(50);
  const auto forever = Clock::now() + std::chrono::hours(24);
  bool in_order = true;
  const auto t0 = Clock::now();
  std::thread consumer([&] {
    const auto has_item = [&] { return !ring.empty_approx(); };
    std::uint64_t expected = 0, value = 0;
    while (expected < n) {
      if (ring.try_pop(value)) {
        not_full.notify();
        in_order = in_order && value == expected;
        ++expected;
      } else if (!kvortex::spin_until(has_item, kSpins, Clock::now() + kYieldFor)) {
        not_empty.wait_until(has_item, forever);
      }
    }
  });
  const auto has_room = [&] { return !ring.full_approx(); };
  for (std::uint64_t i = 0; i < n; ++i) {
    while (!ring.try_push(i)) {
      if (!kvortex::spin_until(has_room, kSpins, Clock::now() + kYieldFor)) {
        not_full.wait_until(has_room, forever);
      }
    }
    not_empty.notify();
  }
  consumer.join();
  return {std::chrono::duration<double>(Clock::now() - t0).count(), in_order};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  std::uint64_t items = 0;
  int repeat = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--items") == 0 && i + 1 < argc) {
      items = std::strtoull(argv[++i], nullptr, 10);
    } else if (std::strcmp(argv[i], "--repeat") == 0 && i + 1 < argc) {
      repeat = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--items N] [--repeat R]\n", argv[0]);
      return 2;
    }
  }
  if (items == 0) items = quick ? 200000 : 2000000;
  if (repeat <= 0) repeat = quick ? 3 : 5;

  std::printf("# SpscRing<uint64_t>, 2 threads, %llu items per run, median of %d runs, %u cores\n",
              static_cast<unsigned long long>(items), repeat,
              std::thread::hardware_concurrency());
  std::printf("%-9s %9s %14s %10s %14s\n", "mode", "capacity", "items/s", "ns/item", "slowest");
  bool all_ok = true;
  for (const char* mode : {"spin", "blocking"}) {
    for (std::size_t capacity : {1, 7, 64, 1024, 65536}) {
      std::vector<double> rates;
      for (int r = 0; r < repeat; ++r) {
        const Result res = std::strcmp(mode, "spin") == 0 ? run_spin(capacity, items)
                                                           : run_blocking(capacity, items);
        all_ok = all_ok && res.in_order;
        rates.push_back(static_cast<double>(items) / res.seconds);
      }
      const double med = median(rates);
      const double worst = *std::min_element(rates.begin(), rates.end());
      std::printf("%-9s %9zu %14.0f %10.1f %14.0f\n", mode, capacity, med, 1e9 / med, worst);
    }
  }
  if (!all_ok) {
    std::fprintf(stderr, "ERROR: the consumer saw items out of order\n");
    return 1;
  }
  return 0;
}
