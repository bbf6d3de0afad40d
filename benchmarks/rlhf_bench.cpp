// HybridFlow measurements, in one run:
//  1. GRPO iteration time and generated tokens/s with every role colocated
//     on 4 worker processes (the actor re-laid out by the 3D-HybridEngine
//     between training and generation) vs the same 4 processes split into
//     separate pools, for every split of the 4 (actor on 1, 2 or 3,
//     reference + reward on the rest; the actor's tensor parallelism is 2
//     where its pool size allows, else 1), each with pools owning their
//     CPUs (pinned, the same CPUs in total) and with all processes sharing
//     all CPUs; the best split is compared with colocated;
//  2. the training -> generation transition of the 3D-HybridEngine (one
//     all-gather inside micro-DP groups) vs a naive reshard that all-gathers
//     the full weights on every rank: time, bytes received per rank and
//     generation weights held per rank;
//  3. driver overhead per call as the batch grows (the batch stays on the
//     workers; requests carry references).
//
// Bytes received in the transition are counted by a CollectiveObserver on
// the process group: what each completed operation delivered to the rank
// from other ranks (all_gather: its output less its own block; all_to_all:
// the receive splits less its own; broadcast to a non-root and recv: the
// tensor; reduce_scatter: the input less its own share), not what the
// engine's own counter claims.
//
//   build/release/bin/rlhf_bench [--iterations 12] [--hidden 256] [--reps 15]
//       [--warmup 1] [--quick] [--json FILE]   (--help: the options)
#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>

#include "bench_report.h"
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
using nlohmann::json;

namespace {

// A role for the overhead measurement: "make" creates rows on the workers,
// "touch" reads them and does nothing else.
class NoopRole : public tr::Role {
 public:
  void setup(tr::WorkerContext& ctx, tr::MethodTable& methods) override {
    tr::MethodMesh mesh{ctx.size, 1, ctx.rank, 0};
    methods.add("make", tr::Protocol::kDpCompute, mesh,
                [](const tr::Batch& in, const tessera::ConfigObject& a) {
                  const int64_t rows = in.at("n").size(0) * a.get_int("per_row");
                  return tr::MethodResult{{{"x", at::ones({rows, 256})}}, {}};
                });
    methods.add("touch", tr::Protocol::kDpCompute, mesh,
                [](const tr::Batch& in, const tessera::ConfigObject&) {
                  return tr::MethodResult{{}, {{"rows", static_cast<double>(in.at("x").size(0))}}};
                });
  }
};

struct GrpoResult {
  std::vector<double> seconds;  // per timed iteration
  std::vector<double> tokens;   // generated tokens per timed iteration
  double seconds_per_iteration = 0, tokens_per_second = 0;
};

// actor_processes 0: colocated on all 4 processes; else the actor's pool
// has that many processes and the reference + reward pool the rest.
GrpoResult run_placement(const std::string& model_dir, int actor_processes, bool pin,
                         int64_t iterations, int64_t prompts) {
  const bool split = actor_processes > 0;
  const int actor_pool = split ? actor_processes : 4;
  tr::DriverOptions d;
  // Pools own their CPUs, as they would own GPUs: an idle pool's CPU is not
  // lent to the busy one.
  d.pin_cpus = pin;
  const std::string model = "{\"hf\": \"" + model_dir + "\"}";
  const int tp = actor_pool % 2 == 0 ? 2 : 1;
  const std::string actor = "{\"model\": " + model + ", \"tp\": " + std::to_string(tp) +
                            ", \"gen_tp\": 1, \"lr\": 1e-4, \"max_new_tokens\": 16, \"seed\": 1}";
  d.pools = {{split ? "actor" : "all", actor_pool}};
  if (split) d.pools.push_back({"others", 4 - actor_processes});
  const std::string other = split ? "others" : "all";
  d.roles = {{"actor", "actor", d.pools[0].name, actor},
             {"reference", "reference", other, "{\"model\": " + model + "}"},
             {"reward", "reward_rule", other, "{\"tokenizer\": \"bytes\"}"}};
  tr::Driver driver(d);
  tr::PipelineOptions o;
  o.iterations = iterations + 1;  // the first one warms up
  o.prompts_per_iteration = prompts;
  o.samples = 4;
  auto stats = tr::run_grpo(driver, tn::Tokenizer::bytes({"<|endoftext|>"}), o);
  GrpoResult r;
  double seconds = 0, tokens = 0;
  for (size_t i = 1; i < stats.size(); ++i) {
    seconds += stats[i].seconds;
    tokens += static_cast<double>(stats[i].new_tokens);
    r.seconds.push_back(stats[i].seconds);
    r.tokens.push_back(static_cast<double>(stats[i].new_tokens));
  }
  r.seconds_per_iteration = seconds / iterations;
  r.tokens_per_second = tokens / seconds;
  return r;
}

// Counts, per world rank, the bytes each completed operation delivered to
// that rank from other ranks (see the file comment). Shared by the thread
// ranks; each rank's counter is written only by its own thread.
class ReceivedBytes : public tessera::dist::CollectiveObserver {
 public:
  void on_issue(const tessera::dist::CollectiveCall&) override {}
  void on_complete(const tessera::dist::CollectiveCall& c) override {
    const int n = static_cast<int>(c.ranks.size());
    const int world_rank = c.ranks.at(c.rank);
    int64_t got = 0;
    if (c.op == "all_gather" || c.op == "reduce_scatter") {
      got = c.bytes / n * (n - 1);
    } else if (c.op == "all_to_all") {
      for (int r = 0; r < static_cast<int>(c.recv_bytes.size()); ++r) {
        if (r != c.rank) got += c.recv_bytes[r];
      }
    } else if ((c.op == "broadcast" && c.peer != c.rank) || c.op == "recv") {
      got = c.bytes;
    } else if (c.op == "all_reduce") {
      got = 2 * c.bytes / n * (n - 1);  // a ring all_reduce's receive volume
    }
    counts_.at(world_rank) += got;
  }
  int64_t received(int world_rank) const { return counts_.at(world_rank).load(); }

 private:
  std::array<std::atomic<int64_t>, 64> counts_{};
};

// The transition as it was before it went through dist's planner: one
// all_gather inside the micro-DP group, blocks put side by side along `dim`
// (equal blocks only). Kept here to measure the planner path against it.
at::Tensor direct_all_gather(const at::Tensor& local, tessera::dist::ProcessGroup& micro,
                             int64_t dim, int64_t* received) {
  const int n = micro.size();
  std::vector<int64_t> shape(local.sizes().begin(), local.sizes().end());
  shape[0] *= n;
  at::Tensor out = at::empty(shape, local.options());
  at::Tensor in = local.contiguous();
  micro.all_gather(out, in).wait();
  *received += static_cast<int64_t>(in.nbytes()) * (n - 1);
  return dim == 0 ? out : at::cat(out.chunk(n, 0), dim);
}

// Transition on 4 thread ranks: training tp 4, generation tp 2. Each method
// runs `reps` times (after `warmup`), interleaved. Bytes received are the
// observer's count on rank 0 (every rank receives the same amount here).
void transition_bench(const tn::ModelConfig& cfg, int reps, int warmup,
                      tessera::bench::Report& report) {
  const int world = 4, t = 4, tg = 2;
  struct Out {
    std::vector<double> planner_s, direct_s, naive_s;
    int64_t planner_bytes = 0, direct_bytes = 0, naive_bytes = 0, planner_held = 0, naive_held = 0,
            model_bytes = 0, sharded_bytes = 0, planner_claimed = 0;
  } out;
  std::mutex mu;
  auto observer = std::make_shared<ReceivedBytes>();
  tessera::dist::ProcessGroupOptions pgo;
  pgo.observer = observer;
  tessera::dist::run_thread_ranks(
      world,
      [&](std::shared_ptr<tessera::dist::ProcessGroup> g) {
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
        // Seconds of `body` between barriers, and the bytes the observer saw
        // this rank receive during it (the barriers move none).
        auto timed = [&](auto&& body, int64_t* received) {
          g->barrier().wait();
          const int64_t before = observer->received(me);
          tessera::Stopwatch w;
          body();
          g->barrier().wait();
          *received = observer->received(me) - before;
          return w.seconds();
        };
        auto dim_of = [&](const std::string& name, const at::Tensor& local) {
          return local.size(0) == model.full_shape(name)[0] ? int64_t{1} : int64_t{0};
        };
        int64_t pb = 0, held_p = 0, db = 0, nb = 0, held_n = 0, p_seen = 0, d_seen = 0, n_seen = 0;
        std::vector<double> ps, ds, ns;
        for (int rep = 0; rep < warmup + reps; ++rep) {
          pb = held_p = db = nb = held_n = 0;
          const double p = timed(
              [&] {
                for (const auto& [name, local] : model.named_parameters()) {
                  auto layout = model.layout_of(name);
                  const bool whole = layout.local_numel(me) == layout.global_numel();
                  at::Tensor shard = whole ? local
                                           : tr::gather_generation_shard(local.detach(), micro, &pb,
                                                                         dim_of(name, local));
                  held_p += static_cast<int64_t>(shard.nbytes());
                }
              },
              &p_seen);
          const double d = timed(
              [&] {
                for (const auto& [name, local] : model.named_parameters()) {
                  auto layout = model.layout_of(name);
                  if (layout.local_numel(me) == layout.global_numel()) continue;
                  (void)direct_all_gather(local.detach(), *micro, dim_of(name, local), &db);
                }
              },
              &d_seen);
          const double n = timed(
              [&] {
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
              },
              &n_seen);
          if (rep >= warmup) {
            ps.push_back(p);
            ds.push_back(d);
            ns.push_back(n);
          }
        }
        if (me == 0) {
          std::lock_guard<std::mutex> lock(mu);
          out = {ps,     ds,     ns,          p_seen,        d_seen, n_seen,
                 held_p, held_n, model_bytes, sharded_bytes, pb};
        }
      },
      pgo);
  auto median = [](std::vector<double> v) { return tessera::bench::median(std::move(v)); };
  const double m = static_cast<double>(out.model_bytes);
  const double formula = tr::hybrid_engine_bytes_per_rank(out.sharded_bytes, t, tg);
  std::printf(
      "\n2. transition, training tp %d -> generation tp %d on %d ranks (threads), model %.1f MB, "
      "%d reps\n",
      t, tg, world, m / 1e6, reps);
  std::printf("%-44s %10s %18s %14s %16s\n", "", "ms (med)", "ms (min-max)", "MB received",
              "MB held (gen)");
  auto row = [&](const char* what, const std::vector<double>& s, int64_t bytes, double held) {
    std::printf("%-44s %10.2f %8.2f-%-9.2f %14.2f %16s\n", what, median(s) * 1e3,
                tessera::bench::min_of(s) * 1e3, tessera::bench::max_of(s) * 1e3, bytes / 1e6,
                held < 0 ? "" : std::to_string(held / 1e6).substr(0, 6).c_str());
  };
  row("3D-HybridEngine via dist planner (now)", out.planner_s, out.planner_bytes,
      static_cast<double>(out.planner_held));
  row("3D-HybridEngine, direct all_gather (before)", out.direct_s, out.direct_bytes, -1);
  row("naive (full all-gather per rank)", out.naive_s, out.naive_bytes,
      static_cast<double>(out.naive_held));
  std::printf(
      "MB received as counted by the process group's observer; the engine's own count: %.2f MB\n",
      out.planner_claimed / 1e6);
  std::printf(
      "formula (d_g - 1) / (t p) M = %.2f MB (M = %.2f MB of tensor-parallel weights); "
      "planner / direct: bytes %.2fx, time %.2fx; planner / naive: bytes %.2fx, held %.2fx, time "
      "%.2fx\n",
      formula / 1e6, out.sharded_bytes / 1e6, double(out.planner_bytes) / out.direct_bytes,
      median(out.planner_s) / median(out.direct_s), double(out.planner_bytes) / out.naive_bytes,
      double(out.planner_held) / out.naive_held, median(out.planner_s) / median(out.naive_s));
  report.add_series("transition.planner", "s", out.planner_s,
                    {{"method", "3D-HybridEngine via dist planner"}});
  report.add_series("transition.direct", "s", out.direct_s,
                    {{"method", "3D-HybridEngine, direct all_gather"}});
  report.add_series("transition.naive", "s", out.naive_s,
                    {{"method", "naive full all-gather per rank"}});
  report.facts()["transition"] = {{"training_tp", t},
                                  {"generation_tp", tg},
                                  {"ranks", world},
                                  {"model_bytes", out.model_bytes},
                                  {"sharded_bytes", out.sharded_bytes},
                                  {"formula_bytes", formula},
                                  {"planner_received_bytes", out.planner_bytes},
                                  {"direct_received_bytes", out.direct_bytes},
                                  {"naive_received_bytes", out.naive_bytes},
                                  {"planner_engine_count_bytes", out.planner_claimed},
                                  {"planner_held_bytes", out.planner_held},
                                  {"naive_held_bytes", out.naive_held}};
}

void overhead_bench(int reps, int64_t max_per_row, tessera::bench::Report& report) {
  tr::DriverOptions d;
  d.pools = {{"all", 4}};
  d.roles = {{"noop", "noop", "all", "{}"}};
  tr::Driver driver(d);
  auto noop = driver.group("noop");
  std::printf(
      "\n3. driver overhead per DP_COMPUTE call (batch on the workers, [rows, 256] fp32)\n");
  std::printf("%10s %12s %14s %16s\n", "rows", "MB", "ms per call", "request bytes");
  for (int64_t per_row : {int64_t{1}, int64_t{16}, int64_t{256}, int64_t{4096}}) {
    if (per_row > max_per_row) break;
    tr::BatchRef seed = driver.put("seed", {{"n", at::zeros({16}, at::kLong)}});
    tr::BatchRef x = noop.call("make", {seed}, tr::Args().set("per_row", per_row)).get().output;
    for (int i = 0; i < 3; ++i) noop.call("touch", {x}).get();
    const int64_t before = driver.request_bytes();
    std::vector<double> ms;
    for (int i = 0; i < reps; ++i) {
      tessera::Stopwatch w;
      noop.call("touch", {x}).get();
      ms.push_back(w.milliseconds());
    }
    const int64_t request = (driver.request_bytes() - before) / reps;
    std::printf("%10lld %12.1f %14.3f %16lld\n", static_cast<long long>(x.rows),
                x.rows * 256 * 4 / 1e6, tessera::bench::median(ms),
                static_cast<long long>(request));
    report.add_series(
        "overhead.rows" + std::to_string(x.rows), "ms", ms,
        {{"rows", x.rows}, {"batch_bytes", x.rows * 256 * 4}, {"request_bytes", request}});
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
  std::string only;
  tessera::bench::RepeatOptions rep;
  rep.reps = 15;
  rep.warmup = 1;
  CLI::App app{
      "HybridFlow measurements: GRPO colocated vs every split of the pools, the 3D-HybridEngine's "
      "training -> generation transition vs a naive reshard, driver overhead per call.",
      "rlhf_bench"};
  app.option_defaults()->always_capture_default();
  app.add_option("--iterations", iterations,
                 "measured GRPO iterations per placement (after one warm-up)")
      ->check(tessera::examples::positive());
  app.add_option("--hidden", hidden, "hidden size of the benchmark's 4-layer model (8 heads)")
      ->check(tessera::examples::positive());
  app.add_option("--only", only, "run one section: grpo, transition or overhead")
      ->check(CLI::IsMember({"grpo", "transition", "overhead"}));
  tessera::bench::add_repeat_options(app, rep);
  app.get_option("--reps")->description("repetitions of each transition method and driver call");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  int64_t prompts = 16;
  if (rep.quick) {
    iterations = std::min<int64_t>(iterations, 1);
    hidden = std::min<int64_t>(hidden, 64);
    prompts = 4;
  }
  tn::ModelConfig cfg;
  cfg.vocab_size = 256;
  cfg.hidden_size = hidden;
  cfg.intermediate_size = 4 * hidden;
  cfg.num_hidden_layers = 4;
  cfg.num_attention_heads = 8;
  cfg.num_key_value_heads = 4;
  cfg.max_position_embeddings = 256;
  cfg.eos_token_ids = {255};
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("tessera-rlhf-bench-model-" + std::to_string(::getpid())))
                              .string();
  tn::write_random_model(dir, cfg, 1);
  tessera::bench::Report report("rlhf", argc, argv, rep.quick);

  const bool all = only.empty();
  json placements = json::array();
  if (all || only == "grpo") {
    std::printf(
        "1. GRPO, 4 worker processes, random %lld-hidden 4-layer model, %lld prompts x 4 samples, "
        "16 new tokens, %lld timed iterations\n",
        static_cast<long long>(hidden), static_cast<long long>(prompts),
        static_cast<long long>(iterations));
    std::printf("%-60s %14s %12s\n", "placement", "s/iteration", "tokens/s");
    // Quick: the pinned colocated and 2|2 placements only.
    const std::vector<int> splits =
        rep.quick ? std::vector<int>{0, 2} : std::vector<int>{0, 1, 2, 3};
    for (bool pin : rep.quick ? std::vector<bool>{true} : std::vector<bool>{true, false}) {
      const char* how = pin ? "pools own their CPUs" : "all processes share all CPUs";
      for (int a : splits) {
        const GrpoResult r = run_placement(dir, a, pin, iterations, prompts);
        const std::string name = a == 0 ? std::string("colocated (4 processes, actor tp 2)")
                                        : "split (actor " + std::to_string(a) + " | ref+reward " +
                                              std::to_string(4 - a) + ", actor tp " +
                                              std::to_string(a % 2 == 0 ? 2 : 1) + ")";
        std::printf("%-60s %14.3f %12.1f\n", (name + ", " + how).c_str(), r.seconds_per_iteration,
                    r.tokens_per_second);
        std::fflush(stdout);
        const std::string id = std::string("grpo.") + (pin ? "pinned" : "shared") + "." +
                               (a == 0 ? std::string("colocated") : "split" + std::to_string(a));
        report.add_series(id + ".seconds", "s", r.seconds,
                          {{"placement", name}, {"actor_processes", a}, {"pinned", pin}});
        report.add_series(id + ".tokens", "tokens", r.tokens,
                          {{"placement", name}, {"actor_processes", a}, {"pinned", pin}});
        placements.push_back({{"id", id}, {"name", name}, {"actor_processes", a}, {"pinned", pin}});
      }
    }
  }
  if (all || only == "transition")
    transition_bench(cfg, rep.quick ? 2 : rep.reps, rep.warmup, report);
  if (all || only == "overhead")
    overhead_bench(rep.quick ? 3 : std::max(rep.reps, 20), rep.quick ? 16 : 4096, report);
  report.config() = {{"hidden", hidden},
                     {"layers", cfg.num_hidden_layers},
                     {"heads", cfg.num_attention_heads},
                     {"worker_processes", 4},
                     {"iterations", iterations},
                     {"warmup_iterations", 1},
                     {"prompts_per_iteration", prompts},
                     {"samples", 4},
                     {"new_tokens", 16},
                     {"placements", placements},
                     {"reps", rep.reps},
                     {"warmup", rep.warmup}};
  report.write(rep.json);
  std::filesystem::remove_all(dir);
  return 0;
}
