// tessera-train — trains the job a training-job JSON file describes
// (include/tessera/sim/training_job.h), on one rank or under tessera-launch.
//
//   tessera-train job.json                         # one rank (layout must be 1 rank)
//   tessera-launch --nproc 4 -- tessera-train job.json --log-every 5
//   tessera-launch --nproc 4 -- tessera-train job.json --timings t.json --warmup 2 --measure 10
//
// Without --timings it runs the job's `steps` optimiser steps and prints the
// loss every --log-every steps (rank 0). With --timings it runs --warmup
// untimed and --measure timed steps instead and writes their wall times
// (the slowest rank's, each step started after a barrier) as JSON, the
// measurements `tessera-sim validate` compares predictions with, together
// with each rank's time in communication per step; --chrome also writes the
// measured steps as a Chrome trace (each rank's steps and communication
// operations, to compare with `tessera-sim predict --chrome`).
// --layout replaces the file's layout ("dp=2,tp=2").
//
// Exit codes: 0 success, 2 usage, 3 any other error.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/metrics.h"
#include "tessera/core/runtime.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/sim/training_job.h"

int main(int argc, char** argv) {
  std::string job_path, timings_path, layout_text, chrome_path;
  int warmup = 2, measure = 10;
  int64_t log_every = 10;
  CLI::App app{
      "Trains the job a training-job JSON file describes (model, layout, batch, optimiser), on "
      "one rank or under tessera-launch.",
      "tessera-train"};
  app.option_defaults()->always_capture_default();
  app.add_option("JOB", job_path, "the training-job JSON file")->required();
  app.add_option("--layout", layout_text, "replace the file's layout, e.g. dp=2,tp=2");
  bool zero1 = false;
  app.add_flag("--zero1", zero1, "shard the optimizer state over the data-parallel ranks (ZeRO-1)");
  CLI::Option* timings_opt =
      app.add_option("--timings", timings_path,
                     "time --warmup + --measure steps instead of training, write the times here "
                     "(JSON, rank 0)");
  app.add_option("--chrome", chrome_path,
                 "with --timings: also write the measured steps as a Chrome trace (each rank's "
                 "steps and communication operations)")
      ->needs(timings_opt);
  app.add_option("--warmup", warmup, "untimed steps before the timed ones (with --timings)")
      ->check(tessera::examples::at_least(0));
  app.add_option("--measure", measure, "timed steps (with --timings)")
      ->check(tessera::examples::positive());
  app.add_option("--log-every", log_every, "print the loss every this many steps (0: never)")
      ->check(tessera::examples::at_least(0));
  app.footer("Exit codes: 0 success, 2 usage, 3 any other error.");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  try {
    tessera::init_runtime();
    auto config = tessera::sim::TrainingJobConfig::load_file(job_path);
    if (!layout_text.empty()) config.layout = tessera::sim::ParallelLayout::parse(layout_text);
    if (zero1) config.zero1 = true;
    config.validate();
    // With --timings every step is also split into communication and
    // compute per rank (StepTimings::rank_comm_seconds).
    auto clock = std::make_shared<tessera::sim::CommunicationClock>();
    tessera::dist::InitOptions init;
    if (!timings_path.empty()) init.group.observer = clock;
    auto world = tessera::dist::init_process_group(init);
    auto job = tessera::sim::TrainingJob::create(config, world);
    const bool lead = world->rank() == 0;
    if (lead) {
      std::cout << (config.name.empty() ? job_path : config.name) << ": " << config.model.summary()
                << ", layout " << config.layout.to_string() << (config.zero1 ? " + ZeRO-1" : "")
                << ", global batch " << config.global_batch << " x " << config.seq_len
                << " tokens\n";
    }
    if (!timings_path.empty()) {
      tessera::sim::RunOptions run;
      run.warmup_steps = warmup;
      run.measured_steps = measure;
      run.clock = clock;
      tessera::sim::StepTimings t = tessera::sim::run_timed_steps(*job, run);
      if (lead) {
        tessera::AtomicFileWriter out(timings_path);
        const std::string text = t.to_json(warmup);
        out.append(text.data(), text.size());
        out.commit();
        if (!chrome_path.empty()) {
          tessera::AtomicFileWriter chrome(chrome_path);
          const std::string trace = tessera::sim::measured_chrome_trace_json(t);
          chrome.append(trace.data(), trace.size());
          chrome.commit();
        }
        std::printf(
            "median step %.4f s (min %.4f, max %.4f; slowest rank: %.4f s communication, %.4f s "
            "the rest) over %d steps -> %s\n",
            t.median_seconds, t.min_seconds, t.max_seconds, t.median_comm_seconds(),
            t.median_compute_seconds(), measure, timings_path.c_str());
      }
    } else {
      tessera::Stopwatch watch;
      for (int64_t s = 0; s < config.steps; ++s) {
        tessera::nn::StepStats stats = job->step(s);
        if (lead && log_every > 0 && (s % log_every == 0 || s + 1 == config.steps)) {
          std::printf("step %5lld  loss %.4f  grad-norm %.3f  lr %.2e  %.0f tok/s  %.1f s\n",
                      static_cast<long long>(s + 1), stats.loss, stats.grad_norm, stats.lr,
                      stats.tokens_per_second, watch.seconds());
          std::fflush(stdout);
        }
      }
    }
    world->barrier().wait();
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "tessera-train: " << e.what() << "\n";
    return 3;
  }
}
