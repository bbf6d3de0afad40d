// HybridFlow measurements, in one run:
//  1. GRPO iteration time and generated tokens/s with every role colocated
//     on 4 worker processes (the actor re-laid out by the 3D-HybridEngine
//     between training and generation) vs the same 4 processes split into
//     separate pools (actor on 2, reference + reward on 2);
//  2. the training -> generation transition of the 3D-HybridEngine (one
//     all-gather inside micro-DP groups) vs a naive reshard that all-gathers
//     the full weights on every rank: time, bytes received per rank and
//     generation weights held per rank;
//  3. driver overhead per call as the batch grows (the batch stays on the
//     workers; requests carry references).
//
//   build/release/bin/rlhf_bench [--iterations 12] [--hidden 256]   (--help: the options)
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>

#include "command_line.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/nn/loader.h"
#include "tessera/rlhf/driver.h"
#include "tessera/rlhf/hybrid_engine.h"
#include "tessera/rlhf/pipeline.h"
#include "tessera/rlhf/roles.h"

namespace tr = tessera::rlhf;
namespace tn = tessera::nn;

namespace {

// A role for the overhead measurement: "make" creates rows on the workers,
// "touch" reads them and does nothing else.
class NoopRole : public tr::Role {
 public:
  void setup(tr::WorkerContext& ctx, tr::MethodTable& methods) override {
    tr::MethodMesh mesh{ctx.size, 1, ctx.rank, 0};
    methods.add("make", tr::Protocol::kDpCompute, mesh, [](const tr::Batch& in, const tessera::ConfigObject& a) {
      const int64_t rows = in.at("n").size(0) * a.get_int("per_row");
      return tr::MethodResult{{{"x", at::ones({rows, 256})}}, {}};
    });
    methods.add("touch", tr::Protocol::kDpCompute, mesh, [](const tr::Batch& in, const tessera::ConfigObject&) {
      return tr::MethodResult{{}, {{"rows", static_cast<double>(in.at("x").size(0))}}};
    });
  }
};

struct GrpoResult {
  double seconds_per_iteration = 0, tokens_per_second = 0;
};

GrpoResult run_placement(const std::string& model_dir, bool split, bool pin, int64_t iterations) {
  tr::DriverOptions d;
  // Pools own their CPUs, as they would own GPUs: an idle pool's CPU is not
  // lent to the busy one.
  d.pin_cpus = pin;
  const std::string model = "{\"hf\": \"" + model_dir + "\"}";
  const std::string actor = "{\"model\": " + model +
                            ", \"tp\": 2, \"gen_tp\": 1, \"lr\": 1e-4, \"max_new_tokens\": 16, \"seed\": 1}";
  d.pools = {{split ? "actor" : "all", split ? 2 : 4}};
  if (split) d.pools.push_back({"others", 2});
  const std::string other = split ? "others" : "all";
  d.roles = {{"actor", "actor", d.pools[0].name, actor},
             {"reference", "reference", other, "{\"model\": " + model + "}"},
             {"reward", "reward_rule", other, "{\"tokenizer\": \"bytes\"}"}};
  tr::Driver driver(d);
  tr::PipelineOptions o;
  o.iterations = iterations + 1;  // the first one warms up
  o.prompts_per_iteration = 16;
  o.samples = 4;
  auto stats = tr::run_grpo(driver, tn::Tokenizer::bytes({"<|endoftext|>"}), o);
  GrpoResult r;
  double seconds = 0, tokens = 0;
  for (size_t i = 1; i < stats.size(); ++i) {
    seconds += stats[i].seconds;
    tokens += static_cast<double>(stats[i].new_tokens);
  }
  r.seconds_per_iteration = seconds / iterations;
  r.tokens_per_second = tokens / seconds;
  return r;
}

// Transition on 4 thread ranks: training tp 4, generation tp 2.
void transition_bench(const tn::ModelConfig& cfg) {
  const int world = 4, t = 4, tg = 2;
  struct Out {
    double hybrid_s = 0, naive_s = 0;
    int64_t hybrid_bytes = 0, naive_bytes = 0, hybrid_held = 0, naive_held = 0, model_bytes = 0, sharded_bytes = 0;
  } out;
  std::mutex mu;
  tessera::dist::run_thread_ranks(world, [&](std::shared_ptr<tessera::dist::ProcessGroup> g) {
    const int me = g->rank();
    tn::Transformer model(cfg, {g, nullptr});  // training: tp over all 4 ranks
    model.init_random(1);
    auto engine = tr::hybrid_engine_groups(world, t, tg);
    auto micro = tr::make_micro_dp_group(*g, engine);
    int64_t model_bytes = 0, sharded_bytes = 0;
    for (const auto& name : model.full_parameter_names()) {
      int64_t n = 4;
      for (int64_t s : model.full_shape(name)) n *= s;
      model_bytes += n;
      auto layout = model.layout_of(name);
      if (layout.local_numel(me) != layout.global_numel()) sharded_bytes += n;
    }
    auto timed = [&](auto&& body) {
      g->barrier().wait();
      tessera::Stopwatch w;
      body();
      g->barrier().wait();
      return w.seconds();
    };
    int64_t hb = 0, held_h = 0, nb = 0, held_n = 0;
    double hs = 0, ns = 0;
    for (int rep = 0; rep < 3; ++rep) {
      hb = held_h = nb = held_n = 0;
      hs += timed([&] {
        for (const auto& [name, local] : model.named_parameters()) {
          auto layout = model.layout_of(name);
          const bool whole = layout.local_numel(me) == layout.global_numel();
          at::Tensor shard = whole ? local : tr::gather_generation_shard(local.detach(), micro, &hb,
                                                                          local.size(0) == model.full_shape(name)[0] ? 1 : 0);
          held_h += static_cast<int64_t>(shard.nbytes());
        }
      });
      ns += timed([&] {
        for (const auto& [name, local] : model.named_parameters()) {
          auto layout = model.layout_of(name);
          const bool whole = layout.local_numel(me) == layout.global_numel();
          if (whole) {
            held_n += static_cast<int64_t>(local.nbytes());
            continue;
          }
          // Naive: every rank gathers the whole weight, then keeps its slice.
          std::vector<int64_t> shape(local.sizes().begin(), local.sizes().end());
          shape[0] *= world;
          at::Tensor full = at::empty(shape, local.options());
          g->all_gather(full, local.detach().contiguous()).wait();
          nb += static_cast<int64_t>(local.nbytes()) * (world - 1);
          held_n += static_cast<int64_t>(full.nbytes());
        }
      });
    }
    if (me == 0) {
      std::lock_guard<std::mutex> lock(mu);
      out = {hs / 3, ns / 3, hb, nb, held_h, held_n, model_bytes, sharded_bytes};
    }
  });
  const double m = static_cast<double>(out.model_bytes);
  std::printf("\n2. transition, training tp %d -> generation tp %d on %d ranks, model %.1f MB\n", t, tg, world, m / 1e6);
  std::printf("%-34s %10s %14s %16s\n", "", "ms", "MB received", "MB held (gen)");
  std::printf("%-34s %10.1f %14.2f %16.2f\n", "3D-HybridEngine (micro-DP gather)", out.hybrid_s * 1e3,
              out.hybrid_bytes / 1e6, out.hybrid_held / 1e6);
  std::printf("%-34s %10.1f %14.2f %16.2f\n", "naive (full all-gather per rank)", out.naive_s * 1e3,
              out.naive_bytes / 1e6, out.naive_held / 1e6);
  std::printf("formula (d_g - 1) / (t p) M = %.2f MB (M = %.2f MB of tensor-parallel weights); "
              "hybrid / naive: bytes %.2fx, held %.2fx, time %.2fx\n",
              tr::hybrid_engine_bytes_per_rank(out.sharded_bytes, t, tg) / 1e6, out.sharded_bytes / 1e6,
              double(out.hybrid_bytes) / out.naive_bytes, double(out.hybrid_held) / out.naive_held,
              out.hybrid_s / out.naive_s);
}

void overhead_bench() {
  tr::DriverOptions d;
  d.pools = {{"all", 4}};
  d.roles = {{"noop", "noop", "all", "{}"}};
  tr::Driver driver(d);
  auto noop = driver.group("noop");
  std::printf("\n3. driver overhead per DP_COMPUTE call (batch on the workers, [rows, 256] fp32)\n");
  std::printf("%10s %12s %14s %16s\n", "rows", "MB", "ms per call", "request bytes");
  for (int64_t per_row : {1, 16, 256, 4096}) {
    tr::BatchRef seed = driver.put("seed", {{"n", at::zeros({16}, at::kLong)}});
    tr::BatchRef x = noop.call("make", {seed}, tr::Args().set("per_row", per_row)).get().output;
    for (int i = 0; i < 3; ++i) noop.call("touch", {x}).get();
    const int reps = 20;
    const int64_t before = driver.request_bytes();
    tessera::Stopwatch w;
    for (int i = 0; i < reps; ++i) noop.call("touch", {x}).get();
    const double ms = w.seconds() * 1e3 / reps;
    std::printf("%10lld %12.1f %14.3f %16lld\n", static_cast<long long>(x.rows), x.rows * 256 * 4 / 1e6, ms,
                static_cast<long long>((driver.request_bytes() - before) / reps));
    driver.release("noop");
  }
}

}  // namespace

int main(int argc, char** argv) {
  tessera::init_runtime();
  auto registry = tr::RoleRegistry::builtin();
  registry.add("noop", [] { return std::make_unique<NoopRole>(); });
  // Spawned copies run their roles before (and without) the command line.
  if (auto code = tr::run_worker_if_spawned(registry)) return *code;
  int64_t iterations = 12, hidden = 256;
  CLI::App app{
      "HybridFlow measurements: GRPO colocated vs split, the 3D-HybridEngine's "
      "training -> generation transition vs a naive reshard, driver overhead per call.",
      "rlhf_bench"};
  app.option_defaults()->always_capture_default();
  app.add_option("--iterations", iterations,
                 "measured GRPO iterations per placement (after one warm-up)")
      ->check(tessera::examples::positive());
  app.add_option("--hidden", hidden, "hidden size of the benchmark's 4-layer model (8 heads)")
      ->check(tessera::examples::positive());
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  tn::ModelConfig cfg;
  cfg.vocab_size = 256;
  cfg.hidden_size = hidden;
  cfg.intermediate_size = 4 * hidden;
  cfg.num_hidden_layers = 4;
  cfg.num_attention_heads = 8;
  cfg.num_key_value_heads = 4;
  cfg.max_position_embeddings = 256;
  cfg.eos_token_ids = {255};
  const std::string dir = (std::filesystem::temp_directory_path() / "tessera-rlhf-bench-model").string();
  tn::write_random_model(dir, cfg, 1);

  std::printf("1. GRPO, 4 worker processes, random %lld-hidden 4-layer model, 16 prompts x 4 samples, 16 new tokens\n",
              static_cast<long long>(hidden));
  std::printf("%-52s %14s %12s\n", "placement", "s/iteration", "tokens/s");
  for (bool pin : {true, false}) {
    const GrpoResult colocated = run_placement(dir, false, pin, iterations);
    const GrpoResult split = run_placement(dir, true, pin, iterations);
    const char* how = pin ? "pools own their CPUs" : "all processes share all CPUs";
    std::printf("%-52s %14.3f %12.1f\n", (std::string("colocated, ") + how).c_str(), colocated.seconds_per_iteration,
                colocated.tokens_per_second);
    std::printf("%-52s %14.3f %12.1f\n", (std::string("split (actor 2 | ref+reward 2), ") + how).c_str(),
                split.seconds_per_iteration, split.tokens_per_second);
    std::printf("colocated / split throughput (%s): %.2fx\n", how,
                colocated.tokens_per_second / split.tokens_per_second);
  }

  transition_bench(cfg);
  overhead_bench();
  std::filesystem::remove_all(dir);
  return 0;
}
