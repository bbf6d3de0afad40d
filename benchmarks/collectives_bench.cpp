// Collective bus bandwidth on this machine's Gloo, next to memcpy, and
// redistribute() throughput. Run under tessera-launch:
//
//   build/release/bin/tessera-launch --nproc 4 -- build/release/bin/collectives_bench [MAX_MIB]
//       [--reps 5] [--warmup 1] [--quick] [--json FILE]
//
// MAX_MIB: the largest size S, MiB (default 256; sizes go from 4 KiB up by
// 4x; --quick: 1 MiB). --help prints every option.
//
// Sizes follow nccl-tests: S is the data size of the operation (the
// all_reduce buffer; all_gather's output; reduce_scatter's input; the
// all_to_all buffer; the broadcast buffer). Bus bandwidth normalises by
// the bytes a ring algorithm moves per rank, so numbers are comparable
// across rank counts: busbw = algbw * factor, factor = 2(n-1)/n for
// all_reduce, (n-1)/n for all_gather / reduce_scatter / all_to_all, 1 for
// broadcast. Every operation runs --warmup untimed then --reps timed
// repetitions (the slowest rank's time each); the memcpy anchor (one
// thread copying S bytes) is timed the same number of times in the same
// run. Prints a Markdown table of medians (rank 0); --json writes every
// repetition (series "<op>.<bytes>" in seconds, "memcpy.<bytes>" likewise).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench_report.h"
#include "command_line.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/redistribute.h"
#include "tessera/dist/rendezvous.h"

namespace td = tessera::dist;

namespace {

// Seconds of `fn` on the slowest rank, every timed repetition.
std::vector<double> time_op(td::ProcessGroup& world, const std::function<void()>& fn,
                            const tessera::bench::RepeatOptions& rep) {
  for (int i = 0; i < rep.warmup; ++i) fn();  // connections, allocations
  std::vector<double> samples;
  for (int i = 0; i < rep.reps; ++i) {
    world.barrier().wait();
    tessera::Stopwatch w;
    fn();
    at::Tensor s = at::full({1}, w.seconds(), at::kDouble);
    world.all_reduce(s, td::ReduceOp::kMax).wait();
    samples.push_back(s.item<double>());
  }
  return samples;
}

std::vector<double> memcpy_seconds(int64_t bytes, const tessera::bench::RepeatOptions& rep) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  std::memcpy(b.data(), a.data(), bytes);  // fault the pages in
  for (int i = 0; i < rep.warmup; ++i) std::memcpy(b.data(), a.data(), bytes);
  std::vector<double> samples;
  for (int i = 0; i < rep.reps; ++i) {
    tessera::Stopwatch w;
    std::memcpy(b.data(), a.data(), bytes);
    samples.push_back(w.seconds());
  }
  return samples;
}

std::string size_text(int64_t bytes) {
  char buf[32];
  if (bytes >= (1 << 20))
    std::snprintf(buf, sizeof(buf), "%lld MiB", static_cast<long long>(bytes >> 20));
  else
    std::snprintf(buf, sizeof(buf), "%lld KiB", static_cast<long long>(bytes >> 10));
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t max_mib = 256;
  tessera::bench::RepeatOptions rep;
  CLI::App app{
      "Collective bus bandwidth on Gloo next to memcpy, and redistribute() throughput "
      "(run under tessera-launch).",
      "collectives_bench"};
  app.option_defaults()->always_capture_default();
  app.add_option("MAX_MIB", max_mib, "the largest size S, MiB (sizes go from 4 KiB up by 4x)")
      ->check(tessera::examples::positive());
  tessera::bench::add_repeat_options(app, rep);
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  if (rep.quick) max_mib = std::min<int64_t>(max_mib, 1);
  tessera::init_runtime();
  auto world = td::init_process_group();
  const int n = world->size(), me = world->rank();
  const int64_t max_bytes = max_mib << 20;
  tessera::bench::Report report("collectives_np" + std::to_string(n), argc, argv, rep.quick);
  report.config() = {{"ranks", n},
                     {"backend", "gloo"},
                     {"transport", "TCP over loopback"},
                     {"max_bytes", max_bytes},
                     {"reps", rep.reps},
                     {"warmup", rep.warmup}};

  if (me == 0) {
    std::printf(
        "## Collectives: %d ranks, Gloo over loopback (busbw in GB/s, median of %d; memcpy = "
        "one-thread memcpy of S)\n\n",
        n, rep.reps);
    std::printf(
        "| S | memcpy GB/s | all_reduce | all_gather | reduce_scatter | all_to_all | broadcast | "
        "best busbw / memcpy |\n");
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
    struct Op {
      const char* name;
      double factor;
      std::function<void()> fn;
    };
    std::vector<Op> ops{
        {"all_reduce", 2 * ring, [&] { world->all_reduce(buf).wait(); }},
        {"all_gather", ring, [&] { world->all_gather(out, part).wait(); }},
        {"reduce_scatter", ring, [&] { world->reduce_scatter(part_out, buf).wait(); }},
        {"all_to_all", ring, [&] { world->all_to_all(out, buf).wait(); }},
        {"broadcast", 1.0, [&] { world->broadcast(buf, 0).wait(); }},
    };
    const int64_t size = static_cast<int64_t>(S);
    const std::vector<double> mem = memcpy_seconds(size, rep);
    report.add_series("memcpy." + std::to_string(size), "s", mem,
                      {{"op", "memcpy"}, {"bytes", size}});
    const double mem_gbs = S / tessera::bench::median(mem) / 1e9;
    std::vector<double> busbw;
    for (auto& op : ops) {
      const std::vector<double> t = time_op(*world, op.fn, rep);
      report.add_series(std::string(op.name) + "." + std::to_string(size), "s", t,
                        {{"op", op.name}, {"bytes", size}, {"busbw_factor", op.factor}});
      busbw.push_back(S / tessera::bench::median(t) / 1e9 * op.factor);
    }
    if (me == 0) {
      std::printf("| %s | %.2f |", size_text(size).c_str(), mem_gbs);
      for (double b : busbw) std::printf(" %.3f |", b);
      std::printf(" %.2f |\n", *std::max_element(busbw.begin(), busbw.end()) / mem_gbs);
      std::fflush(stdout);
    }
  }

  // redistribute(): rows-sharded -> columns-sharded, 4096 x 4096 fp32
  // (512 x 512 with --quick).
  const int64_t side = rep.quick ? 512 : 4096;
  td::MeshShape mesh{{n}, {"tp"}};
  auto rows = td::Layout::sharded({side, side}, mesh, {td::Placement::Shard(0)});
  auto cols = td::Layout::sharded({side, side}, mesh, {td::Placement::Shard(1)});
  auto plan = td::plan_redistribute(rows, cols);
  at::Tensor local = at::randn(rows.local_shape(me));
  const std::vector<double> t = time_op(
      *world, [&] { td::redistribute(*world, local, rows, cols, plan); }, rep);
  const double moved = static_cast<double>(plan.moved_elements()) * 4;
  report.add_series("redistribute", "s", t, {{"op", "redistribute"}, {"side", side}});
  report.facts()["redistribute_moved_bytes"] = moved;
  if (me == 0) {
    const double m = tessera::bench::median(t);
    std::printf(
        "\nredistribute %lldx%lld fp32 rows->columns over %d ranks: %.3f s, %.1f MiB crossed "
        "ranks, %.2f GB/s aggregate, %.2f GB/s per rank sent\n",
        static_cast<long long>(side), static_cast<long long>(side), n, m, moved / 1048576.0,
        moved / m / 1e9, moved / n / m / 1e9);
    report.write(rep.json);
  }
  world->barrier().wait();
  return 0;
}
