// PPO on the arithmetic task: actor, critic (value model), reference and
// rule reward as worker groups under one driver; GAE advantages with a KL
// penalty against the reference. Same flags as rlhf_grpo.
//
//   build/release/bin/rlhf_ppo --model small
#include <cstdio>

#include "../rlhf_common.h"
#include "tessera/core/runtime.h"

int main(int argc, char** argv) {
  tessera::init_runtime();
  namespace tr = tessera::rlhf;
  if (auto code = tr::run_worker_if_spawned(tr::RoleRegistry::builtin())) return *code;
  try {
    auto o = rlhf_example::parse(argc, argv, /*default_iterations=*/12);
    auto prepared = rlhf_example::prepare(o, /*with_critic=*/true);
    tr::Driver driver(prepared.driver);
    std::printf("PPO, %s model, %s placement on %d processes, %lld prompts x %lld samples per iteration\n",
                o.model.c_str(), o.placement.c_str(), o.processes,
                static_cast<long long>(o.run.prompts_per_iteration), static_cast<long long>(o.run.samples));
    rlhf_example::print_header();
    auto stats = tr::run_ppo(driver, prepared.tokenizer, o.run, [](const tr::IterationStats& s) {
      rlhf_example::print_row(s);
      std::printf("      value loss %.4f\n", s.value_loss);
    });
    rlhf_example::print_summary(stats);
    driver.shutdown();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rlhf_ppo: %s\n", e.what());
    return 1;
  }
}
