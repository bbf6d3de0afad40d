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
//   build/release/bin/rlhf_grpo --help                # every option and its default
#include <cstdio>

#include "rlhf_common.h"
#include "tessera/core/runtime.h"

int main(int argc, char** argv) {
  tessera::init_runtime();
  return rlhf_example::example_main(argc, argv, "GRPO", /*with_critic=*/false,
                                    tessera::rlhf::run_grpo);
}
