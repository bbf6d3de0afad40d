// Collective bus bandwidth on this machine's Gloo, next to memcpy, and
// redistribute() throughput. Run under tessera-launch:
//
//   build/release/bin/tessera-launch --nproc 4 -- build/release/bin/collectives_bench [MAX_MIB]
//
// MAX_MIB: the largest size S, MiB (default 256; sizes go from 4 KiB up by
// 4x). --help prints it.
//
// Sizes follow nccl-tests: S is the data size of the operation (the
// all_reduce buffer; all_gather's output; reduce_scatter's input; the
// all_to_all buffer; the broadcast buffer). Bus bandwidth normalises by
// the bytes a ring algorithm moves per rank, so numbers are comparable
// across rank counts: busbw = algbw * factor, factor = 2(n-1)/n for
// all_reduce, (n-1)/n for all_gather / reduce_scatter / all_to_all, 1 for
// broadcast. Prints a Markdown table (rank 0).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "command_line.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/redistribute.h"
#include "tessera/dist/rendezvous.h"

namespace td = tessera::dist;

namespace {

// Median seconds of `fn` over enough repetitions for ~0.5 s (3 to 50).
double time_op(td::ProcessGroup& world, const std::function<void()>& fn) {
  fn();  // warm-up: connections, allocations
  world.barrier().wait();
  std::vector<double> samples;
  tessera::Stopwatch total;
  // Every rank must run the same number of iterations: the stop decision
  // is taken on rank 0's clock and broadcast.
  while (samples.size() < 50) {
    world.barrier().wait();
    tessera::Stopwatch w;
    fn();
    double t = w.seconds();
    // Every rank agrees on the slowest rank's time.
    at::Tensor s = at::full({1}, t, at::kDouble);
    world.all_reduce(s, td::ReduceOp::kMax).wait();
    samples.push_back(s.item<double>());
    // Stop early on the same iteration everywhere: decide on rank 0's clock.
    at::Tensor elapsed = at::full({1}, total.seconds(), at::kDouble);
    world.broadcast(elapsed, 0).wait();
    if (samples.size() >= 3 && elapsed.item<double>() >= 0.5) break;
  }
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

double memcpy_seconds(int64_t bytes) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  std::memcpy(b.data(), a.data(), bytes);  // fault the pages in
  std::vector<double> samples;
  for (int i = 0; i < 5; ++i) {
    tessera::Stopwatch w;
    std::memcpy(b.data(), a.data(), bytes);
    samples.push_back(w.seconds());
  }
  std::sort(samples.begin(), samples.end());
  return samples[2];
}

std::string size_text(int64_t bytes) {
  char buf[32];
  if (bytes >= (1 << 20)) std::snprintf(buf, sizeof(buf), "%lld MiB", static_cast<long long>(bytes >> 20));
  else std::snprintf(buf, sizeof(buf), "%lld KiB", static_cast<long long>(bytes >> 10));
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t max_mib = 256;
  CLI::App app{
      "Collective bus bandwidth on Gloo next to memcpy, and redistribute() throughput "
      "(run under tessera-launch).",
      "collectives_bench"};
  app.option_defaults()->always_capture_default();
  app.add_option("MAX_MIB", max_mib, "the largest size S, MiB (sizes go from 4 KiB up by 4x)")
      ->check(tessera::examples::positive());
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  tessera::init_runtime();
  auto world = td::init_process_group();
  const int n = world->size(), me = world->rank();
  const int64_t max_bytes = max_mib << 20;

  if (me == 0) {
    std::printf("## Collectives: %d ranks, Gloo over loopback (busbw in GB/s; memcpy = one-thread memcpy of S)\n\n", n);
    std::printf("| S | memcpy GB/s | all_reduce | all_gather | reduce_scatter | all_to_all | broadcast | best busbw / memcpy |\n");
    std::printf("|---|---|---|---|---|---|---|---|\n");
  }
  for (int64_t bytes = 4096; bytes <= max_bytes; bytes *= 4) {
    const int64_t elems = bytes / 4 / n * n;  // divisible by n
    at::Tensor buf = at::ones({elems});
    at::Tensor part = at::ones({elems / n});
    at::Tensor out = at::empty({elems});
    at::Tensor part_out = at::empty({elems / n});
    const double S = static_cast<double>(elems) * 4;
    const double ring = static_cast<double>(n - 1) / n;
    struct Op { const char* name; double factor; std::function<void()> fn; };
    std::vector<Op> ops{
        {"all_reduce", 2 * ring, [&] { world->all_reduce(buf).wait(); }},
        {"all_gather", ring, [&] { world->all_gather(out, part).wait(); }},
        {"reduce_scatter", ring, [&] { world->reduce_scatter(part_out, buf).wait(); }},
        {"all_to_all", ring, [&] { world->all_to_all(out, buf).wait(); }},
        {"broadcast", 1.0, [&] { world->broadcast(buf, 0).wait(); }},
    };
    double mem = S / memcpy_seconds(static_cast<int64_t>(S)) / 1e9;
    std::vector<double> busbw;
    for (auto& op : ops) busbw.push_back(S / time_op(*world, op.fn) / 1e9 * op.factor);
    if (me == 0) {
      std::printf("| %s | %.2f |", size_text(static_cast<int64_t>(S)).c_str(), mem);
      for (double b : busbw) std::printf(" %.3f |", b);
      std::printf(" %.2f |\n", *std::max_element(busbw.begin(), busbw.end()) / mem);
      std::fflush(stdout);
    }
  }

  // redistribute(): rows-sharded -> columns-sharded, 4096 x 4096 fp32.
  const int64_t side = 4096;
  td::MeshShape mesh{{n}, {"tp"}};
  auto rows = td::Layout::sharded({side, side}, mesh, {td::Placement::Shard(0)});
  auto cols = td::Layout::sharded({side, side}, mesh, {td::Placement::Shard(1)});
  auto plan = td::plan_redistribute(rows, cols);
  at::Tensor local = at::randn(rows.local_shape(me));
  double t = time_op(*world, [&] { td::redistribute(*world, local, rows, cols, plan); });
  double moved = static_cast<double>(plan.moved_elements()) * 4;
  if (me == 0) {
    std::printf("\nredistribute %lldx%lld fp32 rows->columns over %d ranks: %.3f s, %.1f MiB crossed "
                "ranks, %.2f GB/s aggregate, %.2f GB/s per rank sent\n",
                static_cast<long long>(side), static_cast<long long>(side), n, t, moved / 1048576.0,
                moved / t / 1e9, moved / n / t / 1e9);
  }
  world->barrier().wait();
  return 0;
}
