#include "tessera/sim/calibration.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>

#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "util.h"

namespace tessera::sim {

namespace {

class ThreadScope {
 public:
  explicit ThreadScope(int threads) : previous_(at::get_num_threads()) {
    if (threads != previous_) at::set_num_threads(threads);
  }
  ~ThreadScope() {
    if (at::get_num_threads() != previous_) at::set_num_threads(previous_);
  }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int previous_;
};

int thread_count(int requested, const dist::ProcessGroup& world) {
  return requested > 0 ? requested : std::max(1, usable_cores() / world.size());
}

using detail::median;

// The slowest rank's value.
double world_max(dist::ProcessGroup& world, double value) {
  at::Tensor t = at::full({1}, value, at::kDouble);
  world.all_reduce(t, dist::ReduceOp::kMax).wait();
  return t.item<double>();
}

// Rank 0's value on every rank.
double from_rank0(dist::ProcessGroup& world, double value) {
  at::Tensor t = at::full({1}, value, at::kDouble);
  world.broadcast(t, 0).wait();
  return t.item<double>();
}

// The mean over ranks.
double world_mean(dist::ProcessGroup& world, double value) {
  at::Tensor t = at::full({1}, value, at::kDouble);
  world.all_reduce(t, dist::ReduceOp::kSum).wait();
  return t.item<double>() / world.size();
}

// Median over repetitions of fn()'s time (seconds), each repetition started
// after a barrier; repetitions as in CollectiveSweepOptions. Without
// `compute`, the slowest rank's time; with it, every rank runs compute()
// first and the mean over ranks of their own fn() times counts.
double time_collective(dist::ProcessGroup& world, const std::function<void()>& fn, int min_repeats,
                       int max_repeats, double target_seconds,
                       const std::function<void()>& compute = nullptr) {
  fn();  // warm-up: connections, allocations
  std::vector<double> samples;
  Stopwatch total;
  while (static_cast<int>(samples.size()) < max_repeats) {
    world.barrier().wait();
    if (compute) compute();
    Stopwatch watch;
    fn();
    const double seconds = watch.seconds();
    samples.push_back(compute ? world_mean(world, seconds) : world_max(world, seconds));
    if (static_cast<int>(samples.size()) >= min_repeats &&
        from_rank0(world, total.seconds()) >= target_seconds) {
      break;
    }
  }
  return median(samples);
}

}  // namespace

std::vector<Measurement> measure_collectives(dist::ProcessGroup& world,
                                             const CollectiveSweepOptions& options) {
  TESSERA_CHECK(options.min_bytes >= 4 && options.max_bytes >= options.min_bytes &&
                    options.size_step > 1 && options.min_repeats >= 1 &&
                    options.max_repeats >= options.min_repeats,
                InvalidArgument,
                "measure_collectives: need 4 <= min_bytes <= max_bytes, size_step > 1 and "
                "1 <= min_repeats <= max_repeats");
  const int world_size = world.size();
  const int n = options.group_size == 0 ? world_size : options.group_size;
  TESSERA_CHECK(n >= 1 && world_size % n == 0, InvalidArgument, "measure_collectives: group_size ",
                options.group_size, " does not divide the world of ", world_size);
  ThreadScope threads(thread_count(options.threads, world));
  std::shared_ptr<dist::ProcessGroup> group;
  if (n == world_size) {
    // Non-owning: the caller's world outlives this call.
    group = std::shared_ptr<dist::ProcessGroup>(&world, [](dist::ProcessGroup*) {});
  } else {
    for (int first = 0; first < world_size; first += n) {
      std::vector<int> ranks;
      for (int r = first; r < first + n; ++r) ranks.push_back(r);
      auto sub = world.new_subgroup(ranks, world.name() + "/calibration" + std::to_string(first));
      if (sub) group = sub;
    }
  }
  // The compute before each call (compute_ms): square fp32 GEMMs, as many
  // as take about compute_ms on this rank alone.
  std::function<void()> compute;
  at::Tensor ga, gb, gc;
  if (options.compute_ms > 0) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(17 + world.rank());
    ga = at::randn({256, 256}, gen);
    gb = at::randn({256, 256}, gen);
    gc = at::empty({256, 256});
    at::mm_out(gc, ga, gb);  // warm-up
    Stopwatch probe;
    for (int i = 0; i < 5; ++i) at::mm_out(gc, ga, gb);
    const double one = probe.seconds() / 5;
    const int reps = static_cast<int>(
        std::max(1.0, std::round(options.compute_ms * 1e-3 / std::max(one, 1e-9))));
    compute = [&ga, &gb, &gc, reps] {
      for (int i = 0; i < reps; ++i) at::mm_out(gc, ga, gb);
    };
  }
  std::vector<Measurement> out;
  for (CollectiveKind op : options.ops) {
    TESSERA_CHECK(op != CollectiveKind::kSendRecv, InvalidArgument,
                  "measure_collectives: send_recv is not timed");
    for (double size = static_cast<double>(options.min_bytes);
         size <= static_cast<double>(options.max_bytes) * (1 + 1e-9); size *= options.size_step) {
      // fp32 elements, a multiple of the group size.
      int64_t elems = std::max<int64_t>(n, static_cast<int64_t>(size) / 4 / n * n);
      at::Tensor full = at::ones({elems});
      at::Tensor part = at::ones({elems / n});
      at::Tensor out_full = at::empty({elems});
      at::Tensor out_part = at::empty({elems / n});
      std::function<void()> fn;
      switch (op) {
        case CollectiveKind::kAllReduce:
          fn = [&] { group->all_reduce(full).wait(); };
          break;
        case CollectiveKind::kAllGather:
          fn = [&] { group->all_gather(out_full, part).wait(); };
          break;
        case CollectiveKind::kReduceScatter:
          fn = [&] { group->reduce_scatter(out_part, full).wait(); };
          break;
        case CollectiveKind::kAllToAll:
          fn = [&] { group->all_to_all(out_full, full).wait(); };
          break;
        case CollectiveKind::kBroadcast:
          fn = [&] { group->broadcast(full, 0).wait(); };
          break;
        case CollectiveKind::kSendRecv:
          break;
      }
      const double seconds = time_collective(world, fn, options.min_repeats, options.max_repeats,
                                             options.target_seconds, compute);
      Measurement m;
      m.op = op;
      m.shape = GroupShape{n, 1, n};
      m.bytes = elems * 4;
      m.time = Microseconds(seconds * 1e6);
      m.origin = "measure_collectives(" + std::to_string(world_size) + " ranks, groups of " +
                 std::to_string(n) +
                 (options.compute_ms > 0
                      ? ", after " + detail::format("%g", options.compute_ms) + " ms of compute"
                      : std::string()) +
                 ")";
      out.push_back(m);
      TESSERA_LOG(Debug, "sim") << collective_kind_name(op) << " " << m.bytes << " B over " << n
                                << " ranks: " << m.time.count() << " us";
    }
  }
  return out;
}

std::vector<OverlapSample> measure_overlap(dist::ProcessGroup& world,
                                           const OverlapSweepOptions& options) {
  TESSERA_CHECK(!options.gemm_sizes.empty() && !options.comm_bytes.empty() &&
                    options.repeats >= 1 && options.gemm_ms > 0,
                InvalidArgument,
                "measure_overlap: need GEMM sizes, comm sizes, repeats >= 1 and gemm_ms > 0");
  ThreadScope threads(thread_count(options.threads, world));
  std::vector<OverlapSample> samples;
  for (int64_t n : options.gemm_sizes) {
    TESSERA_CHECK(n >= 1, InvalidArgument, "measure_overlap: GEMM size ", n, " < 1");
    auto gen = at::make_generator<at::CPUGeneratorImpl>(n);
    at::Tensor a = at::randn({n, n}, gen), b = at::randn({n, n}, gen);
    at::Tensor c = at::empty({n, n});
    at::mm_out(c, a, b);  // warm-up
    // Repetitions for about gemm_ms, decided on rank 0.
    Stopwatch probe;
    for (int i = 0; i < 3; ++i) at::mm_out(c, a, b);
    const double one = probe.seconds() / 3;
    const int reps = static_cast<int>(
        from_rank0(world, std::max(1.0, std::ceil(options.gemm_ms * 1e-3 / std::max(one, 1e-9)))));
    auto gemms = [&] {
      for (int i = 0; i < reps; ++i) at::mm_out(c, a, b);
    };
    std::vector<double> alone;
    for (int r = 0; r < options.repeats; ++r) {
      world.barrier().wait();
      Stopwatch w;
      gemms();
      alone.push_back(w.seconds());
    }
    const double t_alone = median(alone);
    for (int64_t bytes : options.comm_bytes) {
      at::Tensor buf = at::ones({std::max<int64_t>(1, bytes / 4)});
      const double t_comm = time_collective(
          world, [&] { world.all_reduce(buf).wait(); }, options.repeats, options.repeats, 0);
      std::vector<double> with;
      for (int r = 0; r < options.repeats; ++r) {
        world.barrier().wait();
        dist::Work work = world.all_reduce(buf);
        Stopwatch w;
        gemms();
        with.push_back(w.seconds());
        work.wait();
      }
      const double t_with = median(with);
      OverlapSample s;
      s.features.compute_kind = "gemm";
      s.features.compute_flops = 2.0 * static_cast<double>(n) * n * n * reps;
      s.features.compute_duration_us = t_alone * 1e6;
      s.features.comm_kind = CollectiveKind::kAllReduce;
      s.features.comm_bytes = static_cast<double>(buf.numel() * 4);
      s.features.comm_ranks = world.size();
      s.features.concurrent_comms = 1;
      s.features.comm_threads = 2;
      s.features.overlap_fraction = std::min(1.0, t_comm / t_with);
      s.slowdown = t_with / t_alone;
      s.origin = "measure_overlap(gemm " + std::to_string(n) + ", " + std::to_string(bytes) +
                 " B, rank " + std::to_string(world.rank()) + ")";
      samples.push_back(s);
    }
  }
  return samples;
}

HostSharing measure_host_sharing(dist::ProcessGroup& world, const HostSharingOptions& options) {
  TESSERA_CHECK(options.repeats >= 1, InvalidArgument,
                "measure_host_sharing: repeats must be >= 1");
  ThreadScope threads(thread_count(options.threads, world));
  TrainingJobConfig config = options.job.with_layout(ParallelLayout{});
  config.zero1 = false;
  auto solo = dist::ProcessGroup::create_placeholder(0, 1);
  auto job = TrainingJob::create(config, solo);
  const nn::TokenDataset::Batch batch = job->batch(0);
  job->step(batch);  // warm-up
  HostSharing out;
  double alone = 0;
  const int n = world.size();
  for (int k = 1; k <= n; ++k) {
    std::vector<double> means, skews;
    for (int r = 0; r < options.repeats; ++r) {
      world.barrier().wait();
      // Every rank's time in its own slot (0 for the ranks that wait).
      at::Tensor times = at::zeros({n}, at::kDouble);
      if (world.rank() < k) {
        Stopwatch w;
        job->step(batch);
        times[world.rank()] = w.seconds();
      }
      world.all_reduce(times, dist::ReduceOp::kSum).wait();
      const double* p = times.data_ptr<double>();
      double sum = 0, slowest = 0;
      for (int i = 0; i < k; ++i) {
        sum += p[i];
        slowest = std::max(slowest, p[i]);
      }
      const double mean = sum / k;
      means.push_back(mean);
      skews.push_back(mean > 0 ? slowest / mean - 1 : 0.0);
    }
    const double t = median(means);
    if (k == 1) alone = t;
    out.compute_slowdown.push_back(t / alone);
    out.sync_skew.push_back(k == 1 ? 0.0 : median(skews));
  }
  return out;
}

}  // namespace tessera::sim
