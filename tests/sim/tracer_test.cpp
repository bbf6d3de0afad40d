// sim: placeholder process groups and collective observers (dist's hooks
// for tracing), the ex-situ tracer on small jobs (structure checked against
// collective counts derived by hand from the model and the trainer), the
// analytical traces against the tracer's, and the reconciliation of uneven
// all_to_all volumes.
#include "tessera/sim/tracer.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <unistd.h>
#include <algorithm>

#include <map>
#include <string>

#include "tessera/core/error.h"
#include "tessera/dist/device_mesh.h"
#include "tessera/sim/collective_model.h"
#include "tessera/sim/synth.h"
#include "tessera/sim/timeline.h"

namespace tessera::sim {
namespace {

// ---------------------------------------------------------------------------
// Placeholder groups and observers

std::shared_ptr<dist::ProcessGroup> placeholder(int rank, int size,
                                                std::shared_ptr<CallRecorder> recorder = nullptr) {
  dist::ProcessGroupOptions o;
  o.observer = std::move(recorder);
  return dist::ProcessGroup::create_placeholder(rank, size, o);
}

TEST(Placeholder, ResultsAsIfEveryMemberHeldThisRanksData) {
  auto g = placeholder(1, 4);
  EXPECT_TRUE(g->is_placeholder());
  at::Tensor x = at::arange(6, at::kFloat);
  at::Tensor sum = x.clone();
  g->all_reduce(sum).wait();
  EXPECT_TRUE(at::equal(sum, x * 4));
  at::Tensor avg = x.clone();
  g->all_reduce(avg, dist::ReduceOp::kAvg).wait();
  EXPECT_TRUE(at::equal(avg, x));
  at::Tensor prod = x.clone();
  g->all_reduce(prod, dist::ReduceOp::kProduct).wait();
  EXPECT_TRUE(at::equal(prod, x.pow(4)));

  at::Tensor gathered = at::empty({24});
  g->all_gather(gathered, x).wait();
  EXPECT_TRUE(at::equal(gathered, x.repeat({4})));

  at::Tensor big = at::arange(8, at::kFloat);
  at::Tensor part = at::empty({2});
  g->reduce_scatter(part, big).wait();  // rank 1's slice [2, 3], times 4
  EXPECT_TRUE(at::equal(part, at::tensor({8.0f, 12.0f})));

  // Uneven all_to_all: rank 1 sends rows [1, 2) to itself; every source's
  // rows get that row as far as it goes, then zeros.
  at::Tensor rows = at::arange(10, at::kFloat).view({5, 2});
  at::Tensor out = at::full({6, 2}, -1.0f);
  g->all_to_all(out, rows, /*output_splits=*/{2, 1, 0, 3}, /*input_splits=*/{1, 1, 2, 1}).wait();
  const at::Tensor expect =
      at::tensor({2, 3, 0, 0, 2, 3, 2, 3, 0, 0, 0, 0}, at::kFloat).view({6, 2});
  EXPECT_TRUE(at::equal(out, expect)) << out;

  // Arguments are checked as on a real group.
  EXPECT_THROW(g->all_to_all(out, rows, {1, 1, 1, 1}, {1, 1, 2, 1}), InvalidArgument);
  EXPECT_THROW(g->send(x, 1), InvalidArgument);
  EXPECT_THROW(dist::ProcessGroup::create_placeholder(4, 4), InvalidArgument);
}

TEST(Placeholder, SubgroupsKeepWorldRanksAndTheObserver) {
  auto recorder = std::make_shared<CallRecorder>();
  auto world = placeholder(5, 8, recorder);
  auto mesh = dist::DeviceMesh::create(world, {{"dp", 2}, {"tp", 4}});
  const auto& tp = mesh.group("tp");
  ASSERT_TRUE(tp->is_placeholder());
  EXPECT_EQ(tp->world_ranks(), (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(tp->rank(), 1);
  EXPECT_EQ(mesh.group("dp")->world_ranks(), (std::vector<int>{1, 5}));
  at::Tensor t = at::ones({3, 5}, at::kBFloat16);
  tp->all_reduce(t, dist::ReduceOp::kAvg).wait();
  const auto calls = recorder->calls();
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0].op, "all_reduce");
  EXPECT_EQ(calls[0].ranks, (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(calls[0].rank, 1);
  EXPECT_EQ(calls[0].bytes, 30);
  EXPECT_EQ(calls[0].dtype, at::kBFloat16);
  EXPECT_EQ(calls[0].reduce, dist::ReduceOp::kAvg);
  EXPECT_EQ(calls[0].id, 1u);
}

// Counts issue and completion order.
class OrderObserver : public dist::CollectiveObserver {
 public:
  std::vector<std::string> events;
  void on_issue(const dist::CollectiveCall& c) override {
    events.push_back("issue " + c.op + " " + std::to_string(c.id) + " " + std::to_string(c.bytes));
  }
  void on_complete(const dist::CollectiveCall& c) override {
    events.push_back("done " + c.op + " " + std::to_string(c.id));
  }
};

TEST(Observer, SeesSizesInTheNcclTestsConventionAndCompletionOnWait) {
  auto observer = std::make_shared<OrderObserver>();
  dist::ProcessGroupOptions o;
  o.observer = observer;
  auto g = dist::ProcessGroup::create_placeholder(0, 2, o);
  at::Tensor in = at::ones({4});  // 16 bytes
  at::Tensor out = at::empty({8});
  dist::Work a = g->all_gather(out, in);      // output: 32
  dist::Work b = g->reduce_scatter(in, out);  // input: 32
  dist::Work c = g->all_to_all(out, out);     // send buffer: 32
  dist::Work d = g->broadcast(in, 1);         // tensor: 16
  b.wait();
  a.wait();
  a.wait();  // reported once
  c.wait();
  d.wait();
  EXPECT_EQ(observer->events,
            (std::vector<std::string>{"issue all_gather 1 32", "issue reduce_scatter 2 32",
                                      "issue all_to_all 3 32", "issue broadcast 4 16",
                                      "done reduce_scatter 2", "done all_gather 1",
                                      "done all_to_all 3", "done broadcast 4"}));
}

// ---------------------------------------------------------------------------
// The tracer

TrainingJobConfig tiny_job(const std::string& type, ParallelLayout layout, bool zero1 = false,
                           bool bf16 = false) {
  std::string model = R"({"model_type": ")" + type + R"(", "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64)";
  if (type == "mixtral") model += R"(, "num_local_experts": 4, "num_experts_per_tok": 2)";
  model += "}";
  TrainingJobConfig c = TrainingJobConfig::parse(
      R"({"model": )" + model +
          R"(, "layout": {"dp": 1}, "batch": {"global_batch": 8, "seq_len": 16}})",
      "tiny.json");
  c.layout = layout;
  c.zero1 = zero1;
  c.bf16_autocast = bf16;
  c.validate();
  return c;
}

TracerOptions quick() {
  TracerOptions o;
  o.warmup_steps = 1;
  o.measured_steps = 2;
  o.threads = 1;
  return o;
}

// (op, partition) of every communication node of an entry, in order.
std::vector<std::string> comm_sequence(const RankTrace& e, bool with_bytes = true) {
  std::vector<std::string> out;
  for (const TraceNode& n : e.nodes) {
    if (!n.is_communication()) continue;
    std::string s = std::string(collective_kind_name(n.op)) + "@" + n.group.partition;
    if (with_bytes) s += ":" + std::to_string(n.bytes) + ":" + n.dtype;
    out.push_back(s);
  }
  return out;
}

int count(const std::vector<std::string>& seq, const std::string& prefix) {
  return static_cast<int>(std::count_if(
      seq.begin(), seq.end(), [&](const std::string& s) { return s.rfind(prefix, 0) == 0; }));
}

TEST(Tracer, DenseTensorAndDataParallelStepHasTheTrainersCollectives) {
  // dp=2 x tp=2, 3 layers, 4 sequences of 16 tokens per data rank.
  const TrainingJobConfig job = tiny_job("llama", {2, 2, 1});
  const TraceResult r = trace_training_job(job, quick());
  ASSERT_EQ(r.ranks.size(), 1u);  // vocabulary 96 splits evenly: one class
  EXPECT_EQ(r.trace.entries[0].ranks, (std::vector<int>{0, 1, 2, 3}));
  const auto seq = comm_sequence(r.trace.entries[0]);
  const int64_t N = 4 * 16, H = 32;
  // Forward: embedding + 2 per layer; the loss: max, sum, picked. Backward:
  // the LM head's input + 2 per layer. Then the optimiser's tp norm.
  const std::string act = "all_reduce@tp:" + std::to_string(N * H * 4) + ":Float";
  EXPECT_EQ(count(seq, act), 1 + 2 * 3 + 1 + 2 * 3);
  EXPECT_EQ(count(seq, "all_reduce@tp:" + std::to_string(N * 4) + ":Float"), 3);
  EXPECT_EQ(count(seq, "all_reduce@tp:8:Double"), 1);
  // dp: one gradient bucket with every local parameter (< 25 MiB), then the
  // loss statistics (2 doubles).
  int64_t local = 0;
  {
    auto world = dist::ProcessGroup::create_placeholder(0, 4);
    auto one = TrainingJob::create(job, world);
    local = one->model().num_local_parameters();
  }
  EXPECT_EQ(count(seq, "all_reduce@dp:" + std::to_string(local * 4) + ":Float"), 1);
  EXPECT_EQ(count(seq, "all_reduce@dp:16:Double"), 1);
  EXPECT_EQ(static_cast<int>(seq.size()), 14 + 3 + 1 + 1 + 1);
  // A chain: compute and communication alternate, each depending on the
  // one before.
  const auto& nodes = r.trace.entries[0].nodes;
  for (size_t i = 1; i < nodes.size(); ++i) {
    EXPECT_NE(nodes[i].is_communication(), nodes[i - 1].is_communication()) << i;
    ASSERT_EQ(nodes[i].deps.size(), 1u) << i;
    EXPECT_EQ(nodes[i].deps[0], nodes[i - 1].id) << i;
  }
  EXPECT_GT(r.ranks[0].peak_memory_bytes, 0);
  EXPECT_GT(r.ranks[0].step_seconds, 0);
  // It simulates.
  ClusterSpec cluster;
  cluster.name = "c";
  cluster.topology.devices_per_node = 4;
  RegimeParams ring{"simple", 0, 10, 1, 1, 1, 1, 0};
  cluster.defaults.algorithms[Algorithm::kRing] = {ring};
  const CollectiveModel model(cluster);
  SimulationOptions so;
  so.collectives = &model;
  // Every compute node keeps both measured steps, their mean its duration;
  // the simulation replays both and reports the faster (the lower middle).
  EXPECT_EQ(r.trace.measured_steps(), 2);
  for (const TraceNode& n : nodes) {
    if (n.is_communication()) continue;
    ASSERT_EQ(n.step_durations.size(), 2u);
    EXPECT_NEAR(n.duration.count(), 0.5 * (n.step_durations[0] + n.step_durations[1]).count(),
                1e-6);
  }
  const SimulationResult sim = simulate(r.trace, so);
  ASSERT_EQ(sim.replayed_step_times.size(), 2u);
  EXPECT_EQ(sim.step_time, std::min(sim.replayed_step_times[0], sim.replayed_step_times[1]));
  double compute = 0;
  for (const TraceNode& n : nodes) {
    if (!n.is_communication())
      compute += n.step_durations[static_cast<size_t>(sim.replayed_step)].count();
  }
  EXPECT_GT(sim.step_time.count(), compute);
  EXPECT_EQ(sim.collective_calls, 4 * seq.size() / 2);  // tp and dp groups of 2
}

TEST(Tracer, ZeroOneReduceScattersAndGathersThePaddedFlatParameters) {
  const TrainingJobConfig job = tiny_job("llama", {4, 1, 1}, /*zero1=*/true);
  const TraceResult r = trace_training_job(job, quick());
  const auto seq = comm_sequence(r.trace.entries[0]);
  int64_t local = 0;
  {
    auto one = TrainingJob::create(job, dist::ProcessGroup::create_placeholder(0, 4));
    local = one->model().num_local_parameters();
  }
  const int64_t padded = (local + 3) / 4 * 4;
  EXPECT_EQ(
      seq,
      (std::vector<std::string>{
          "reduce_scatter@dp:" + std::to_string(padded * 4) + ":Float", "all_reduce@dp:8:Double",
          "all_gather@dp:" + std::to_string(padded * 4) + ":Float", "all_reduce@dp:16:Double"}));
}

TEST(Tracer, ExpertParallelRanksAreTracedSeparatelyAndAllToAllsReconciled) {
  const TrainingJobConfig job = tiny_job("mixtral", {1, 1, 2});
  const TraceResult r = trace_training_job(job, quick());
  ASSERT_EQ(r.ranks.size(), 2u);
  EXPECT_EQ(r.trace.entries[0].ranks, std::vector<int>{0});
  EXPECT_EQ(r.trace.entries[1].ranks, std::vector<int>{1});
  const auto seq = comm_sequence(r.trace.entries[0], /*with_bytes=*/false);
  // Per MoE layer: count all_gather, dispatch and return forward, return and
  // dispatch backward.
  EXPECT_EQ(count(seq, "all_gather@ep"), 3);
  EXPECT_EQ(count(seq, "all_to_all@ep"), 4 * 3);
  // Every all_to_all: the largest send or receive volume over both ranks,
  // from the traced ranks' own send sizes (last measured step).
  std::vector<std::vector<const dist::CollectiveCall*>> a2a(2);
  for (int k = 0; k < 2; ++k) {
    for (const auto& c : r.ranks[k].calls) {
      if (c.op == "all_to_all") a2a[k].push_back(&c);
    }
  }
  ASSERT_EQ(a2a[0].size(), 12u);
  ASSERT_EQ(a2a[1].size(), 12u);
  std::vector<int64_t> reconciled;
  for (const TraceNode& n : r.trace.entries[1].nodes) {
    if (n.is_communication() && n.op == CollectiveKind::kAllToAll) reconciled.push_back(n.bytes);
  }
  // Both entries carry the same reconciled volume (the composer requires
  // members to agree); ReconciledVolumeIsTheBusiestMember checks its value.
  std::vector<int64_t> on_rank0;
  for (const TraceNode& n : r.trace.entries[0].nodes) {
    if (n.is_communication() && n.op == CollectiveKind::kAllToAll) on_rank0.push_back(n.bytes);
  }
  EXPECT_EQ(on_rank0, reconciled);
  for (size_t i = 0; i < reconciled.size(); ++i) {
    EXPECT_GT(reconciled[i], 0) << i;
  }
}

TEST(Tracer, ReconciledVolumeIsTheBusiestMember) {
  // One measured step: the trace's all_to_all bytes equal max over members of
  // (bytes sent, bytes received), computed here from the recorded calls.
  TracerOptions o = quick();
  o.measured_steps = 1;
  const TrainingJobConfig job = tiny_job("mixtral", {1, 1, 2});
  const TraceResult r = trace_training_job(job, o);
  std::vector<std::vector<dist::CollectiveCall>> a2a(2);
  for (int k = 0; k < 2; ++k) {
    for (const auto& c : r.ranks[k].calls) {
      if (c.op == "all_to_all") a2a[k].push_back(c);
    }
  }
  std::vector<int64_t> expect;
  for (size_t i = 0; i < a2a[0].size(); ++i) {
    int64_t busiest = 0;
    for (int me = 0; me < 2; ++me) {
      int64_t sent = 0, received = 0;
      for (int other = 0; other < 2; ++other) {
        sent += a2a[me][i].send_bytes[other];
        received += a2a[other][i].send_bytes[me];
      }
      busiest = std::max({busiest, sent, received});
    }
    expect.push_back(busiest);
  }
  std::vector<int64_t> got;
  for (const TraceNode& n : r.trace.entries[0].nodes) {
    if (n.is_communication() && n.op == CollectiveKind::kAllToAll) got.push_back(n.bytes);
  }
  EXPECT_EQ(got, expect);
}

TEST(Tracer, UnevenVocabularySplitsTensorRanksIntoClasses) {
  TrainingJobConfig job = tiny_job("llama", {1, 2, 1});
  job.model.vocab_size = 97;
  const auto classes = rank_classes(job);
  EXPECT_EQ(classes, (std::vector<std::vector<int>>{{0}, {1}}));
  job.model.vocab_size = 96;
  job.layout = {2, 2, 1};
  EXPECT_EQ(rank_classes(job), (std::vector<std::vector<int>>{{0, 1, 2, 3}}));
}

TEST(Tracer, MoeDataParallelRanksAreTracedSeparately) {
  // Their tokens route differently: one class per dp coordinate (tp ranks
  // of a replica stay together).
  TrainingJobConfig job = tiny_job("mixtral", {2, 2, 1});
  ASSERT_GT(job.model.num_experts, 0);
  EXPECT_EQ(rank_classes(job), (std::vector<std::vector<int>>{{0, 1}, {2, 3}}));
}

TEST(Tracer, PartitionsOfALayout) {
  const auto p = layout_partitions({2, 2, 1});
  EXPECT_EQ(p.at("tp"), (std::vector<std::vector<int>>{{0, 1}, {2, 3}}));
  EXPECT_EQ(p.at("dp"), (std::vector<std::vector<int>>{{0, 2}, {1, 3}}));
  EXPECT_EQ(p.at("world"), (std::vector<std::vector<int>>{{0, 1, 2, 3}}));
  EXPECT_EQ(p.count("ep"), 0u);
}

// ---------------------------------------------------------------------------
// Analytical traces against the tracer

DeviceSpec test_device() {
  DeviceSpec d;
  d.name = "test-gpu";
  d.memory_bytes = int64_t{1} << 30;
  return d;
}

void expect_same_communication(const TrainingJobConfig& job, bool exact_all_to_all) {
  const TraceResult traced = trace_training_job(job, quick());
  const Trace synth = synthesize_trace(job, test_device());
  ASSERT_EQ(synth.entries.size(), traced.trace.entries.size());
  for (size_t e = 0; e < synth.entries.size(); ++e) {
    SCOPED_TRACE("entry " + std::to_string(e));
    EXPECT_EQ(synth.entries[e].ranks, traced.trace.entries[e].ranks);
    const auto a = comm_sequence(traced.trace.entries[e], /*with_bytes=*/false);
    const auto b = comm_sequence(synth.entries[e], /*with_bytes=*/false);
    ASSERT_EQ(a, b);
    std::vector<const TraceNode*> ta, sa;
    for (const TraceNode& n : traced.trace.entries[e].nodes)
      if (n.is_communication()) ta.push_back(&n);
    for (const TraceNode& n : synth.entries[e].nodes)
      if (n.is_communication()) sa.push_back(&n);
    for (size_t i = 0; i < ta.size(); ++i) {
      SCOPED_TRACE("call " + std::to_string(i) + " " + a[i]);
      EXPECT_EQ(ta[i]->dtype, sa[i]->dtype);
      if (ta[i]->op == CollectiveKind::kAllToAll && !exact_all_to_all) {
        // Balanced in the analytical trace; the traced one is the busiest
        // member's volume of random routing.
        EXPECT_NEAR(static_cast<double>(sa[i]->bytes), static_cast<double>(ta[i]->bytes),
                    0.5 * static_cast<double>(ta[i]->bytes));
      } else {
        EXPECT_EQ(ta[i]->bytes, sa[i]->bytes);
      }
    }
  }
}

TEST(Synthesis, SameCommunicationAsTheTracer) {
  {
    SCOPED_TRACE("llama dp2 tp2");
    expect_same_communication(tiny_job("llama", {2, 2, 1}), true);
  }
  {
    SCOPED_TRACE("llama dp2 tp2 bf16");
    expect_same_communication(tiny_job("llama", {2, 2, 1}, false, /*bf16=*/true), true);
  }
  {
    SCOPED_TRACE("llama dp4 zero1");
    expect_same_communication(tiny_job("llama", {4, 1, 1}, /*zero1=*/true), true);
  }
  {
    SCOPED_TRACE("llama tp2 uneven vocabulary");
    TrainingJobConfig job = tiny_job("llama", {1, 2, 1});
    job.model.vocab_size = 97;
    expect_same_communication(job, true);
  }
  {
    SCOPED_TRACE("mixtral ep2 tp2");
    expect_same_communication(tiny_job("mixtral", {1, 2, 2}), false);
  }
  {
    SCOPED_TRACE("mixtral dp2 zero1 bf16");
    expect_same_communication(tiny_job("mixtral", {2, 1, 1}, true, true), true);
  }
}

TEST(Synthesis, RooflineTimesAndMemory) {
  // One GEMM-bound job: doubling the device's matmul peak must shorten the
  // compute, doubling memory bandwidth too (vector work), and the estimate
  // of parameters + gradients + AdamW state is 16 bytes per local parameter.
  const TrainingJobConfig job = tiny_job("llama", {1, 1, 1});
  DeviceSpec d = test_device();
  d.kernel_overhead_us = 0;
  auto total = [](const Trace& t) {
    double us = 0;
    for (const TraceNode& n : t.entries[0].nodes) us += n.duration.count();
    return us;
  };
  const double base = total(synthesize_trace(job, d));
  DeviceSpec fast = d;
  fast.matmul_tflops_fp32 *= 2;
  DeviceSpec wide = d;
  wide.memory_gbps *= 2;
  EXPECT_LT(total(synthesize_trace(job, fast)), base);
  EXPECT_LT(total(synthesize_trace(job, wide)), base);
  EXPECT_GT(base, 0);
  const MemoryEstimate m = estimate_memory(job, 0);
  auto one = TrainingJob::create(job, dist::ProcessGroup::create_placeholder(0, 1));
  const int64_t params = one->model().num_local_parameters();
  EXPECT_EQ(m.parameters, params * 4);
  EXPECT_EQ(m.gradients, params * 4);
  EXPECT_EQ(m.optimizer, params * 8);
  EXPECT_GT(m.activations, 0);
  // Matrix-product FLOPs of the step: 6 x (parameters in matmuls) x tokens
  // for the linear layers, plus attention; at least the linear part.
  double flops = 0;
  const Trace trace = synthesize_trace(job, d);  // outlives the loop (entries[0] would not)
  for (const TraceNode& n : trace.entries[0].nodes) flops += n.flops;
  const double tokens = 8 * 16;
  const double linear = 3 * (32.0 * 32 * 2 + 32.0 * 16 * 2 + 3 * 32.0 * 48) + 32.0 * 96;
  EXPECT_GE(flops, 6 * linear * tokens * 0.999);
}

}  // namespace
}  // namespace tessera::sim
