#include "tessera/rlhf/pipeline.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "tessera/ckpt/checkpoint.h"
#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"
#include "tessera/rlhf/algorithms.h"
#include "tessera/rlhf/roles.h"
#include "tessera/tasks/arithmetic.h"

namespace tessera::rlhf {

Batch arithmetic_prompts(const nn::Tokenizer& tokenizer, const PipelineOptions& o,
                         int64_t iteration) {
  const int64_t p = o.prompts_per_iteration;
  // The question stream: iteration i takes questions [i p, (i + 1) p).
  auto all = tessera::tasks::arithmetic_examples((iteration + 1) * p, o.data_seed, o.max_operand);
  std::vector<std::vector<int32_t>> encoded;
  at::Tensor answers = at::empty({p}, at::kLong);
  for (int64_t i = 0; i < p; ++i) {
    const auto& ex = all[iteration * p + i];
    std::string text = ex.prompt;
    if (o.prompt_format == "chat") {
      text = nn::format_chat(o.chat_template,
                             {{"user", "Answer with the number only. " + ex.prompt}}) +
             "A: ";
    } else {
      TESSERA_CHECK(o.prompt_format == "plain", InvalidArgument,
                    "prompt_format: 'plain' or 'chat', got '", o.prompt_format, "'");
    }
    encoded.push_back(tokenizer.encode(text));
    answers[i] = static_cast<int64_t>(std::stoll(ex.answer));
  }
  int64_t longest = 0;
  for (const auto& e : encoded)
    longest = std::max<int64_t>(longest, static_cast<int64_t>(e.size()));
  at::Tensor ids = at::zeros({p, longest}, at::kLong), lengths = at::empty({p}, at::kLong);
  for (int64_t i = 0; i < p; ++i) {
    for (size_t j = 0; j < encoded[i].size(); ++j) ids[i][static_cast<int64_t>(j)] = encoded[i][j];
    lengths[i] = static_cast<int64_t>(encoded[i].size());
  }
  return {{"prompt_ids", ids}, {"prompt_lengths", lengths}, {"answers", answers}};
}

namespace {

double max_metric(const CallResult& r, const std::string& key) {
  double m = 0;
  for (const auto& w : r.metrics) {
    auto it = w.find(key);
    if (it != w.end()) m = std::max(m, it->second);
  }
  return m;
}

bool has_role(Driver& driver, const std::string& role) {
  for (const ProcessInfo& p : driver.processes()) {
    for (const std::string& r : p.roles) {
      if (r == role) return true;
    }
  }
  return false;
}

std::string driver_state_path(const PipelineOptions& o) {
  return o.checkpoint_dir + "/driver.json";
}

// The iteration to start from: the committed driver state when resuming.
int64_t restore(Driver& driver, const PipelineOptions& o,
                const std::vector<std::string>& trained_roles) {
  if (!o.resume || o.checkpoint_dir.empty() || !std::filesystem::exists(driver_state_path(o)))
    return 0;
  std::ifstream in(driver_state_path(o));
  const int64_t iteration = nlohmann::json::parse(in).at("iteration").get<int64_t>();
  std::vector<PendingCall> loads;
  for (const std::string& role : trained_roles) {
    loads.push_back(driver.group(role).call(
        "load", {}, Args().set("dir", ckpt::step_dir(o.checkpoint_dir + "/" + role, iteration))));
  }
  for (auto& f : loads) f.get();
  TESSERA_LOG(Info, "rlhf") << "resumed from " << o.checkpoint_dir << " at iteration " << iteration;
  return iteration;
}

void checkpoint(Driver& driver, const PipelineOptions& o,
                const std::vector<std::string>& trained_roles, int64_t done) {
  if (o.checkpoint_dir.empty() || o.checkpoint_every <= 0 || done % o.checkpoint_every != 0) return;
  std::vector<PendingCall> saves;
  for (const std::string& role : trained_roles) {
    saves.push_back(driver.group(role).call(
        "save", {}, Args().set("dir", ckpt::step_dir(o.checkpoint_dir + "/" + role, done))));
  }
  for (auto& f : saves) f.get();
  // The driver's record is the commit point: a crash before it leaves the
  // previous iteration's state current.
  std::filesystem::create_directories(o.checkpoint_dir);
  AtomicFileWriter state(driver_state_path(o));
  const std::string text = nlohmann::json{{"iteration", done}}.dump();
  state.append(text.data(), text.size());
  state.commit();
  for (const std::string& role : trained_roles)
    ckpt::apply_retention(o.checkpoint_dir + "/" + role, o.keep_last);
}

struct Step {
  CallResult gen, scores, update;
  IterationStats stats;
};

// The tokens of the real responses: the workers' own counts would include the
// rows that padding added to even out a batch the pool does not divide.
void count_generated_tokens(IterationStats& s, const Batch& generated) {
  s.new_tokens = generated.at("response_lengths").sum().item<int64_t>();
}

void fill_generation_stats(IterationStats& s, const CallResult& gen) {
  s.generate_seconds = max_metric(gen, "generate_seconds");
  s.transition_seconds = max_metric(gen, "transition_seconds");
  s.transition_bytes = max_metric(gen, "transition_bytes");
  s.generation_weight_bytes = max_metric(gen, "generation_weight_bytes");
  s.kv_cache_bytes = max_metric(gen, "kv_cache_bytes");
}

template <typename Body>
std::vector<IterationStats> loop(Driver& driver, const PipelineOptions& o,
                                 const std::vector<std::string>& trained,
                                 const IterationCallback& callback, Body&& body) {
  std::vector<IterationStats> out;
  const int64_t start = restore(driver, o, trained);
  int64_t ran = 0;
  for (int64_t it = start; it < o.iterations; ++it) {
    if (o.stop_after >= 0 && ran >= o.stop_after) break;
    Stopwatch watch;
    IterationStats s = body(it);
    s.iteration = it;
    s.seconds = watch.seconds();
    s.tokens_per_second = s.new_tokens / std::max(s.seconds, 1e-9);
    driver.release("it" + std::to_string(it) + "/");
    checkpoint(driver, o, trained, it + 1);
    if (callback) callback(s);
    out.push_back(s);
    ++ran;
  }
  return out;
}

CallOptions named(int64_t it, const std::string& what, const PipelineOptions& o) {
  CallOptions c;
  c.output = "it" + std::to_string(it) + "/" + what;
  c.timeout = o.call_timeout;
  return c;
}

}  // namespace

std::vector<IterationStats> run_grpo(Driver& driver, const nn::Tokenizer& tokenizer,
                                     const PipelineOptions& o, const IterationCallback& callback) {
  TESSERA_CHECK(o.samples >= 2, InvalidArgument, "GRPO needs at least 2 samples per prompt");
  const bool with_reference = has_role(driver, "reference");
  auto actor = driver.group("actor");
  auto reward = driver.group("reward");
  return loop(driver, o, {"actor"}, callback, [&](int64_t it) {
    IterationStats s;
    const std::string tag = "it" + std::to_string(it) + "/";
    BatchRef prompts = driver.put(tag + "prompts", arithmetic_prompts(tokenizer, o, it));
    CallResult gen =
        actor
            .call("generate", {prompts}, Args().set("iteration", it).set("samples", o.samples),
                  named(it, "gen", o))
            .get();
    fill_generation_stats(s, gen);
    // Reference log-probs and rewards do not depend on each other.
    PendingCall ref;
    if (with_reference)
      ref =
          driver.group("reference").call("compute_logprobs", {gen.output}, {}, named(it, "ref", o));
    CallResult scores = reward.call("score", {gen.output}, {}, named(it, "scores", o)).get();
    Batch g = driver.get(gen.output);
    count_generated_tokens(s, g);
    const at::Tensor score = driver.get(scores.output).at("scores");
    const at::Tensor mask =
        response_mask(g.at("prompt_lengths"), g.at("response_lengths"), g.at("sequences").size(1));
    s.mean_score = score.mean().item<double>();
    BatchRef adv =
        driver.put(tag + "adv", {{"advantages", grpo_advantages(score, o.samples, mask)}});
    std::vector<BatchRef> inputs = {gen.output, adv};
    if (with_reference) inputs.push_back(ref.get().output);
    CallResult up =
        actor.call("update", inputs, Args().set("iteration", it), named(it, "update", o)).get();
    s.pg_loss = up.metric("pg_loss");
    s.kl = up.metric("kl");
    s.clip_fraction = up.metric("clip_fraction");
    s.grad_norm = up.metric("grad_norm");
    s.update_seconds = up.seconds;
    return s;
  });
}

std::vector<IterationStats> run_ppo(Driver& driver, const nn::Tokenizer& tokenizer,
                                    const PipelineOptions& o, const IterationCallback& callback) {
  auto actor = driver.group("actor");
  auto critic = driver.group("critic");
  auto reference = driver.group("reference");
  auto reward = driver.group("reward");
  return loop(driver, o, {"actor", "critic"}, callback, [&](int64_t it) {
    IterationStats s;
    const std::string tag = "it" + std::to_string(it) + "/";
    BatchRef prompts = driver.put(tag + "prompts", arithmetic_prompts(tokenizer, o, it));
    CallResult gen =
        actor
            .call("generate", {prompts}, Args().set("iteration", it).set("samples", o.samples),
                  named(it, "gen", o))
            .get();
    fill_generation_stats(s, gen);
    // Four independent reads of the same responses.
    auto old_f = actor.call("compute_logprobs", {gen.output}, {}, named(it, "old", o));
    auto ref_f = reference.call("compute_logprobs", {gen.output}, {}, named(it, "ref", o));
    auto val_f = critic.call("compute_values", {gen.output}, {}, named(it, "values", o));
    auto score_f = reward.call("score", {gen.output}, {}, named(it, "scores", o));
    CallResult old = old_f.get(), ref = ref_f.get(), values = val_f.get(), scores = score_f.get();
    Batch g = driver.get(gen.output);
    count_generated_tokens(s, g);
    const at::Tensor mask =
        response_mask(g.at("prompt_lengths"), g.at("response_lengths"), g.at("sequences").size(1));
    const at::Tensor score = driver.get(scores.output).at("scores");
    const at::Tensor old_logp = driver.get(old.output).at("old_logprobs");
    const at::Tensor ref_logp = driver.get(ref.output).at("ref_logprobs");
    const at::Tensor v = driver.get(values.output).at("values");
    s.mean_score = score.mean().item<double>();
    at::Tensor kl = kl_divergence(old_logp, ref_logp, KlEstimator::kK1);
    at::Tensor rewards = kl_penalized_rewards(score, kl, mask, o.kl_penalty);
    Gae gae_out = gae(rewards, v, mask, o.gamma, o.lambda);
    // Whitened advantages (over the batch's response tokens), as PPO does.
    at::Tensor mean = masked_mean(gae_out.advantages, mask);
    at::Tensor var = masked_mean((gae_out.advantages - mean).pow(2), mask);
    at::Tensor adv = (gae_out.advantages - mean) * at::rsqrt(var + 1e-8) * mask;
    BatchRef extra = driver.put(tag + "adv", {{"advantages", adv}, {"returns", gae_out.returns}});
    auto up_f = actor.call("update", {gen.output, old.output, ref.output, extra},
                           Args().set("iteration", it), named(it, "update", o));
    auto crit_f = critic.call("update", {gen.output, values.output, extra}, {},
                              named(it, "critic_update", o));
    CallResult up = up_f.get(), crit = crit_f.get();
    s.pg_loss = up.metric("pg_loss");
    s.kl = masked_mean(kl, mask).item<double>();
    s.clip_fraction = up.metric("clip_fraction");
    s.grad_norm = up.metric("grad_norm");
    s.value_loss = crit.metric("value_loss");
    s.update_seconds = std::max(up.seconds, crit.seconds);
    return s;
  });
}

}  // namespace tessera::rlhf
