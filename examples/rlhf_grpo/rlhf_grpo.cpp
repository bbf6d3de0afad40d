// GRPO on the arithmetic task with a rule reward: the actor (tensor parallel
// for training, re-laid out by the 3D-HybridEngine for generation), the
// reference policy and the reward share 4 local worker processes (or, with
// --placement split, get separate pools); a single driver runs the
// algorithm. The mean reward should rise within a few minutes on CPU.
//
//   build/release/bin/rlhf_grpo                       # SmolLM2-135M-Instruct
//   build/release/bin/rlhf_grpo --model small         # a small byte-level model
//   build/release/bin/rlhf_grpo --ckpt /tmp/grpo --stop-after 3   # stop, then:
//   build/release/bin/rlhf_grpo --ckpt /tmp/grpo --resume
#include <cstdio>

#include "../rlhf_common.h"
#include "tessera/core/runtime.h"

int main(int argc, char** argv) {
  tessera::init_runtime();
  namespace tr = tessera::rlhf;
  if (auto code = tr::run_worker_if_spawned(tr::RoleRegistry::builtin())) return *code;
  try {
    auto o = rlhf_example::parse(argc, argv, /*default_iterations=*/12);
    auto prepared = rlhf_example::prepare(o, /*with_critic=*/false);
    tr::Driver driver(prepared.driver);
    std::printf("GRPO, %s model, %s placement on %d processes, %lld prompts x %lld samples per iteration\n",
                o.model.c_str(), o.placement.c_str(), o.processes,
                static_cast<long long>(o.run.prompts_per_iteration), static_cast<long long>(o.run.samples));
    rlhf_example::print_header();
    auto stats = tr::run_grpo(driver, prepared.tokenizer, o.run, rlhf_example::print_row);
    rlhf_example::print_summary(stats);
    driver.shutdown();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rlhf_grpo: %s\n", e.what());
    return 1;
  }
}
