// ReMax written as your own driver program: the whole algorithm is the loop
// in main() over two worker groups, using only the public API (driver.h,
// roles.h, algorithms.h). Per iteration: sample responses, generate the
// greedy response to each prompt as the baseline, score both with the rule
// reward, and update the actor with advantage = score - baseline score
// (no critic, no reference).
//
//   build/release/bin/rlhf_remax [--iterations 40]    (--help: the options)
//
// A new algorithm follows the same pattern: start a Driver with the roles
// you need (RoleRegistry::builtin() or your own Role subclasses), call
// their methods with batches by reference, compute the small per-token
// tensors in the driver, and put() them for the next call.
#include <cstdio>
#include <string>

#include "command_line.h"
#include "rlhf_common.h"
#include "tessera/core/runtime.h"
#include "tessera/rlhf/algorithms.h"

namespace tr = tessera::rlhf;

int main(int argc, char** argv) {
  tessera::init_runtime();
  // Spawned copies run their roles before (and without) the command line.
  if (auto code = tr::run_worker_if_spawned(tr::RoleRegistry::builtin())) return *code;
  int64_t iterations = 40;
  CLI::App app{
      "ReMax on arithmetic questions as a user-written driver: a small byte-level model "
      "on 4 colocated worker processes, baseline = the greedy response's reward.",
      "rlhf_remax"};
  app.option_defaults()->always_capture_default();
  app.add_option("--iterations", iterations, "training iterations");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;
  try {
    const std::string model =
        "{\"hf\": \"" + rlhf_example::small_model("/tmp/tessera-rlhf-small") + "\"}";
    tr::DriverOptions d;
    d.pools = {{"all", 4}};
    d.roles = {{"actor", "actor", "all",
                "{\"model\": " + model +
                    ", \"tp\": 2, \"gen_tp\": 1, \"lr\": 1e-4, \"max_new_tokens\": 8}"},
               {"reward", "reward_rule", "all", "{\"tokenizer\": \"bytes\"}"}};
    tr::Driver driver(d);
    auto actor = driver.group("actor");
    auto reward = driver.group("reward");
    const auto tokenizer = tessera::nn::Tokenizer::bytes({"<|endoftext|>"});
    tr::PipelineOptions data;
    data.prompts_per_iteration = 32;
    data.max_operand = 9;
    std::printf("ReMax, small model, 4 colocated worker processes, %lld prompts per iteration\n",
                static_cast<long long>(data.prompts_per_iteration));
    std::vector<double> rewards;
    for (int64_t it = 0; it < iterations; ++it) {
      const std::string tag = "it" + std::to_string(it) + "/";
      auto named = [&](const std::string& what) {
        tr::CallOptions c;
        c.output = tag + what;
        return c;
      };
      tr::BatchRef prompts =
          driver.put(tag + "prompts", tr::arithmetic_prompts(tokenizer, data, it));
      // Sampled and greedy responses are independent: issue both, then wait.
      auto sampled_f =
          actor.call("generate", {prompts}, tr::Args().set("iteration", it), named("sampled"));
      auto greedy_f =
          actor.call("generate", {prompts}, tr::Args().set("iteration", it).set("greedy", true),
                     named("greedy"));
      tr::CallResult sampled = sampled_f.get(), greedy = greedy_f.get();
      auto score_f = reward.call("score", {sampled.output}, {}, named("score"));
      auto base_f = reward.call("score", {greedy.output}, {}, named("baseline"));
      const at::Tensor score = driver.get(score_f.get().output).at("scores");
      const at::Tensor baseline = driver.get(base_f.get().output).at("scores");
      tr::Batch g = driver.get(sampled.output);
      const at::Tensor mask = tr::response_mask(g.at("prompt_lengths"), g.at("response_lengths"),
                                                g.at("sequences").size(1));
      tr::BatchRef adv =
          driver.put(tag + "adv", {{"advantages", tr::remax_advantages(score, baseline, mask)}});
      tr::CallResult up = actor
                              .call("update", {sampled.output, adv},
                                    tr::Args().set("iteration", it), named("update"))
                              .get();
      rewards.push_back(score.mean().item<double>());
      std::printf("%4lld  reward %.3f  greedy %.3f  grad norm %.4f\n", static_cast<long long>(it),
                  rewards.back(), baseline.mean().item<double>(), up.metric("grad_norm"));
      driver.release(tag);
    }
    const size_t k = std::max<size_t>(1, rewards.size() / 3);
    double first = 0, last = 0;
    for (size_t i = 0; i < k; ++i) {
      first += rewards[i] / k;
      last += rewards[rewards.size() - 1 - i] / k;
    }
    std::printf("mean reward: first %zu iterations %.3f -> last %zu iterations %.3f\n", k, first, k,
                last);
    driver.shutdown();
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "rlhf_remax: %s\n", e.what());
    return 1;
  }
}
