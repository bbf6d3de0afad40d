#include "tessera/sim/calibration.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "host_cpu.h"
#include "json_reader.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "util.h"

#include <unistd.h>

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

// Square fp32 GEMMs, as many as take about `ms` on this rank alone: the
// compute of the collective calibration (--compute-ms).
std::function<void()> gemm_segment(int rank, double ms) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17 + rank);
  at::Tensor a = at::randn({256, 256}, gen);
  at::Tensor b = at::randn({256, 256}, gen);
  at::Tensor c = at::empty({256, 256});
  at::mm_out(c, a, b);  // warm-up
  Stopwatch probe;
  for (int i = 0; i < 5; ++i) at::mm_out(c, a, b);
  const double one = probe.seconds() / 5;
  const int reps = static_cast<int>(std::max(1.0, std::round(ms * 1e-3 / std::max(one, 1e-9))));
  return [a, b, c, reps]() mutable {
    for (int i = 0; i < reps; ++i) at::mm_out(c, a, b);
  };
}

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

// Seconds on the host's steady clock (CLOCK_MONOTONIC on Linux: one clock
// for every process of the host).
double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A 64-bit FNV-1a hash of this boot of this host (Linux's boot_id; the
// host name where that cannot be read).
int64_t host_boot_hash() {
  std::string id;
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  if (!(in >> id)) {
    char name[256] = {};
    if (gethostname(name, sizeof(name) - 1) == 0) id = name;
  }
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : id) h = (h ^ c) * 1099511628211ULL;
  return static_cast<int64_t>(h >> 1);
}

// Timing a collective from the last member's issue compares the ranks'
// clocks: they must be one host's.
void require_one_host(dist::ProcessGroup& world, const char* what) {
  const int64_t mine = host_boot_hash();
  at::Tensor t = at::full({2}, mine, at::kLong);
  t[1] = -mine;
  world.all_reduce(t, dist::ReduceOp::kMax).wait();
  TESSERA_CHECK(t[0].item<int64_t>() == -t[1].item<int64_t>(), InvalidArgument, what,
                ": the ranks run on more than one host; timing collectives after compute "
                "compares the ranks' clocks, so every rank must share one host");
}

// Two series of every rank (each rank's of the same length m) on every
// rank, rank-major ([rank * m + i]), in one reduction.
std::pair<std::vector<double>, std::vector<double>> gather_series(dist::ProcessGroup& world,
                                                                  const std::vector<double>& a,
                                                                  const std::vector<double>& b) {
  TESSERA_CHECK(a.size() == b.size(), Internal, "gather_series: series of ", a.size(), " and ",
                b.size(), " values");
  const int64_t m = static_cast<int64_t>(a.size());
  const int64_t slots = static_cast<int64_t>(world.size()) * m;
  at::Tensor t = at::zeros({2 * slots}, at::kDouble);
  double* mine = t.data_ptr<double>() + static_cast<int64_t>(world.rank()) * m;
  std::copy(a.begin(), a.end(), mine);
  std::copy(b.begin(), b.end(), mine + slots);
  world.all_reduce(t, dist::ReduceOp::kSum).wait();
  const double* all = t.data_ptr<double>();
  return {std::vector<double>(all, all + slots), std::vector<double>(all + slots, all + 2 * slots)};
}

// Median over repetitions of fn()'s time (seconds), repetitions as in
// CollectiveSweepOptions; fn() runs a collective over consecutive groups of
// group_size ranks.
//
// Without `compute`: each repetition starts after a barrier and the slowest
// rank's time counts (collectives back to back, as nccl-tests times them).
//
// With it: the ranks loop compute(), fn(), compute(), fn(), ... with no
// other synchronisation between them, as a training step meets its
// collectives; each rank records when it issued fn() and when fn()
// returned, and a repetition counts the mean over ranks of the time from
// the last issue in the rank's group to the rank's return
// (after_last_arrival): the transfer, the wake-up of ranks that blocked
// included, without the wait for a late member (the simulator's straggler
// terms carry that, Topology::host_sync_*). Nothing else may run between
// the calls: a barrier or a reduction of the samples after each call (as
// the back-to-back timing does) lines the ranks up before their compute
// and changes what the next call meets (docs/sim.md, Calibration). The
// count of repetitions is fixed up front from one timed repetition on rank 0.
double time_collective(dist::ProcessGroup& world, const std::function<void()>& fn, int min_repeats,
                       int max_repeats, double target_seconds, int group_size,
                       const std::function<void()>& compute = nullptr) {
  fn();  // warm-up: connections, allocations
  if (compute) {
    world.barrier().wait();
    Stopwatch one;
    compute();
    fn();
    const double per_repeat = from_rank0(world, one.seconds());
    const int repeats =
        std::clamp(static_cast<int>(std::ceil(target_seconds / std::max(per_repeat, 1e-6))),
                   min_repeats, max_repeats);
    // Seconds since rank 0's reading of the clock.
    const double origin = from_rank0(world, steady_seconds());
    std::vector<double> issue(static_cast<size_t>(repeats)), end(static_cast<size_t>(repeats));
    for (size_t r = 0; r < issue.size(); ++r) {
      compute();
      issue[r] = steady_seconds() - origin;
      fn();
      end[r] = steady_seconds() - origin;
    }
    const auto [issues, ends] = gather_series(world, issue, end);
    return median(after_last_arrival(issues, ends, world.size(), group_size));
  }
  std::vector<double> samples;
  Stopwatch total;
  while (static_cast<int>(samples.size()) < max_repeats) {
    world.barrier().wait();
    Stopwatch watch;
    fn();
    samples.push_back(world_max(world, watch.seconds()));
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
  // The compute before each call (compute_ms).
  std::function<void()> compute;
  if (options.compute_ms > 0) {
    require_one_host(world, "measure_collectives with compute_ms");
    compute = gemm_segment(world.rank(), options.compute_ms);
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
                                             options.target_seconds, n, compute);
      Measurement m;
      m.op = op;
      m.shape = GroupShape{n, 1, n};
      m.bytes = elems * 4;
      m.time = Microseconds(seconds * 1e6);
      m.origin = "measure_collectives(" + std::to_string(world_size) + " ranks, groups of " +
                 std::to_string(n) +
                 (options.compute_ms > 0 ? ", after " + detail::format("%g", options.compute_ms) +
                                               " ms of compute, from the last member's issue"
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
          world, [&] { world.all_reduce(buf).wait(); }, options.repeats, options.repeats, 0,
          world.size());
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

namespace {

// Turns a placeholder group's collectives into synchronisation points of
// the real ranks: every wait for a placeholder result also waits, when
// enabled, for an all_reduce of one number over `group`, so the ranks
// leave each collective together as they would in the real job. With
// `sized`, that all_reduce has the call's size instead (fp32, at least one
// element), so the ranks also pay the call's transfer as the real job does,
// and each synchronisation's issue time and the compute before it are
// recorded.
class SyncAtCollectives : public dist::CollectiveObserver {
 public:
  explicit SyncAtCollectives(dist::ProcessGroup& world) : group(&world) {}
  void on_issue(const dist::CollectiveCall&) override {}
  void on_complete(const dist::CollectiveCall& call) override {
    ++completed;
    if (!enabled) return;
    const double segment = since_.seconds();
    if (sized) {
      issues.push_back(steady_seconds());
      segments.push_back(segment);
    }
    Stopwatch w;
    group->all_reduce(sized ? buffer(call.bytes) : token_).wait();
    const double wait = w.seconds();
    waited += wait;
    samples.emplace_back(segment, wait);
    since_ = Stopwatch();
  }
  // Starts a step: the first segment is timed from here.
  void start(bool in_step) {
    enabled = in_step;
    waited = 0;
    since_ = Stopwatch();
  }
  dist::ProcessGroup* group;  // the ranks that synchronise (the world by default)
  bool enabled = false;
  int completed = 0;
  double waited = 0;  // seconds in the synchronising all_reduces of this step
  // (compute seconds since the previous synchronisation, seconds waited)
  // of every synchronisation while enabled, until cleared.
  std::vector<std::pair<double, double>> samples;
  bool sized = false;
  // With `sized`, per synchronisation until cleared: when it was issued
  // (steady_seconds) and the compute seconds before it.
  std::vector<double> issues;
  std::vector<double> segments;

 private:
  at::Tensor& buffer(int64_t bytes) {
    const int64_t elems = std::max<int64_t>(1, bytes / 4);
    auto it = buffers_.find(elems);
    if (it == buffers_.end()) it = buffers_.emplace(elems, at::zeros({elems}, at::kFloat)).first;
    return it->second;
  }
  at::Tensor token_ = at::zeros({1}, at::kFloat);
  std::map<int64_t, at::Tensor> buffers_;  // by element count
  Stopwatch since_;
};

// Least-squares fit of wait = a + b x segment: (a, b); (mean, 0) when the
// segments do not vary.
std::pair<double, double> wait_fit(const std::vector<std::pair<double, double>>& samples) {
  const double n = static_cast<double>(samples.size());
  if (samples.empty()) return {0.0, 0.0};
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (const auto& [x, y] : samples) {
    sx += x;
    sy += y;
    sxx += x * x;
    sxy += x * y;
  }
  const double var = n * sxx - sx * sx;
  if (var <= 1e-18 * n * n) return {sy / n, 0.0};
  const double b = (n * sxy - sx * sy) / var;
  return {(sy - b * sx) / n, b};
}

// The share of the host's CPU time that processes other than the world's
// ranks used between two snapshots every rank took at about the same
// moments (rank 0's view of the host).
double world_foreign_share(dist::ProcessGroup& world, const detail::CpuSnapshot& a,
                           const detail::CpuSnapshot& b) {
  at::Tensor t = at::zeros({3}, at::kDouble);
  if (world.rank() == 0) {
    t[0] = b.host_busy_s - a.host_busy_s;
    t[2] = std::chrono::duration<double>(b.at - a.at).count();
  }
  t[1] = b.mine_s - a.mine_s;
  world.all_reduce(t, dist::ReduceOp::kSum).wait();
  const double wall = t[2].item<double>();
  if (wall <= 0) return 0.0;
  return std::max(0.0, t[0].item<double>() - t[1].item<double>()) / (wall * detail::host_cpus());
}

// The repeats whose foreign share is at most `max_share`; at least the
// min(3, all) quietest.
std::vector<size_t> quiet_repeats(const std::vector<double>& foreign, double max_share) {
  std::vector<size_t> order(foreign.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t x, size_t y) { return foreign[x] < foreign[y]; });
  size_t keep = std::min<size_t>(3, order.size());
  while (keep < order.size() && foreign[order[keep]] <= max_share) ++keep;
  order.resize(keep);
  std::sort(order.begin(), order.end());
  return order;
}

// The entries of `values` (one per repeat, possibly fewer) at `kept`.
std::vector<double> at_repeats(const std::vector<double>& values, const std::vector<size_t>& kept) {
  std::vector<double> out;
  for (size_t i : kept) {
    if (i < values.size()) out.push_back(values[i]);
  }
  return out.empty() ? values : out;
}

}  // namespace

HostSharing measure_host_sharing(dist::ProcessGroup& world, const HostSharingOptions& options) {
  TESSERA_CHECK(options.repeats >= 1 && options.lockstep_repeats >= 1, InvalidArgument,
                "measure_host_sharing: repeats and lockstep_repeats must be >= 1");
  ThreadScope threads(thread_count(options.threads, world));
  const int n = world.size();

  const bool own = options.own_layout;
  const ParallelLayout split_layout = own ? options.job.layout : options.lockstep_layout;
  // Out of step: the job's whole single-rank step (with own_layout, the
  // runs of the split step below without synchronisation instead).
  std::unique_ptr<TrainingJob> job;
  nn::TokenDataset::Batch batch;
  if (!own) {
    TrainingJobConfig config = options.job.with_layout(ParallelLayout{});
    config.zero1 = false;
    job = TrainingJob::create(config, dist::ProcessGroup::create_placeholder(0, 1));
    batch = job->batch(0);
    job->step(batch);  // warm-up
  }

  // In step: rank 0 of the split layout on a placeholder group whose
  // collectives synchronise the real ranks when enabled.
  TrainingJobConfig split = options.job.with_layout(split_layout);
  if (!own) split.zero1 = false;
  auto sync = std::make_shared<SyncAtCollectives>(world);
  dist::ProcessGroupOptions group;
  group.observer = sync;
  auto placeholder = dist::ProcessGroup::create_placeholder(0, split_layout.world_size(), group);
  auto split_job = TrainingJob::create(split, placeholder);
  const nn::TokenDataset::Batch split_batch = split_job->batch(0);
  split_job->step(split_batch);  // warm-up; counts the collectives of a step
  const int per_step = sync->completed;
  TESSERA_CHECK(per_step > 0, InvalidArgument, "calibrate host: layout ", split_layout.to_string(),
                " issues no collective, so its compute never runs in step; choose one that does "
                "(e.g. tp=2)");

  // One run on ranks 0 .. k-1 (the others wait, or take part in the
  // synchronising all_reduces only): every rank's time in its own slot, the
  // waits for those all_reduces left out.
  auto run = [&](int k, bool split_step, bool in_step) {
    world.barrier().wait();
    at::Tensor times = at::zeros({n}, at::kDouble);
    if (world.rank() < k) {
      sync->start(in_step);
      Stopwatch w;
      if (split_step) {
        split_job->step(split_batch);
      } else {
        job->step(batch);
      }
      times[world.rank()] = w.seconds() - sync->waited;
      sync->enabled = false;
    } else if (in_step) {
      at::Tensor token = at::zeros({1}, at::kFloat);
      for (int i = 0; i < per_step; ++i) world.all_reduce(token).wait();
    }
    world.all_reduce(times, dist::ReduceOp::kSum).wait();
    return times;
  };
  // Every measurement in every repeat, so a drift of the machine's speed
  // lands on all of them alike instead of on the later ones.
  const size_t kn = static_cast<size_t>(n);
  std::vector<std::vector<double>> means(kn), skews(kn), apart(kn), together(kn);
  const int lockstep_repeats = own ? options.repeats : options.lockstep_repeats;
  const int repeats = std::max(options.repeats, lockstep_repeats);
  std::vector<double> foreign;  // per repeat
  for (int r = 0; r < repeats; ++r) {
    world.barrier().wait();
    const detail::CpuSnapshot before = detail::CpuSnapshot::take();
    for (int k = 1; k <= n; ++k) {
      const size_t i = static_cast<size_t>(k - 1);
      auto mean_of = [k](const at::Tensor& times) {
        return times.narrow(0, 0, k).sum().item<double>() / k;
      };
      auto out_of_step = [&](const at::Tensor& times) {
        const double mean = mean_of(times);
        const double slowest = times.narrow(0, 0, k).max().item<double>();
        means[i].push_back(mean);
        skews[i].push_back(mean > 0 ? slowest / mean - 1 : 0.0);
      };
      if (r < options.repeats && !own) out_of_step(run(k, false, false));
      if (r < lockstep_repeats) {
        const at::Tensor times = run(k, true, false);
        if (own) out_of_step(times);
        apart[i].push_back(mean_of(times));
        together[i].push_back(mean_of(run(k, true, true)));
      }
    }
    foreign.push_back(world_foreign_share(world, before, detail::CpuSnapshot::take()));
  }
  const std::vector<size_t> kept = quiet_repeats(foreign, options.max_foreign_cpu);
  // The wait for a group's last member, every rank computing the job in
  // step: the in-step step synchronising the world (and, in a larger even
  // world, pairs of neighbouring ranks: the tensor-parallel pairs of a dp x
  // tp job) with all_reduces of each call's size, so the ranks pay the
  // job's transfers too and drift as the real job's ranks do. Per
  // synchronisation of a group: the last member's issue less the members'
  // mean issue (one host's clock), against the members' mean compute since
  // their previous synchronisation; fitted as a + b x segment over every
  // synchronisation of every group of that size and taken at
  // sync_compute_ms (HostSharing::sync_us).
  // With compute_only neither this nor communication's load below is
  // measured, so no pair groups are created either.
  std::vector<std::pair<int, std::shared_ptr<dist::ProcessGroup>>> sync_groups;
  std::shared_ptr<dist::ProcessGroup> pair;  // this rank's pair of neighbours
  if (!options.compute_only) {
    sync_groups.emplace_back(
        n, std::shared_ptr<dist::ProcessGroup>(&world, [](dist::ProcessGroup*) {}));
    if (n > 2 && n % 2 == 0) {
      for (int first = 0; first < n; first += 2) {
        auto sub = world.new_subgroup({first, first + 1},
                                      world.name() + "/host-sync" + std::to_string(first));
        if (sub) pair = sub;
      }
      sync_groups.emplace_back(2, pair);
    }
  }
  require_one_host(world, "measure_host_sharing");
  const double segment_s = options.sync_compute_ms * 1e-3;
  std::map<int, double> lateness_s;  // by group size, at segment_s
  sync->sized = true;
  for (const auto& [size, g] : sync_groups) {
    sync->group = g.get();
    sync->issues.clear();
    sync->segments.clear();
    const double origin = from_rank0(world, steady_seconds());
    for (int r = 0; r < std::max(1, lockstep_repeats); ++r) {
      world.barrier().wait();
      sync->start(true);
      split_job->step(split_batch);
      sync->enabled = false;
    }
    // Every rank ran the same step, so the same synchronisations in the
    // same order.
    for (double& t : sync->issues) t -= origin;
    const auto [issues, segments] = gather_series(world, sync->issues, sync->segments);
    const auto [a, b] = wait_fit(arrival_lateness(issues, segments, n, size));
    lateness_s[size] = a + b * segment_s;
  }
  sync->sized = false;
  sync->group = &world;

  // Communication's load: GEMM segments on ranks 0 .. c-1 while the pairs
  // of ranks c .. n-1 are idle, busy computing, or running all_reduces.
  const int c = 2 * (n / 4);
  const bool measure_load =
      n >= 4 && n % 2 == 0 && !options.comm_load_bytes.empty() && !options.compute_only;
  std::vector<double> idle, busy, load_foreign;
  std::vector<std::vector<double>> comm(options.comm_load_bytes.size());
  if (measure_load) {
    auto segment = gemm_segment(world.rank(), options.comm_load_compute_ms);
    std::vector<at::Tensor> buffers;
    for (int64_t bytes : options.comm_load_bytes) {
      TESSERA_CHECK(bytes >= 4, InvalidArgument, "measure_host_sharing: comm_load_bytes entry ",
                    bytes, " < 4");
      buffers.push_back(at::zeros({bytes / 4}, at::kFloat));
    }
    // mode: -2 idle, -1 busy, else the size's index; the computing ranks'
    // mean segment time. The pairs keep communicating for `seconds`: the
    // first element of each all_reduce carries the members' "past it"
    // flags, so both leave after the same call.
    auto run_load = [&](int mode, double seconds) {
      world.barrier().wait();
      double mine = 0;
      if (world.rank() < c || mode == -1) {
        Stopwatch w;
        segment();
        mine = w.seconds();
      } else if (mode >= 0) {
        at::Tensor& buf = buffers[static_cast<size_t>(mode)];
        float* flag = buf.data_ptr<float>();
        Stopwatch w;
        do {
          *flag = w.seconds() > seconds ? 1.0f : 0.0f;
          pair->all_reduce(buf).wait();
        } while (*flag == 0.0f);
      }
      at::Tensor t = at::full({1}, world.rank() < c ? mine : 0.0, at::kDouble);
      world.all_reduce(t, dist::ReduceOp::kSum).wait();
      return t.item<double>() / c;
    };
    for (int r = 0; r < options.repeats; ++r) {
      world.barrier().wait();
      const detail::CpuSnapshot before = detail::CpuSnapshot::take();
      busy.push_back(run_load(-1, 0));
      idle.push_back(run_load(-2, 0));
      // Longer than the segment under full load, so the computing ranks
      // never run without the communication beside them.
      const double seconds = 1.5 * busy.back();
      for (size_t i = 0; i < comm.size(); ++i) {
        comm[i].push_back(run_load(static_cast<int>(i), seconds));
      }
      load_foreign.push_back(world_foreign_share(world, before, detail::CpuSnapshot::take()));
    }
  }

  HostSharing out;
  out.foreign_cpu = foreign;
  out.repeats_kept = static_cast<int>(kept.size());
  auto med = [&kept](const std::vector<double>& v) { return median(at_repeats(v, kept)); };
  const double alone = med(means[0]);
  const double split_alone = med(apart[0]);
  for (size_t i = 0; i < kn; ++i) {
    out.compute_slowdown.push_back(med(means[i]) / alone);
    out.sync_skew.push_back(i == 0 ? 0.0 : med(skews[i]));
    out.lockstep_slowdown.push_back(med(together[i]) / split_alone);
    out.lockstep_ratio.push_back(med(together[i]) / med(apart[i]));
    // Groups of i + 1 ranks: the smallest measured group at least as large.
    if (i == 0 || options.compute_only) {
      out.sync_us.push_back(0.0);
    } else {
      const double late = lateness_s.lower_bound(static_cast<int>(i + 1))->second;
      out.sync_us.push_back(std::max(0.0, (late - out.sync_skew[i] * segment_s) * 1e6));
    }
  }
  if (measure_load) {
    const std::vector<size_t> quiet = quiet_repeats(load_foreign, options.max_foreign_cpu);
    auto load_med = [&quiet](const std::vector<double>& v) { return median(at_repeats(v, quiet)); };
    const double base = load_med(idle);
    out.busy_slowdown = load_med(busy) / base;
    for (size_t i = 0; i < comm.size(); ++i) {
      const double slowdown = load_med(comm[i]) / base;
      out.comm_load_slowdown.push_back(slowdown);
      out.comm_load.push_back(CommLoadPoint{
          options.comm_load_bytes[i] / 4 * 4,
          comm_load_from_slowdowns(out.compute_slowdown, c, out.busy_slowdown, slowdown)});
    }
  }
  return out;
}

}  // namespace tessera::sim
