#include "tessera/sim/validate.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "host_cpu.h"
#include "json_reader.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/log.h"
#include "tessera/core/subprocess.h"
#include "tessera/sim/calibration.h"
#include "tessera/sim/collective_model.h"
#include "tessera/sim/overlap.h"
#include "tessera/sim/tracer.h"
#include "util.h"

namespace tessera::sim {

namespace fs = std::filesystem;

ValidationSuite ValidationSuite::parse(std::string_view text, const std::string& source,
                                       const std::string& base_dir) {
  const detail::json root = detail::parse_json(text, source);
  detail::JsonObject top(root, source);
  const std::string schema = top.get_string("schema");
  if (schema != "tessera.sim.validation/1") {
    top.fail("schema", "expected 'tessera.sim.validation/1', got '" + schema + "'");
  }
  ValidationSuite s;
  s.source = source;
  detail::JsonObject clusters = top.get_object("clusters");
  for (const std::string& key : clusters.keys()) {
    char* end = nullptr;
    const long world = std::strtol(key.c_str(), &end, 10);
    if (key.empty() || *end != '\0' || world < 1) {
      clusters.fail(key, "keys are world sizes (positive integers)");
    }
    s.clusters[static_cast<int>(world)] = clusters.get_string(key);
  }
  clusters.check_keys();
  s.overlap = top.get_string("overlap", "");
  s.warmup_steps = static_cast<int>(top.get_size("warmup_steps", s.warmup_steps));
  s.measured_steps = static_cast<int>(top.get_size("measured_steps", s.measured_steps));
  if (s.measured_steps < 1) top.fail("measured_steps", "must be >= 1");
  if (top.has("trace")) {
    detail::JsonObject t = top.get_object("trace");
    s.trace_warmup_steps = static_cast<int>(t.get_size("warmup_steps", s.trace_warmup_steps));
    s.trace_measured_steps = static_cast<int>(t.get_size("measured_steps", s.trace_measured_steps));
    if (s.trace_measured_steps < 1) t.fail("measured_steps", "must be >= 1");
    t.check_keys();
  }
  const detail::json& cases = top.get_array("cases");
  for (size_t i = 0; i < cases.size(); ++i) {
    detail::JsonObject c(cases[i], source, "cases[" + std::to_string(i) + "]");
    ValidationCase vc;
    vc.name = c.get_string("name");
    if (vc.name.empty()) c.fail("name", "must not be empty");
    for (const ValidationCase& other : s.cases) {
      if (other.name == vc.name) c.fail("name", "'" + vc.name + "' is used twice");
    }
    const std::string job = c.get_string("job");
    vc.job_file = fs::path(job).is_absolute() ? job : (fs::path(base_dir) / job).string();
    if (c.has("layout")) {
      try {
        vc.layout = ParallelLayout::parse(c.get_string("layout"));
      } catch (const InvalidArgument& e) {
        c.fail("layout", e.message());
      }
    }
    if (c.has("zero1")) vc.zero1 = c.get_bool("zero1", false);
    c.check_keys();
    s.cases.push_back(std::move(vc));
  }
  if (s.cases.empty()) top.fail("cases", "no cases");
  top.check_keys();
  return s;
}

ValidationSuite ValidationSuite::load_file(const std::string& path) {
  const std::string text = detail::read_text_file(path, "validation suite");
  const std::string dir = fs::path(path).parent_path().string();
  return parse(text, path, dir.empty() ? "." : dir);
}

namespace {

void write_text(const std::string& path, const std::string& text) {
  AtomicFileWriter out(path);
  out.append(text.data(), text.size());
  out.commit();
}

// "dense-s dp=2" -> "dense-s_dp_2"
std::string file_stem(const std::string& name) {
  std::string out;
  for (char c : name) {
    out.push_back(std::isalnum(static_cast<unsigned char>(c)) || c == '-' ? c : '_');
  }
  return out;
}

std::string tail(const std::string& text, size_t n) {
  return text.size() <= n ? text : "..." + text.substr(text.size() - n);
}

using detail::CpuSnapshot;
using detail::foreign_share;
using detail::host_cpus;

// Waits until the host was at least `idle` idle over two seconds.
void wait_until_quiet(double idle, std::chrono::seconds timeout) {
  if (idle <= 0) return;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    const CpuSnapshot a = CpuSnapshot::take();
    std::this_thread::sleep_for(std::chrono::seconds(2));
    const CpuSnapshot b = CpuSnapshot::take();
    const double wall = std::chrono::duration<double>(b.at - a.at).count();
    const double busy = (b.host_busy_s - a.host_busy_s) / (wall * host_cpus());
    if (1 - busy >= idle) return;
    if (std::chrono::steady_clock::now() > deadline) {
      TESSERA_LOG(Warn, "sim") << "the host stayed busy (" << static_cast<int>(100 * busy)
                               << " % of its CPU time) for " << timeout.count()
                               << " s; measuring anyway";
      return;
    }
  }
}

}  // namespace

ValidationRow combine_rounds(const std::vector<ValidationRow>& rounds) {
  TESSERA_CHECK(!rounds.empty(), InvalidArgument, "combine_rounds: no rounds");
  if (rounds.size() == 1) return rounds.front();
  // The round whose measurement is the median carries the breakdowns.
  std::vector<size_t> order(rounds.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return rounds[a].measured_s < rounds[b].measured_s; });
  ValidationRow row = rounds[order[(order.size() - 1) / 2]];
  std::vector<double> measured, predicted;
  row.run_attempts = 0;
  row.trace_seconds = 0;
  for (const ValidationRow& r : rounds) {
    measured.push_back(r.measured_s);
    predicted.push_back(r.predicted_s);
    row.run_attempts += r.run_attempts;
    row.trace_seconds += r.trace_seconds;
  }
  row.round_measured_s = measured;
  row.round_predicted_s = predicted;
  row.measured_s = detail::median(measured);
  row.predicted_s = detail::median(predicted);
  row.measured_min_s = *std::min_element(measured.begin(), measured.end());
  row.measured_max_s = *std::max_element(measured.begin(), measured.end());
  row.error = (row.predicted_s - row.measured_s) / row.measured_s;
  return row;
}

void summarize(ValidationReport& report) {
  std::vector<double> errors;
  for (const ValidationRow& r : report.rows) errors.push_back(std::abs(r.error));
  if (errors.empty()) return;
  report.median_abs_error = detail::median(errors);
  report.max_abs_error = *std::max_element(errors.begin(), errors.end());
  double sum = 0;
  for (double e : errors) sum += e;
  report.mean_abs_error = sum / static_cast<double>(errors.size());
}

ValidationReport run_validation(const ValidationSuite& suite, const ValidationOptions& options) {
  auto find = [&](const std::string& name, const char* what) {
    return options.find_data_file ? options.find_data_file(name, what) : name;
  };
  fs::create_directories(options.work_dir);
  std::unique_ptr<OverlapModel> overlap;
  if (!suite.overlap.empty()) overlap = load_overlap_model(find(suite.overlap, "overlap model"));
  TESSERA_CHECK(options.rounds >= 1, InvalidArgument, "validate: rounds must be >= 1, got ",
                options.rounds);
  TESSERA_CHECK(!options.host_median || !options.host_job.empty(), InvalidArgument,
                "validate: host_median needs host_job (the host figures it takes the median of)");
  TESSERA_CHECK(!options.host_per_case || options.host_job.empty(), InvalidArgument,
                "validate: host_per_case and host_job are exclusive (per-case figures or one "
                "job's per round)");
  TESSERA_CHECK(options.host_repeats >= 1, InvalidArgument,
                "validate: host_repeats must be >= 1, got ", options.host_repeats);
  auto load_job = [](const ValidationCase& vc) {
    TrainingJobConfig job = TrainingJobConfig::load_file(vc.job_file);
    if (vc.layout) job.layout = *vc.layout;
    if (vc.zero1) job.zero1 = *vc.zero1;
    job.name = vc.name;
    job.validate();
    return job;
  };
  std::vector<const ValidationCase*> cases;
  std::set<int> worlds;
  for (const ValidationCase& vc : suite.cases) {
    if (options.only.empty() ||
        std::find(options.only.begin(), options.only.end(), vc.name) != options.only.end()) {
      cases.push_back(&vc);
      const int world = load_job(vc).layout.world_size();
      TESSERA_CHECK(suite.clusters.count(world) != 0, InvalidArgument, suite.source, ": case '",
                    vc.name, "' has ", world, " ranks but 'clusters' has no entry \"", world, "\"");
      worlds.insert(world);
    }
  }
  // `calibrate host` for `world` ranks with the step of `job_file` (and
  // the extra flags) into host_path, unless re-used; the figures.
  auto calibrate_host = [&](int world, const std::string& job_file,
                            const std::vector<std::string>& flags, const std::string& host_path) {
    if (!(options.reuse_measurements && fs::exists(host_path))) {
      wait_until_quiet(options.quiet_idle, options.quiet_timeout);
      std::vector<std::string> argv = {options.launch_bin,
                                       "--nproc",
                                       std::to_string(world),
                                       "--",
                                       options.sim_bin,
                                       "calibrate",
                                       "host",
                                       "--job",
                                       job_file,
                                       "--repeats",
                                       std::to_string(options.host_repeats)};
      argv.insert(argv.end(), flags.begin(), flags.end());
      argv.insert(argv.end(), {"-o", host_path});
      CommandResult run = run_command(argv, options.run_timeout);
      TESSERA_CHECK(run.status.success(), Unavailable, "validate: measuring the host for ", world,
                    " ranks ('", options.launch_bin, " --nproc ", world, " -- ", options.sim_bin,
                    " calibrate host --job ", job_file, " ...') ", run.status.describe(), ": ",
                    tail(run.output, 2000));
    }
    HostSharing host =
        parse_host_sharing(detail::read_text_file(host_path, "host measurement"), host_path);
    TESSERA_CHECK(host.compute_slowdown.size() == static_cast<size_t>(world), InvalidArgument,
                  host_path, ": measured for ", host.compute_slowdown.size(), " ranks, expected ",
                  world);
    return host;
  };
  // With host_job: the host's figures before each round, by round and
  // world size.
  std::map<std::pair<int, int>, HostSharing> hosts;
  auto measure_host = [&](int round, int world) {
    const std::string host_path =
        (fs::path(options.work_dir) /
         ("host.r" + std::to_string(round + 1) + ".np" + std::to_string(world) + ".json"))
            .string();
    HostSharing host = calibrate_host(world, options.host_job, {}, host_path);
    TESSERA_LOG(Info, "sim") << "round " << round + 1 << ", " << world
                             << " ranks: host_compute_slowdown "
                             << nlohmann::json(host.compute_slowdown).dump() << ", lockstep "
                             << nlohmann::json(host.lockstep_slowdown).dump();
    hosts[{round, world}] = std::move(host);
  };
  // With host_per_case: each case's own figures, by case index.
  std::map<size_t, HostSharing> case_hosts;
  auto measure_case_host = [&](size_t index) {
    const ValidationCase& vc = *cases[index];
    TrainingJobConfig job = load_job(vc);
    const std::string stem = (fs::path(options.work_dir) / file_stem(vc.name)).string();
    job.source = stem + ".host-job.json";
    write_text(job.source, job.to_json());
    HostSharing host = calibrate_host(job.layout.world_size(), job.source,
                                      {"--own-layout", "--compute-only"}, stem + ".host.json");
    TESSERA_LOG(Info, "sim") << vc.name << ": host_compute_slowdown "
                             << nlohmann::json(host.compute_slowdown).dump() << ", lockstep "
                             << nlohmann::json(host.lockstep_slowdown).dump();
    case_hosts[index] = std::move(host);
  };

  struct Measured {
    ValidationRow row;
    std::string stem;  // work_dir/<case>[.rN]: the trace, timings and timeline
  };
  // One round of one case: trace and measure (predicted after all rounds).
  auto run_case = [&](const ValidationCase& vc, int round) {
    TrainingJobConfig job = load_job(vc);
    const int world = job.layout.world_size();
    std::string stem = (fs::path(options.work_dir) / file_stem(vc.name)).string();
    if (options.rounds > 1) stem += ".r" + std::to_string(round + 1);
    const std::string job_path = stem + ".job.json";
    const std::string trace_path = stem + ".trace.json";
    const std::string timings_path = stem + ".timings.json";
    job.source = job_path;
    write_text(job_path, job.to_json());

    ValidationRow row;
    row.name = vc.name;
    row.layout = job.layout.to_string();
    row.world_size = world;
    row.zero1 = job.zero1;
    row.moe = job.model.num_experts > 0;

    // 1. Trace.
    Trace trace;
    if (options.reuse_measurements && fs::exists(trace_path)) {
      trace = Trace::load_file(trace_path);
    } else {
      TracerOptions tracer;
      tracer.warmup_steps = suite.trace_warmup_steps;
      tracer.measured_steps = suite.trace_measured_steps;
      double best = 2;
      for (int attempt = 0; attempt < std::max(1, options.max_attempts); ++attempt) {
        wait_until_quiet(options.quiet_idle, options.quiet_timeout);
        const CpuSnapshot before = CpuSnapshot::take();
        TraceResult traced = trace_training_job(job, tracer);
        const double foreign = foreign_share(before, CpuSnapshot::take());
        if (foreign < best) {
          best = foreign;
          row.trace_seconds = traced.seconds;
          trace = std::move(traced.trace);
        }
        if (foreign <= options.max_foreign_cpu) break;
        TESSERA_LOG(Info, "sim") << vc.name << ": other processes used "
                                 << static_cast<int>(100 * foreign)
                                 << " % of the CPU while tracing; tracing again";
      }
      row.trace_foreign_cpu = best;
      write_text(trace_path, trace.to_json());
    }
    for (const RankTrace& e : trace.entries) {
      double sum = 0;
      for (const TraceNode& n : e.nodes) sum += n.duration.count();
      row.traced_alone_s = std::max(row.traced_alone_s, sum * 1e-6);
    }

    // 2. Measure.
    if (!(options.reuse_measurements && fs::exists(timings_path))) {
      const std::vector<std::string> argv = {options.launch_bin,
                                             "--nproc",
                                             std::to_string(world),
                                             "--",
                                             options.train_bin,
                                             job_path,
                                             "--timings",
                                             timings_path,
                                             "--warmup",
                                             std::to_string(suite.warmup_steps),
                                             "--measure",
                                             std::to_string(suite.measured_steps),
                                             "--log-every",
                                             "0",
                                             "--chrome",
                                             stem + ".measured.attempt.json"};
      double best = 2;
      const std::string attempt_path = stem + ".attempt.json";
      for (int attempt = 0; attempt < std::max(1, options.max_attempts); ++attempt) {
        wait_until_quiet(options.quiet_idle, options.quiet_timeout);
        std::vector<std::string> args = argv;
        args[7] = attempt_path;
        const CpuSnapshot before = CpuSnapshot::take();
        CommandResult run = run_command(args, options.run_timeout);
        const double foreign = foreign_share(before, CpuSnapshot::take());
        TESSERA_CHECK(run.status.success(), Unavailable, "validation case '", vc.name, "': '",
                      options.launch_bin, " --nproc ", world, " -- ", options.train_bin, " ",
                      job_path, " ...' ", run.status.describe(), ": ", tail(run.output, 2000));
        ++row.run_attempts;
        if (foreign < best) {
          best = foreign;
          fs::rename(attempt_path, timings_path);
          // The measured steps beside the predicted timeline.
          if (fs::exists(stem + ".measured.attempt.json")) {
            fs::rename(stem + ".measured.attempt.json", stem + ".measured.json");
          }
        }
        if (foreign <= options.max_foreign_cpu) break;
        TESSERA_LOG(Info, "sim") << vc.name << ": other processes used "
                                 << static_cast<int>(100 * foreign)
                                 << " % of the CPU during the run; running again";
      }
      fs::remove(attempt_path);
      fs::remove(stem + ".measured.attempt.json");
      row.run_foreign_cpu = best;
    }
    const StepTimings timings =
        StepTimings::parse(detail::read_text_file(timings_path, "step timings"), timings_path);
    row.measured_s = timings.median_seconds;
    row.measured_min_s = timings.min_seconds;
    row.measured_max_s = timings.max_seconds;
    row.measured_comm_s = timings.median_comm_seconds();
    row.measured_compute_s = timings.median_compute_seconds();
    TESSERA_LOG(Info, "sim") << vc.name << ": measured " << row.measured_s << " s";
    return Measured{std::move(row), stem};
  };

  // Rounds go over every case in turn, so a drift of the machine's speed
  // spreads over all cases instead of landing on some.
  std::vector<std::vector<Measured>> per_case(cases.size());
  if (options.host_per_case) {
    for (size_t i = 0; i < cases.size(); ++i) measure_case_host(i);
  }
  for (int round = 0; round < options.rounds; ++round) {
    if (!options.host_job.empty()) {
      for (int world : worlds) measure_host(round, world);
    }
    for (size_t i = 0; i < cases.size(); ++i) per_case[i].push_back(run_case(*cases[i], round));
  }

  // The collective model of a round and world size: the suite's cluster
  // file, with host_job carrying that round's host figures, or with
  // host_median the median of every round's.
  // With host_per_case, the case's: its own slowdowns in the cluster file.
  std::map<std::pair<int, int>, std::unique_ptr<CollectiveModel>> models;
  std::map<size_t, std::unique_ptr<CollectiveModel>> case_models;
  auto model_for = [&](int round, int world, size_t index) -> const CollectiveModel& {
    if (options.host_per_case) {
      std::unique_ptr<CollectiveModel>& model = case_models[index];
      if (!model) {
        ClusterSpec cluster = ClusterSpec::load_file(find(suite.clusters.at(world), "cluster"));
        const HostSharing& host = case_hosts.at(index);
        cluster.topology.host_compute_slowdown = host.compute_slowdown;
        cluster.topology.host_lockstep_slowdown = host.lockstep_slowdown;
        const std::string stem =
            (fs::path(options.work_dir) / file_stem(cases[index]->name)).string();
        cluster.validate(stem + ".host.cluster.json");
        write_text(stem + ".host.cluster.json", cluster.to_json());
        model = std::make_unique<CollectiveModel>(std::move(cluster));
      }
      return *model;
    }
    const int key_round = options.host_job.empty() || options.host_median ? 0 : round;
    std::unique_ptr<CollectiveModel>& model = models[{key_round, world}];
    if (model) return *model;
    ClusterSpec cluster = ClusterSpec::load_file(find(suite.clusters.at(world), "cluster"));
    if (!options.host_job.empty()) {
      std::string stem = "host.";
      HostSharing host;
      if (options.host_median) {
        std::vector<HostSharing> all;
        for (int r = 0; r < options.rounds; ++r) all.push_back(hosts.at({r, world}));
        host = median_host_sharing(all);
        stem += "median";
      } else {
        host = hosts.at({round, world});
        stem += "r" + std::to_string(round + 1);
      }
      stem += ".np" + std::to_string(world);
      apply_host_sharing(host, cluster.topology);
      cluster.validate(stem);
      write_text((fs::path(options.work_dir) / (stem + ".cluster.json")).string(),
                 cluster.to_json());
    }
    model = std::make_unique<CollectiveModel>(std::move(cluster));
    return *model;
  };
  auto predict = [&](Measured& m, int round, size_t index) {
    ValidationRow& row = m.row;
    const Trace trace = Trace::load_file(m.stem + ".trace.json");
    SimulationOptions sim;
    sim.collectives = &model_for(round, row.world_size, index);
    sim.overlap = overlap.get();
    SimulationResult result = simulate(trace, sim);
    write_text(m.stem + ".timeline.json", chrome_trace_json(trace, result));
    row.predicted_s = result.step_time.count() * 1e-6;
    const RankBreakdown& slow = result.ranks[result.slowest_rank];
    row.compute_s = slow.compute.count() * 1e-6;
    row.exposed_comm_s = slow.exposed_comm.count() * 1e-6;
    row.sync_wait_s = slow.sync_wait.count() * 1e-6;
    row.collective_calls = static_cast<int>(result.collective_calls);
    row.simulate_seconds = result.wall_seconds;
    row.error = (row.predicted_s - row.measured_s) / row.measured_s;
  };
  ValidationReport report;
  for (size_t index = 0; index < per_case.size(); ++index) {
    std::vector<Measured>& measured = per_case[index];
    std::vector<ValidationRow> rounds;
    for (int round = 0; round < options.rounds; ++round) {
      predict(measured[static_cast<size_t>(round)], round, index);
      rounds.push_back(measured[static_cast<size_t>(round)].row);
    }
    ValidationRow row = combine_rounds(rounds);
    if (options.on_row) options.on_row(row);
    report.rows.push_back(std::move(row));
  }
  summarize(report);
  return report;
}

std::string ValidationReport::to_markdown() const {
  const bool rounds = std::any_of(
      rows.begin(), rows.end(), [](const ValidationRow& r) { return !r.round_measured_s.empty(); });
  // With rounds, "min-max" is over the rounds' medians, and a last column
  // lists each round's measured / predicted step.
  std::string out = std::string("| case | ranks | layout | measured ms (min-max") +
                    (rounds ? " over rounds" : "") +
                    ") | predicted ms | error | compute ms predicted / measured | communication ms "
                    "predicted / measured | sync wait ms | calls |" +
                    (rounds ? " rounds: measured / predicted ms |" : "") + "\n" +
                    "|---|---|---|---|---|---|---|---|---|---|" + (rounds ? "---|" : "") + "\n";
  // Predicted communication: exposed plus waiting for peers, which is what
  // the measured split counts (issue to completion).
  for (const ValidationRow& r : rows) {
    out += detail::format(
        "| %s | %d | %s%s | %.1f (%.1f-%.1f) | %.1f | %+.1f %% | %.1f / %.1f | %.1f / %.1f | %.1f "
        "| %d |",
        r.name.c_str(), r.world_size, r.layout.c_str(), r.zero1 ? " ZeRO-1" : "",
        r.measured_s * 1e3, r.measured_min_s * 1e3, r.measured_max_s * 1e3, r.predicted_s * 1e3,
        100 * r.error, r.compute_s * 1e3, r.measured_compute_s * 1e3,
        (r.exposed_comm_s + r.sync_wait_s) * 1e3, r.measured_comm_s * 1e3, r.sync_wait_s * 1e3,
        r.collective_calls);
    if (rounds) {
      std::string cell;
      for (size_t k = 0; k < r.round_measured_s.size(); ++k) {
        cell += detail::format("%s%.0f / %.0f", k ? ", " : " ", r.round_measured_s[k] * 1e3,
                               r.round_predicted_s[k] * 1e3);
      }
      out += cell + " |";
    }
    out += "\n";
  }
  out += detail::format("\n%zu configurations: median |error| %.1f %%, mean %.1f %%, max %.1f %%\n",
                        rows.size(), 100 * median_abs_error, 100 * mean_abs_error,
                        100 * max_abs_error);
  return out;
}

std::string ValidationReport::to_json() const {
  nlohmann::ordered_json rows_json = nlohmann::ordered_json::array();
  for (const ValidationRow& r : rows) {
    rows_json.push_back({{"name", r.name},
                         {"world_size", r.world_size},
                         {"layout", r.layout},
                         {"zero1", r.zero1},
                         {"moe", r.moe},
                         {"measured_s", r.measured_s},
                         {"measured_min_s", r.measured_min_s},
                         {"measured_max_s", r.measured_max_s},
                         {"predicted_s", r.predicted_s},
                         {"error", r.error},
                         {"traced_alone_s", r.traced_alone_s},
                         {"compute_s", r.compute_s},
                         {"exposed_comm_s", r.exposed_comm_s},
                         {"sync_wait_s", r.sync_wait_s},
                         {"measured_compute_s", r.measured_compute_s},
                         {"measured_comm_s", r.measured_comm_s},
                         {"collective_calls", r.collective_calls},
                         {"trace_seconds", r.trace_seconds},
                         {"trace_foreign_cpu", r.trace_foreign_cpu},
                         {"run_foreign_cpu", r.run_foreign_cpu},
                         {"run_attempts", r.run_attempts},
                         {"simulate_seconds", r.simulate_seconds},
                         {"round_measured_s", r.round_measured_s},
                         {"round_predicted_s", r.round_predicted_s}});
  }
  nlohmann::ordered_json j;
  j["schema"] = "tessera.sim.validation_report/1";
  j["rows"] = std::move(rows_json);
  j["median_abs_error"] = median_abs_error;
  j["mean_abs_error"] = mean_abs_error;
  j["max_abs_error"] = max_abs_error;
  return j.dump(2) + "\n";
}

}  // namespace tessera::sim
