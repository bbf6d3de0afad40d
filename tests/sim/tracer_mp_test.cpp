// sim on real ranks (tessera-launch --nproc 2 and 4): the tracer records
// the same communication as a real multi-rank run of the same step — every
// rank runs a real first step with a recording observer on its process groups,
// then traces its own rank on placeholder groups, and the two call lists
// must agree in kind, group, size, dtype and reduction (for MoE token
// exchange, whose sizes depend on other ranks' data: every call's kind and
// group, and without tp the first exchange's per-peer sizes). Also runs the
// calibration measurements once, small.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>

#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/sim/calibration.h"
#include "tessera/sim/tracer.h"
#include "test_main.h"

namespace tessera::sim {
namespace {

std::shared_ptr<dist::ProcessGroup> g_world;
std::shared_ptr<CallRecorder> g_recorder;

TrainingJobConfig job_for(const std::string& type, const std::string& layout, bool zero1) {
  std::string model = R"({"model_type": ")" + type + R"(", "vocab_size": 97, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 8,
    "num_key_value_heads": 4, "max_position_embeddings": 64)";
  if (type == "mixtral") model += R"(, "num_local_experts": 4, "num_experts_per_tok": 2)";
  model += "}";
  TrainingJobConfig c = TrainingJobConfig::parse(
      R"({"model": )" + model +
          R"(, "layout": {"dp": 1}, "batch": {"global_batch": 8, "seq_len": 12}})",
      "mp.json");
  c.layout = ParallelLayout::parse(layout);
  c.zero1 = zero1;
  c.validate();
  return c;
}

std::string describe(const dist::CollectiveCall& c) {
  std::string ranks;
  for (int r : c.ranks) ranks += std::to_string(r) + " ";
  return c.op + " on [" + ranks + "] " + std::to_string(c.bytes) + " B " +
         std::string(c10::toString(c.dtype));
}

void check_layout(const std::string& type, const std::string& layout, bool zero1) {
  SCOPED_TRACE(type + " " + layout + (zero1 ? " zero1" : ""));
  const TrainingJobConfig config = job_for(type, layout, zero1);
  ASSERT_EQ(config.layout.world_size(), g_world->size());
  // The real first step (the weights are the same initial ones in both
  // runs, so MoE routing of this rank's own tokens is too).
  auto job = TrainingJob::create(config, g_world);
  const nn::TokenDataset::Batch batch = job->batch(0);
  g_recorder->clear();
  job->step(batch);
  const std::vector<dist::CollectiveCall> real = g_recorder->calls();
  g_world->barrier().wait();
  // The tracer on this rank: step 0, measured.
  TracerOptions o;
  o.warmup_steps = 0;
  o.measured_steps = 1;
  o.threads = 1;
  const TracedRank traced = trace_rank(config, g_world->rank(), o);
  ASSERT_EQ(traced.calls.size(), real.size());
  bool first_exchange = true;
  for (size_t i = 0; i < real.size(); ++i) {
    const dist::CollectiveCall& a = real[i];
    const dist::CollectiveCall& b = traced.calls[i];
    SCOPED_TRACE("call " + std::to_string(i) + ": real " + describe(a) + ", traced " + describe(b));
    EXPECT_EQ(a.op, b.op);
    EXPECT_EQ(a.ranks, b.ranks);
    EXPECT_EQ(a.rank, b.rank);
    EXPECT_EQ(a.dtype, b.dtype);
    EXPECT_EQ(a.reduce, b.reduce);
    EXPECT_EQ(a.peer, b.peer);
    if (a.op != "all_to_all") {
      EXPECT_EQ(a.bytes, b.bytes);
      continue;
    }
    if (first_exchange && config.layout.tp == 1) {
      // The first MoE layer's dispatch: this rank's own routing of its own
      // tokens, the same in both runs. (Under tp the hidden states entering
      // it are sums of every tp rank's partial results, which placeholders
      // only approximate, so the routing differs.)
      EXPECT_EQ(a.send_bytes, b.send_bytes);
      EXPECT_EQ(a.bytes, b.bytes);
      first_exchange = false;
    }
  }
  g_world->barrier().wait();
}

TEST(TracerOnRealRanks, RecordsTheSameCollectivesAsARealRun) {
  if (g_world->size() == 2) {
    check_layout("llama", "dp=2", false);
    check_layout("llama", "tp=2", false);
    check_layout("llama", "dp=2", true);
    check_layout("mixtral", "ep=2", false);
    check_layout("mixtral", "tp=2", false);
  } else if (g_world->size() == 4) {
    check_layout("llama", "dp=2,tp=2", false);
    check_layout("llama", "tp=4", false);
    check_layout("llama", "dp=2,tp=2", true);
    check_layout("mixtral", "ep=2,tp=2", false);
    check_layout("mixtral", "ep=4", false);
    check_layout("mixtral", "dp=2,tp=2", true);
  } else {
    GTEST_SKIP() << "runs with 2 or 4 ranks, not " << g_world->size();
  }
}

TEST(Calibration, MeasuresCollectivesOverlapAndHostSharing) {
  CollectiveSweepOptions c;
  c.min_bytes = 256;
  c.max_bytes = 1024;
  c.min_repeats = 2;
  c.max_repeats = 2;
  const std::vector<Measurement> m = measure_collectives(*g_world, c);
  ASSERT_EQ(m.size(), 5u * 3u);  // five operations, 256 B .. 1 KiB doubling
  for (const Measurement& x : m) {
    EXPECT_GT(x.time.count(), 0);
    EXPECT_EQ(x.shape.ranks, g_world->size());
    EXPECT_EQ(x.bytes % (4 * g_world->size()), 0);
  }
  if (g_world->size() % 2 == 0 && g_world->size() > 2) {
    c.group_size = 2;
    c.ops = {CollectiveKind::kAllReduce};
    for (const Measurement& x : measure_collectives(*g_world, c)) EXPECT_EQ(x.shape.ranks, 2);
  }
  // After compute, from the last member's issue: every time positive, a
  // broadcast's root (which may finish before the others issue) included,
  // and the same on every rank (one reduction of every rank's times).
  c.group_size = 0;
  c.compute_ms = 1;
  c.ops = {CollectiveKind::kAllReduce, CollectiveKind::kBroadcast};
  c.max_bytes = 256;
  for (const Measurement& x : measure_collectives(*g_world, c)) {
    EXPECT_GT(x.time.count(), 0) << collective_kind_name(x.op);
    EXPECT_NE(x.origin.find("from the last member's issue"), std::string::npos) << x.origin;
    at::Tensor t = at::full({2}, x.time.count(), at::kDouble);
    t[1] = -x.time.count();
    g_world->all_reduce(t, dist::ReduceOp::kMax).wait();
    EXPECT_EQ(t[0].item<double>(), -t[1].item<double>()) << collective_kind_name(x.op);
  }
  OverlapSweepOptions o;
  o.gemm_sizes = {64};
  o.comm_bytes = {4096};
  o.repeats = 1;
  o.gemm_ms = 2;
  const std::vector<OverlapSample> s = measure_overlap(*g_world, o);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_GT(s[0].slowdown, 0);
  EXPECT_GT(s[0].features.compute_duration_us, 0);
  EXPECT_GE(s[0].features.overlap_fraction, 0);
  EXPECT_LE(s[0].features.overlap_fraction, 1);
  HostSharingOptions h;
  h.job = job_for("llama", "dp=1", false);
  h.repeats = 1;
  h.lockstep_layout = ParallelLayout::parse("tp=2");
  h.lockstep_repeats = 2;
  h.comm_load_bytes = {4096, 65536};
  h.comm_load_compute_ms = 5;
  // The collectives one tp=2 step issues (placeholder group, recorded).
  auto counter = std::make_shared<CallRecorder>();
  dist::ProcessGroupOptions po;
  po.observer = counter;
  auto tp_job = TrainingJob::create(h.job.with_layout(h.lockstep_layout),
                                    dist::ProcessGroup::create_placeholder(0, 2, po));
  tp_job->step(tp_job->batch(0));
  const size_t per_step = counter->calls().size();
  ASSERT_GT(per_step, 0u);
  g_world->barrier().wait();
  g_recorder->clear();
  const HostSharing sharing = measure_host_sharing(*g_world, h);
  // Every in-step run synchronised this rank at each of the step's
  // collectives: with one 4-byte float all_reduce in the runs for each k,
  // and with a float all_reduce of each collective's size (at least one
  // element) in the straggler measurement, one step per repeat and sync
  // group (the world, and pairs in a world of 4). The other calls of the
  // measurement are barriers, double and integer reductions, the pair
  // groups' creation and communication's load (sizes left out here).
  const size_t repeats = static_cast<size_t>(h.lockstep_repeats);
  const size_t sync_groups = g_world->size() > 2 ? 2 : 1;
  std::map<int64_t, size_t> expected, seen;
  expected[4] += per_step * repeats * static_cast<size_t>(g_world->size());
  for (const dist::CollectiveCall& c : counter->calls()) {
    expected[std::max<int64_t>(4, c.bytes / 4 * 4)] += repeats * sync_groups;
  }
  for (const dist::CollectiveCall& c : g_recorder->calls()) {
    if (c.op == "all_reduce" && c.dtype == at::kFloat) ++seen[c.bytes];
  }
  for (int64_t bytes : h.comm_load_bytes) {
    expected.erase(bytes);
    seen.erase(bytes);
  }
  EXPECT_EQ(seen, expected);
  const std::vector<double>& slow = sharing.compute_slowdown;
  ASSERT_EQ(slow.size(), static_cast<size_t>(g_world->size()));
  EXPECT_DOUBLE_EQ(slow[0], 1.0);
  for (double x : slow) EXPECT_GT(x, 0);
  ASSERT_EQ(sharing.sync_skew.size(), slow.size());
  EXPECT_DOUBLE_EQ(sharing.sync_skew[0], 0.0);  // one rank is its own mean
  for (double x : sharing.sync_skew) EXPECT_GE(x, 0);
  ASSERT_EQ(sharing.lockstep_ratio.size(), slow.size());
  ASSERT_EQ(sharing.lockstep_slowdown.size(), slow.size());
  for (size_t k = 0; k < slow.size(); ++k) {
    EXPECT_GT(sharing.lockstep_ratio[k], 0);
    EXPECT_GT(sharing.lockstep_slowdown[k], 0);
  }
  ASSERT_EQ(sharing.sync_us.size(), slow.size());
  EXPECT_DOUBLE_EQ(sharing.sync_us[0], 0.0);
  for (double x : sharing.sync_us) EXPECT_GE(x, 0);
  // Communication's load: measured in a world of 4 (ranks 2 and 3 run the
  // all_reduces of each size in their pair while ranks 0 and 1 compute).
  if (g_world->size() == 4) {
    ASSERT_EQ(sharing.comm_load.size(), 2u);
    EXPECT_EQ(sharing.comm_load[0].bytes, 4096);
    EXPECT_EQ(sharing.comm_load[1].bytes, 65536);
    ASSERT_EQ(sharing.comm_load_slowdown.size(), 2u);
    EXPECT_GT(sharing.busy_slowdown, 0);
    // Each load is the derivation (tested on fixed numbers in sim_test) of
    // the slowdowns this measurement recorded, two ranks computing.
    for (size_t i = 0; i < sharing.comm_load.size(); ++i) {
      EXPECT_GT(sharing.comm_load_slowdown[i], 0);
      EXPECT_EQ(sharing.comm_load[i].load,
                comm_load_from_slowdowns(sharing.compute_slowdown, 2, sharing.busy_slowdown,
                                         sharing.comm_load_slowdown[i]))
          << "size " << sharing.comm_load[i].bytes;
    }
    size_t transfers = 0;
    for (const dist::CollectiveCall& c : g_recorder->calls()) {
      transfers += c.op == "all_reduce" && (c.bytes == 4096 || c.bytes == 65536);
    }
    // At least one call per size and repeat on the communicating ranks, none
    // on the computing ones.
    if (g_world->rank() >= 2) {
      EXPECT_GE(transfers, 2u * static_cast<size_t>(h.repeats));
    } else {
      EXPECT_EQ(transfers, 0u);
    }
  } else {
    EXPECT_TRUE(sharing.comm_load.empty());
  }
  // Every repeat's share of foreign CPU time is recorded; the medians keep
  // at least min(3, repeats) of them.
  ASSERT_EQ(sharing.foreign_cpu.size(),
            static_cast<size_t>(std::max(h.repeats, h.lockstep_repeats)));
  for (double x : sharing.foreign_cpu) EXPECT_GE(x, 0);
  EXPECT_EQ(sharing.repeats_kept, 2);  // two repeats: both, however busy the host
  // One rank: both are in step over out of step alone.
  EXPECT_DOUBLE_EQ(sharing.lockstep_slowdown[0], sharing.lockstep_ratio[0]);
  // The job's own layout, compute only: the slowdowns of its rank-0 step,
  // no straggler wait, no communication load.
  HostSharingOptions own;
  own.job = job_for("llama", "tp=2", false);
  own.own_layout = true;
  own.compute_only = true;
  own.repeats = 2;
  own.lockstep_repeats = 5;  // ignored: own_layout takes repeats
  own.comm_load_bytes = {4096};
  const HostSharing mine = measure_host_sharing(*g_world, own);
  ASSERT_EQ(mine.compute_slowdown.size(), static_cast<size_t>(g_world->size()));
  EXPECT_DOUBLE_EQ(mine.compute_slowdown[0], 1.0);
  ASSERT_EQ(mine.lockstep_slowdown.size(), mine.compute_slowdown.size());
  for (size_t k = 0; k < mine.compute_slowdown.size(); ++k) {
    EXPECT_GT(mine.compute_slowdown[k], 0);
    EXPECT_GT(mine.lockstep_slowdown[k], 0);
  }
  // Out of step alone is the same runs as the lock-step figures' base.
  EXPECT_DOUBLE_EQ(mine.lockstep_slowdown[0], mine.lockstep_ratio[0]);
  EXPECT_EQ(mine.sync_us, std::vector<double>(mine.compute_slowdown.size(), 0.0));
  EXPECT_TRUE(mine.comm_load.empty());
  EXPECT_EQ(mine.foreign_cpu.size(), 2u);
  // A layout without collectives cannot run in step.
  h.lockstep_layout = ParallelLayout{};
  EXPECT_THROW(measure_host_sharing(*g_world, h), InvalidArgument);
  own.job = job_for("llama", "dp=1", false);
  EXPECT_THROW(measure_host_sharing(*g_world, own), InvalidArgument);
}

}  // namespace
}  // namespace tessera::sim

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  tessera::init_runtime();
  tessera::dist::InitOptions options;
  options.group.timeout = std::chrono::seconds(120);
  tessera::sim::g_recorder = std::make_shared<tessera::sim::CallRecorder>();
  options.group.observer = tessera::sim::g_recorder;
  tessera::sim::g_world = tessera::dist::init_process_group(options);
  const int result = tessera::testutil::run_all_tests();
  tessera::sim::g_world->barrier().wait();
  tessera::sim::g_world.reset();
  return result;
}
