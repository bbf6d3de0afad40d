// tessera-sim — predicts the step time of a Tessera training job (Echo).
//
//   tessera-sim trace    --job job.json [--layout L] -o step.trace.json
//   tessera-sim predict  --trace step.trace.json --cluster gloo_local [--chrome tl.json]
//   tessera-sim collective --op all_reduce --gpus 16 --bytes 64M --cluster a100_ib [--table]
//
// Cluster, device and overlap files may be given by path or by the name of
// a bundled one (data/sim/NAME.json; TESSERA_SIM_DATA names another folder).
// `tessera-sim COMMAND --help` lists each command's options.
//
// Exit codes: 0 success, 1 validation outside its bounds, 2 usage, 3 any other error.
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/sim/calibration.h"
#include "tessera/sim/cluster.h"
#include "tessera/sim/collective_model.h"
#include "tessera/sim/overlap.h"
#include "tessera/sim/sweep.h"
#include "tessera/sim/synth.h"
#include "tessera/sim/timeline.h"
#include "tessera/sim/tracer.h"
#include "tessera/sim/training_job.h"
#include "tessera/sim/validate.h"

namespace {

namespace ts = tessera::sim;
namespace fs = std::filesystem;

// This program's path.
std::string self_path() {
  char self[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  TESSERA_CHECK(n > 0, Internal, "cannot read /proc/self/exe");
  self[n] = '\0';
  return self;
}

// Folders searched for bundled data files, in order.
std::vector<fs::path> data_dirs() {
  std::vector<fs::path> dirs;
  if (const char* env = std::getenv("TESSERA_SIM_DATA")) dirs.emplace_back(env);
  dirs.push_back(fs::path(self_path()).parent_path().parent_path() / "share" / "tessera" / "sim");
#ifdef TESSERA_SIM_DATA_DIR
  dirs.emplace_back(TESSERA_SIM_DATA_DIR);
#endif
  return dirs;
}

// A file given by path, or a bundled one by name ("a100_ib" or "a100_ib.json").
std::string find_data_file(const std::string& name_or_path, const char* what) {
  if (fs::exists(name_or_path)) return name_or_path;
  const std::string file =
      name_or_path.size() > 5 && name_or_path.substr(name_or_path.size() - 5) == ".json"
          ? name_or_path
          : name_or_path + ".json";
  std::string searched;
  for (const fs::path& dir : data_dirs()) {
    if (fs::exists(dir / file)) return (dir / file).string();
    searched += (searched.empty() ? "" : ", ") + dir.string();
  }
  TESSERA_THROW(NotFound, what, " '", name_or_path, "' is neither a file nor a bundled ", what,
                " (searched ", searched, ")");
}

void write_text(const std::string& path, const std::string& text) {
  tessera::AtomicFileWriter out(path);
  out.append(text.data(), text.size());
  out.commit();
}

std::string format_bytes(int64_t bytes) {
  char buf[32];
  if (bytes >= (int64_t{1} << 30)) {
    std::snprintf(buf, sizeof(buf), "%.2f GiB", bytes / 1073741824.0);
  } else {
    std::snprintf(buf, sizeof(buf), "%.1f MiB", bytes / 1048576.0);
  }
  return buf;
}

// "64M" -> bytes (K, M, G: powers of 1024).
int64_t parse_size(const std::string& text) {
  TESSERA_CHECK(!text.empty(), InvalidArgument, "empty size");
  int64_t unit = 1;
  std::string digits = text;
  switch (text.back()) {
    case 'K':
      unit = int64_t{1} << 10;
      break;
    case 'M':
      unit = int64_t{1} << 20;
      break;
    case 'G':
      unit = int64_t{1} << 30;
      break;
    default:
      break;
  }
  if (unit > 1) digits.pop_back();
  char* end = nullptr;
  const long long v = std::strtoll(digits.c_str(), &end, 10);
  TESSERA_CHECK(!digits.empty() && *end == '\0' && v > 0, InvalidArgument, "size '", text,
                "' is not a positive integer with an optional K, M or G suffix");
  return v * unit;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "Predicts the step time of a Tessera training job at any world size and layout "
      "(sub-commands below; tessera-sim SUBCOMMAND --help).",
      "tessera-sim"};
  app.option_defaults()->always_capture_default();
  app.require_subcommand(1);
  app.footer("Exit codes: 0 success, 1 validation outside its bounds, 2 usage, 3 any other error.");

  // trace
  std::string job_path, layout_text, out_path;
  ts::TracerOptions tracer;
  CLI::App* trace_cmd = app.add_subcommand(
      "trace", "run one step of each distinct rank here on placeholder groups and write the trace");
  trace_cmd->add_option("--job", job_path, "the training-job JSON file")->required();
  trace_cmd->add_option("--layout", layout_text, "replace the job's layout, e.g. dp=2,tp=2");
  trace_cmd->add_option("-o,--out", out_path, "the trace file to write")->required();
  trace_cmd->add_option("--warmup", tracer.warmup_steps, "untimed steps per traced rank")
      ->check(tessera::examples::at_least(0));
  trace_cmd
      ->add_option("--measure", tracer.measured_steps,
                   "timed steps per traced rank (median per node)")
      ->check(tessera::examples::positive());
  trace_cmd
      ->add_option("--threads", tracer.threads,
                   "intra-op threads (0: this machine's share per rank of the job)")
      ->check(tessera::examples::at_least(0));
  std::string device_name;
  trace_cmd->add_option("--device", device_name,
                        "write the analytical trace for this device (file or bundled name) "
                        "instead of running here");

  // predict
  std::string trace_path, cluster_name = "gloo_local_np2", overlap_name, chrome_path;
  int show_ranks = 8;
  bool medians_only = false;
  CLI::App* predict_cmd =
      app.add_subcommand("predict", "simulate a trace on a cluster and print the step time");
  predict_cmd->add_option("--trace", trace_path, "the trace file")->required();
  predict_cmd->add_option("--cluster", cluster_name, "cluster file or bundled cluster name");
  predict_cmd->add_option("--overlap", overlap_name,
                          "overlap-slowdown model file or bundled name (default: none)");
  predict_cmd->add_option("--chrome", chrome_path, "write the per-rank timelines (Chrome trace)");
  predict_cmd->add_option("--ranks", show_ranks, "ranks listed in the breakdown (slowest first)")
      ->check(tessera::examples::positive());
  predict_cmd->add_flag("--medians", medians_only,
                        "compose the per-node median durations once instead of replaying each "
                        "measured step of the trace and reporting the median step");

  // collective
  std::string op = "all_reduce", bytes_text, algorithm, dtype = "float";
  std::string min_bytes = "8", max_bytes = "1G";
  int gpus = 0;
  bool table = false;
  std::string collective_cluster = "a100_ib";
  CLI::App* collective_cmd = app.add_subcommand(
      "collective", "the modelled time of one collective (one line, microseconds) or a table");
  collective_cmd->add_option("--op", op,
                             "all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, "
                             "send_recv");
  collective_cmd->add_option("--gpus", gpus, "ranks, packed onto nodes in order")->required();
  collective_cmd->add_option("--bytes", bytes_text, "size (K, M, G suffixes: powers of 1024)");
  collective_cmd->add_option("--cluster", collective_cluster, "cluster file or bundled name");
  collective_cmd->add_flag("--table", table, "print an nccl-tests-style table instead");
  collective_cmd->add_option("--min-bytes", min_bytes, "table: smallest size");
  collective_cmd->add_option("--max-bytes", max_bytes, "table: largest size (doubling)");
  collective_cmd->add_option("--algorithm", algorithm, "ring, tree or direct (default: fastest)");
  collective_cmd->add_option("--dtype", dtype, "table: element type");

  // calibrate
  std::string calibrate_what, calibrate_out, calibrate_job;
  ts::CollectiveSweepOptions sweep_options;
  std::string sweep_max = "64M";
  int host_repeats = 9;
  std::string lockstep_layout = "tp=2";
  bool host_own_layout = false, host_compute_only = false;
  CLI::App* calibrate_cmd = app.add_subcommand(
      "calibrate",
      "measure this machine under tessera-launch: collective times (collectives), compute "
      "slowed by a concurrent all_reduce (overlap), compute slowed by other ranks (host)");
  calibrate_cmd->add_option("WHAT", calibrate_what, "collectives, overlap or host")
      ->required()
      ->check(CLI::IsMember({"collectives", "overlap", "host"}));
  calibrate_cmd
      ->add_option("-o,--out", calibrate_out,
                   "output: collective_bench JSON, overlap CSV, or host JSON")
      ->required();
  calibrate_cmd
      ->add_option("--group-size", sweep_options.group_size,
                   "collectives: ranks per concurrently running group (0: the world)")
      ->check(tessera::examples::at_least(0));
  calibrate_cmd->add_option("--max-bytes", sweep_max, "collectives: largest size");
  calibrate_cmd
      ->add_option("--compute-ms", sweep_options.compute_ms,
                   "collectives: compute this long before each call, as in a training step, "
                   "and time each call from its last member's issue (ranks on one host; 0: back "
                   "to back)")
      ->check(CLI::Range(0.0, 10000.0));
  calibrate_cmd->add_option("--job", calibrate_job, "host: the training job whose step is the work")
      ->check(CLI::ExistingFile);
  calibrate_cmd
      ->add_option("--repeats", host_repeats, "host: timed steps per count of ranks and mode")
      ->check(tessera::examples::positive());
  calibrate_cmd
      ->add_option("--lockstep-layout", lockstep_layout,
                   "host: the layout whose rank-0 step is timed in and out of step "
                   "(it must issue collectives)")
      ->capture_default_str();
  calibrate_cmd->add_flag("--own-layout", host_own_layout,
                          "host: time rank 0's step of the job's own layout (and ZeRO-1), out of "
                          "and in step, instead of the whole batch and --lockstep-layout");
  calibrate_cmd->add_flag("--compute-only", host_compute_only,
                          "host: only the slowdowns and the straggler share (no sync_us, no "
                          "comm_load)");

  // fit-cluster
  std::string recipe_path, fit_out;
  CLI::App* fit_cluster_cmd = app.add_subcommand(
      "fit-cluster", "fit a cluster file from a recipe (logs and measurements) and report errors");
  fit_cluster_cmd->add_option("RECIPE", recipe_path, "the cluster_fit recipe")
      ->required()
      ->check(CLI::ExistingFile);
  fit_cluster_cmd->add_option("-o,--out", fit_out, "the cluster file to write")->required();
  std::string fit_description, fit_provenance;
  fit_cluster_cmd->add_option("--description", fit_description,
                              "the cluster's description (default: the recipe's)");
  fit_cluster_cmd->add_option("--provenance", fit_provenance,
                              "how its measurements were taken (default: the recipe's)");

  // fit-overlap
  std::string samples_path, overlap_out;
  double test_fraction = 0.25;
  uint64_t split_seed = 1;
  CLI::App* fit_overlap_cmd = app.add_subcommand(
      "fit-overlap",
      "fit the overlap-slowdown regressor (XGBoost, and the linear fallback) and report the "
      "error on held-out samples");
  fit_overlap_cmd->add_option("SAMPLES", samples_path, "overlap samples (CSV or JSON)")
      ->required()
      ->check(CLI::ExistingFile);
  fit_overlap_cmd
      ->add_option("-o,--out", overlap_out, "the model file to write (fitted on all samples)")
      ->required();
  fit_overlap_cmd->add_option("--test-fraction", test_fraction, "share of samples held out")
      ->check(CLI::Range(0.05, 0.9));
  fit_overlap_cmd->add_option("--seed", split_seed, "seed of the held-out split");

  // sweep
  std::string sweep_job, sweep_device, sweep_cluster = "a100_ib", sweep_csv;
  std::vector<std::string> sweep_layouts;
  std::vector<int> sweep_worlds;
  int64_t sweep_global_batch = 0;
  CLI::App* sweep_cmd = app.add_subcommand(
      "sweep", "predict the step time of a job for every layout x world size (a table)");
  sweep_cmd->add_option("--job", sweep_job, "the training-job JSON file")
      ->required()
      ->check(CLI::ExistingFile);
  sweep_cmd
      ->add_option("--layouts", sweep_layouts,
                   "layouts, e.g. tp=8 tp=4,ep=2 (dp fills the rest of the world)")
      ->required();
  sweep_cmd->add_option("--world", sweep_worlds, "world sizes, e.g. 64 128 256")->required();
  sweep_cmd->add_option("--device", sweep_device,
                        "analytical traces for this device (file or bundled name); without it "
                        "every case is traced on this machine");
  sweep_cmd->add_option("--cluster", sweep_cluster, "cluster file or bundled name");
  sweep_cmd
      ->add_option("--global-batch", sweep_global_batch,
                   "sequences per step for every case (0: the job's sequences per data rank "
                   "times the data ranks: weak scaling)")
      ->check(tessera::examples::at_least(0));
  sweep_cmd->add_option("--csv", sweep_csv, "also write the table as CSV here");

  // validate
  std::string suite_path, report_md, report_json;
  ts::ValidationOptions validation;
  double max_median = 0.05, max_error = 0.12;
  CLI::App* validate_cmd = app.add_subcommand(
      "validate",
      "trace, predict and really run (tessera-launch + tessera-train) every case of a suite; "
      "exit 1 when the errors are outside the bounds");
  validate_cmd->add_option("SUITE", suite_path, "the validation suite file")
      ->required()
      ->check(CLI::ExistingFile);
  validate_cmd->add_option("--work-dir", validation.work_dir,
                           "where jobs, traces, timings and timelines go");
  validate_cmd->add_flag("--reuse", validation.reuse_measurements,
                         "re-use traces and timings already in the work directory");
  validate_cmd->add_option("--only", validation.only, "run only these cases (by name)");
  validate_cmd->add_option("--report", report_md, "also write the Markdown table here");
  validate_cmd->add_option("--json", report_json, "also write the report as JSON here");
  validate_cmd->add_option("--max-median-error", max_median, "bound on the median |error|");
  validate_cmd->add_option("--max-error", max_error, "bound on every |error|");
  validate_cmd
      ->add_option("--quiet-idle", validation.quiet_idle,
                   "before tracing and each run, wait until the host is this idle (0: never "
                   "wait)")
      ->check(CLI::Range(0.0, 1.0));
  validate_cmd
      ->add_option("--max-foreign-cpu", validation.max_foreign_cpu,
                   "repeat a run or tracing during which other processes used more than this "
                   "share of the CPU")
      ->check(CLI::Range(0.0, 1.0));
  validate_cmd
      ->add_option("--rounds", validation.rounds,
                   "trace, predict and measure every case this many times, round by round; "
                   "compare the medians")
      ->check(tessera::examples::positive());
  validate_cmd->add_option("--attempts", validation.max_attempts, "attempts per run and tracing")
      ->check(tessera::examples::positive());
  validate_cmd
      ->add_option("--host-job", validation.host_job,
                   "before each round, `calibrate host --job FILE` for each world size, and "
                   "predict the round with those host figures in the cluster files")
      ->check(CLI::ExistingFile);
  validate_cmd->add_flag("--host-median", validation.host_median,
                         "with --host-job: predict every round with the median over the rounds "
                         "of the host figures");
  validate_cmd->add_flag("--host-per-case", validation.host_per_case,
                         "before the first round, `calibrate host --own-layout --compute-only` "
                         "with each case's own step, and predict the case with those slowdowns "
                         "in its cluster file");
  validate_cmd
      ->add_option("--host-repeats", validation.host_repeats,
                   "with --host-job or --host-per-case: calibrate host's --repeats")
      ->check(tessera::examples::positive());

  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  try {
    if (trace_cmd->parsed()) {
      tessera::init_runtime();
      auto job = ts::TrainingJobConfig::load_file(job_path);
      if (!layout_text.empty()) {
        job.layout = ts::ParallelLayout::parse(layout_text);
        job.validate();
      }
      if (!device_name.empty()) {
        const ts::DeviceSpec device =
            ts::DeviceSpec::load_file(find_data_file(device_name, "device"));
        ts::Trace trace = ts::synthesize_trace(job, device);
        write_text(out_path, trace.to_json());
        std::printf("analytical trace of %s (%s, %d ranks) on %s -> %s\n",
                    job.name.empty() ? job_path.c_str() : job.name.c_str(),
                    job.layout.to_string().c_str(), trace.metadata.world_size, device.name.c_str(),
                    out_path.c_str());
        for (const ts::RankTrace& e : trace.entries) {
          std::printf("  ranks %d.. (%zu): %zu nodes, estimated peak memory %s\n", e.ranks.front(),
                      e.ranks.size(), e.nodes.size(), format_bytes(e.peak_memory_bytes).c_str());
        }
        return 0;
      }
      ts::TraceResult r = ts::trace_training_job(job, tracer);
      write_text(out_path, r.trace.to_json());
      std::printf("traced %zu of %d ranks (%s) in %.1f s -> %s\n", r.ranks.size(),
                  r.trace.metadata.world_size, job.layout.to_string().c_str(), r.seconds,
                  out_path.c_str());
      for (const ts::TracedRank& t : r.ranks) {
        std::printf("  rank %d (for %zu): %zu nodes, step %.4f s alone, peak memory %s\n", t.rank,
                    t.stands_for.size(), t.entry.nodes.size(), t.step_seconds,
                    format_bytes(t.peak_memory_bytes).c_str());
      }
      return 0;
    }
    if (predict_cmd->parsed()) {
      ts::Trace trace = ts::Trace::load_file(trace_path);
      ts::CollectiveModel collectives(
          ts::ClusterSpec::load_file(find_data_file(cluster_name, "cluster")));
      std::unique_ptr<ts::OverlapModel> overlap;
      if (!overlap_name.empty()) {
        overlap = ts::load_overlap_model(find_data_file(overlap_name, "overlap model"));
      }
      ts::SimulationOptions options;
      options.collectives = &collectives;
      options.overlap = overlap.get();
      options.record_events = !chrome_path.empty();
      options.replay_steps = !medians_only;
      ts::SimulationResult result = ts::simulate(trace, options);
      std::printf("%s: %d ranks on %s: step %.3f ms (slowest rank %d), simulated in %.3f s\n",
                  trace_path.c_str(), trace.metadata.world_size, collectives.cluster().name.c_str(),
                  result.step_time.count() / 1000.0, result.slowest_rank, result.wall_seconds);
      std::cout << ts::format_breakdown(result, static_cast<size_t>(show_ranks));
      if (!chrome_path.empty()) {
        write_text(chrome_path, ts::chrome_trace_json(trace, result));
        std::printf("timelines -> %s\n", chrome_path.c_str());
      }
      return 0;
    }
    if (calibrate_cmd->parsed()) {
      tessera::init_runtime();
      auto world = tessera::dist::init_process_group();
      std::string text;
      if (calibrate_what == "collectives") {
        sweep_options.max_bytes = parse_size(sweep_max);
        auto m = ts::measure_collectives(*world, sweep_options);
        text = ts::collective_bench_to_json(m, world->size());
      } else if (calibrate_what == "overlap") {
        text = ts::overlap_samples_to_csv(ts::measure_overlap(*world, {}));
      } else {
        TESSERA_CHECK(!calibrate_job.empty(), InvalidArgument,
                      "calibrate host: --job is required (the step that is the work)");
        ts::HostSharingOptions host;
        host.job = ts::TrainingJobConfig::load_file(calibrate_job);
        host.repeats = host_repeats;
        host.lockstep_repeats = host_repeats;
        host.lockstep_layout = ts::ParallelLayout::parse(lockstep_layout);
        host.own_layout = host_own_layout;
        host.compute_only = host_compute_only;
        text = ts::host_sharing_to_json(ts::measure_host_sharing(*world, host), calibrate_job);
      }
      if (world->rank() == 0) {
        write_text(calibrate_out, text);
        std::printf("%s on %d ranks -> %s\n", calibrate_what.c_str(), world->size(),
                    calibrate_out.c_str());
      }
      world->barrier().wait();
      return 0;
    }
    if (fit_cluster_cmd->parsed()) {
      ts::ClusterRecipe recipe = ts::load_cluster_recipe(recipe_path);
      if (!fit_description.empty()) recipe.options.description = fit_description;
      if (!fit_provenance.empty()) recipe.options.provenance = fit_provenance;
      ts::ClusterSpec cluster = ts::fit_cluster(recipe.fit_measurements, recipe.options);
      write_text(fit_out, cluster.to_json());
      ts::CollectiveModel model(cluster);
      std::cout << "fitted on " << recipe.fit_measurements.size() << " measurements:\n"
                << ts::evaluate_predictions(model, recipe.fit_measurements).to_text();
      if (!recipe.held_out_measurements.empty()) {
        std::cout << "held out (" << recipe.held_out_measurements.size() << " measurements):\n"
                  << ts::evaluate_predictions(model, recipe.held_out_measurements).to_text();
      }
      std::cout << "-> " << fit_out << "\n";
      return 0;
    }
    if (fit_overlap_cmd->parsed()) {
      auto samples = ts::load_overlap_samples(samples_path);
      auto split = ts::split_samples(samples, test_fraction, split_seed);
      auto report = [](const char* name, const ts::OverlapError& e) {
        std::printf(
            "  %-8s held-out %zu samples: mean |error| %.4f, RMS %.4f, mean |rel error| "
            "%.2f %%, max |error| %.4f\n",
            name, e.samples, e.mean_abs_error, e.rms_error, 100 * e.mean_abs_rel_error,
            e.max_abs_error);
      };
      std::printf("%zu samples, %zu for fitting, %zu held out\n", samples.size(),
                  split.train.size(), split.test.size());
      auto xgb = ts::fit_xgboost_overlap(split.train);
      auto linear = ts::fit_linear_overlap(split.train);
      report("xgboost", ts::evaluate_overlap(*xgb, split.test));
      report("linear", ts::evaluate_overlap(*linear, split.test));
      // Baseline: no slowdown at all.
      double base = 0;
      for (const auto& s : split.test) base += std::abs(s.slowdown - 1.0);
      std::printf("  %-8s held-out mean |error| %.4f (slowdown taken as 1)\n", "none",
                  base / static_cast<double>(split.test.size()));
      ts::fit_xgboost_overlap(samples)->save_file(overlap_out);
      std::printf("-> %s (xgboost, all samples)\n", overlap_out.c_str());
      return 0;
    }
    if (sweep_cmd->parsed()) {
      const ts::TrainingJobConfig base = ts::TrainingJobConfig::load_file(sweep_job);
      const int64_t per_data_rank = base.local_batch();
      std::optional<ts::DeviceSpec> device;
      if (!sweep_device.empty()) {
        device = ts::DeviceSpec::load_file(find_data_file(sweep_device, "device"));
      } else {
        tessera::init_runtime();
      }
      ts::CollectiveModel collectives(
          ts::ClusterSpec::load_file(find_data_file(sweep_cluster, "cluster")));
      auto factory = [&](const std::string& text, int world) {
        ts::ParallelLayout layout = ts::ParallelLayout::parse(text);
        const int model_parallel = layout.tp * layout.ep;
        if (text.find("dp=") == std::string::npos) {
          TESSERA_CHECK(world % model_parallel == 0, InvalidArgument, "layout ", text,
                        " does not divide a world of ", world);
          layout.dp = world / model_parallel;
        }
        TESSERA_CHECK(layout.world_size() == world, InvalidArgument, "layout ", layout.to_string(),
                      " has ", layout.world_size(), " ranks, not ", world);
        ts::TrainingJobConfig job = base.with_layout(layout);
        job.global_batch =
            sweep_global_batch > 0 ? sweep_global_batch : per_data_rank * job.data_ranks();
        job.validate();
        if (device) return ts::synthesize_trace(job, *device);
        return ts::trace_training_job(job).trace;
      };
      ts::SweepOptions opts;
      opts.layouts = sweep_layouts;
      opts.world_sizes = sweep_worlds;
      opts.simulation.collectives = &collectives;
      tessera::Stopwatch watch;
      std::vector<ts::SweepRow> rows = ts::sweep(factory, opts);
      std::cout << ts::format_sweep_table(rows);
      std::printf("%zu cases in %.2f s\n", rows.size(), watch.seconds());
      if (!sweep_csv.empty()) write_text(sweep_csv, ts::sweep_to_csv(rows));
      return 0;
    }
    if (validate_cmd->parsed()) {
      tessera::init_runtime();
      ts::ValidationSuite suite = ts::ValidationSuite::load_file(suite_path);
      const fs::path bin = fs::path(self_path()).parent_path();
      validation.launch_bin = (bin / "tessera-launch").string();
      validation.train_bin = (bin / "tessera-train").string();
      validation.sim_bin = self_path();
      validation.find_data_file = find_data_file;
      validation.on_row = [](const ts::ValidationRow& r) {
        std::printf("%-28s %d ranks %-14s measured %8.1f ms  predicted %8.1f ms  %+6.1f %%\n",
                    r.name.c_str(), r.world_size, r.layout.c_str(), r.measured_s * 1e3,
                    r.predicted_s * 1e3, 100 * r.error);
        std::fflush(stdout);
      };
      ts::ValidationReport report = ts::run_validation(suite, validation);
      const std::string table = report.to_markdown();
      std::cout << "\n" << table;
      if (!report_md.empty()) write_text(report_md, table);
      if (!report_json.empty()) write_text(report_json, report.to_json());
      const bool within =
          report.median_abs_error <= max_median && report.max_abs_error <= max_error;
      std::printf("%s: median |error| %.1f %% (bound %.1f %%), max %.1f %% (bound %.1f %%)\n",
                  within ? "within bounds" : "OUTSIDE bounds", 100 * report.median_abs_error,
                  100 * max_median, 100 * report.max_abs_error, 100 * max_error);
      return within ? 0 : 1;
    }
    if (collective_cmd->parsed()) {
      std::vector<std::string> args = {"--op",        op,
                                       "--gpus",      std::to_string(gpus),
                                       "--cluster",   find_data_file(collective_cluster, "cluster"),
                                       "--min-bytes", min_bytes,
                                       "--max-bytes", max_bytes,
                                       "--dtype",     dtype};
      if (!bytes_text.empty()) args.insert(args.end(), {"--bytes", bytes_text});
      if (!algorithm.empty()) args.insert(args.end(), {"--algorithm", algorithm});
      if (table) args.push_back("--table");
      std::cout << ts::run_collective_command(ts::parse_collective_command(args));
      return 0;
    }
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "tessera-sim: " << e.what() << "\n";
    return 3;
  }
}
