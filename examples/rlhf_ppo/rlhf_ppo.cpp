// PPO on the arithmetic task: actor, critic (value model), reference and
// rule reward as worker groups under one driver; GAE advantages with a KL
// penalty against the reference. Same flags as rlhf_grpo.
//
//   build/release/bin/rlhf_ppo --model small
//   build/release/bin/rlhf_ppo --help         # every option and its default
#include <cstdio>

#include "rlhf_common.h"
#include "tessera/core/runtime.h"

int main(int argc, char** argv) {
  tessera::init_runtime();
  return rlhf_example::example_main(argc, argv, "PPO", /*with_critic=*/true, tessera::rlhf::run_ppo,
                                    [](const tessera::rlhf::IterationStats& s) {
                                      rlhf_example::print_row(s);
                                      std::printf("      value loss %.4f\n", s.value_loss);
                                    });
}
