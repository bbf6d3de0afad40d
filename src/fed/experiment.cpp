// The language-model client app and the local experiment runner.
#include "tessera/fed/experiment.h"

#include <ATen/ATen.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <random>

#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/nn/model.h"
#include "tessera/nn/train.h"
#include "tessera/tokenizer/tokenizer.h"
#include "transfer.h"

namespace tessera::fed {

namespace {

using Clock = std::chrono::steady_clock;

nn::Tokenizer byte_tokenizer() { return nn::Tokenizer::bytes({"<|endoftext|>"}); }

nlohmann::json sources_json(const DomainSources& s) {
  return {{"english_file", s.english_file},
          {"cantonese_dir", s.cantonese_dir},
          {"code_dirs", s.code_dirs},
          {"arithmetic_examples", s.arithmetic_examples},
          {"arithmetic_seed", s.arithmetic_seed},
          {"max_tokens", s.max_tokens},
          {"heldout_fraction", s.heldout_fraction}};
}

DomainSources parse_sources(const ConfigObject& c) {
  DomainSources s;
  s.english_file = c.get_string("english_file");
  s.cantonese_dir = c.get_string("cantonese_dir");
  s.code_dirs = c.get_string_list("code_dirs");
  s.arithmetic_examples = c.get_int("arithmetic_examples");
  s.arithmetic_seed = static_cast<uint64_t>(c.get_int("arithmetic_seed"));
  s.max_tokens = c.get_int("max_tokens");
  s.heldout_fraction = c.get_double("heldout_fraction");
  return s;
}

std::vector<int64_t> to_list(const std::array<int64_t, kNumDomains>& a) {
  return {a.begin(), a.end()};
}

}  // namespace

nn::ModelConfig small_fed_config(int64_t vocab_size) {
  nn::ModelConfig c;
  c.model_type = "mixtral";
  c.vocab_size = vocab_size;
  c.hidden_size = 128;
  c.intermediate_size = 256;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 256;
  c.num_experts = 4;
  c.num_experts_per_tok = 2;
  c.bos_token_id = vocab_size - 1;
  c.eos_token_ids = {vocab_size - 1};
  return c;
}

std::string LanguageModelSpec::to_json() const {
  nlohmann::json plan_json = {
      {"client", plan.client},
      {"home", plan.home},
      {"mixture", std::vector<double>(plan.mixture.begin(), plan.mixture.end())},
      {"block_begin", to_list(plan.block_begin)},
      {"block_count", to_list(plan.block_count)},
      {"wrapped", plan.wrapped},
      {"block_tokens", plan.block_tokens},
      {"seed", plan.seed}};
  nlohmann::json j = {{"model", nlohmann::json::parse(model.to_json())},
                      {"sources", sources_json(sources)},
                      {"plan", plan_json},
                      {"local_steps", local_steps},
                      {"batch", batch},
                      {"seq_len", seq_len},
                      {"lr", lr},
                      {"min_lr", min_lr},
                      {"warmup", warmup},
                      {"total_steps", total_steps},
                      {"eval_windows", eval_windows},
                      {"seed", seed}};
  return j.dump(1);
}

LanguageModelSpec LanguageModelSpec::parse(const std::string& json) {
  const ConfigObject c = ConfigObject::parse(json, "client spec");
  LanguageModelSpec s;
  s.model = nn::ModelConfig::parse(c.get_raw("model"), "client spec 'model'");
  s.sources = parse_sources(c.get_object("sources"));
  const ConfigObject p = c.get_object("plan");
  s.plan.client = static_cast<int>(p.get_int("client"));
  s.plan.home = static_cast<int>(p.get_int("home"));
  const auto mixture = p.get_double_list("mixture");
  const auto begin = p.get_int_list("block_begin");
  const auto count = p.get_int_list("block_count");
  TESSERA_CHECK(
      mixture.size() == kNumDomains && begin.size() == kNumDomains && count.size() == kNumDomains,
      InvalidArgument, "client spec 'plan': mixture, block_begin and block_count need ",
      kNumDomains, " entries each");
  for (int d = 0; d < kNumDomains; ++d) {
    s.plan.mixture[d] = mixture[d];
    s.plan.block_begin[d] = begin[d];
    s.plan.block_count[d] = count[d];
  }
  s.plan.wrapped = p.get_bool("wrapped");
  s.plan.block_tokens = p.get_int("block_tokens");
  s.plan.seed = static_cast<uint64_t>(p.get_int("seed"));
  s.local_steps = c.get_int("local_steps");
  s.batch = c.get_int("batch");
  s.seq_len = c.get_int("seq_len");
  s.lr = c.get_double("lr");
  s.min_lr = c.get_double("min_lr");
  s.warmup = c.get_int("warmup");
  s.total_steps = c.get_int("total_steps");
  s.eval_windows = c.get_int("eval_windows");
  s.seed = static_cast<uint64_t>(c.get_int("seed"));
  c.check_no_unknown_keys();
  TESSERA_CHECK(s.local_steps >= 1 && s.batch >= 1 && s.seq_len >= 1 && s.eval_windows >= 1,
                InvalidArgument,
                "client spec: local_steps, batch, seq_len and eval_windows must be >= 1");
  return s;
}

namespace {

// A client: a Transformer, its optimiser (kept across rounds), its private
// data and the held-out windows of every domain.
class LanguageModelApp final : public ClientApp {
 public:
  LanguageModelApp(LanguageModelSpec spec, int client)
      : spec_(std::move(spec)),
        model_(spec_.model),
        rng_(spec_.seed * 7919 + static_cast<uint64_t>(client)) {
    TESSERA_CHECK(spec_.plan.client == client, InvalidArgument, "client spec is for client ",
                  spec_.plan.client, ", this is client ", client);
    const std::vector<DomainCorpus> corpora = load_domain_corpora(spec_.sources, byte_tokenizer());
    data_ = std::make_unique<ClientDataset>(corpora, spec_.plan);
    for (int d = 0; d < kNumDomains; ++d)
      heldout_.push_back(heldout_windows(corpora[d], spec_.eval_windows, spec_.seq_len));
    model_.init_random(spec_.seed);  // replaced by the server's bootstrap
    nn::TrainerOptions t;
    t.steps = spec_.total_steps;
    t.lr = spec_.lr;
    t.min_lr = spec_.min_lr;
    t.warmup = spec_.warmup;
    t.max_grad_norm = 1.0;
    trainer_ = std::make_unique<nn::Trainer>(model_, t);
  }

  std::vector<std::pair<std::string, at::Tensor>> parameters() override {
    return model_.named_parameters();
  }

  FitOutcome fit(const TaskInfo& task) override {
    double loss = 0;
    for (int64_t s = 0; s < spec_.local_steps; ++s) {
      const TokenBatch b = data_->batch(spec_.batch, spec_.seq_len, rng_);
      loss += trainer_->step(b.input_ids, b.labels).loss;
    }
    FitOutcome out;
    out.num_examples = data_->num_tokens();
    out.metrics["train_loss"] = loss / static_cast<double>(spec_.local_steps);
    out.metrics["lr_step"] = static_cast<double>(trainer_->steps());
    return out;
  }

  EvaluateOutcome evaluate(const TaskInfo& task) override {
    at::NoGradGuard no_grad;
    EvaluateOutcome out;
    double own = 0, global = 0;
    for (int d = 0; d < kNumDomains; ++d) {
      const double loss = model_.loss(heldout_[d].input_ids, heldout_[d].labels).ce.item<double>();
      out.metrics[std::string("loss_") + domain_name(d)] = loss;
      own += spec_.plan.mixture[d] * loss;
      global += loss / kNumDomains;
      out.num_examples += heldout_[d].input_ids.numel();
    }
    out.metrics["loss_own"] = own;
    out.metrics["loss_global"] = global;
    out.loss = own;
    return out;
  }

 private:
  LanguageModelSpec spec_;
  nn::Transformer model_;
  std::mt19937_64 rng_;
  std::unique_ptr<ClientDataset> data_;
  std::vector<TokenBatch> heldout_;
  std::unique_ptr<nn::Trainer> trainer_;
};

}  // namespace

std::unique_ptr<ClientApp> language_model_app(const std::string& spec_json, int client_id) {
  return std::make_unique<LanguageModelApp>(LanguageModelSpec::parse(spec_json), client_id);
}

ExperimentSetup prepare_experiment(const ExperimentOptions& o) {
  TESSERA_CHECK(o.clients >= 1 && o.rounds >= 1, InvalidArgument, "experiment: clients (",
                o.clients, ") and rounds (", o.rounds, ") must be >= 1");
  ExperimentSetup setup;
  const nn::Tokenizer tokenizer = byte_tokenizer();
  setup.model = o.model ? *o.model : small_fed_config(tokenizer.vocab_size());
  setup.model.validate();
  TESSERA_CHECK(setup.model.vocab_size >= tokenizer.vocab_size(), InvalidArgument,
                "experiment: the model's vocabulary (", setup.model.vocab_size,
                ") is smaller than the byte tokenizer's (", tokenizer.vocab_size(), ")");
  const std::vector<DomainCorpus> corpora = load_domain_corpora(o.sources, tokenizer);
  DataPlanOptions dp;
  dp.clients = o.clients;
  dp.alpha = o.alpha;
  dp.seed = o.seed;
  dp.tokens_per_client = o.tokens_per_client;
  dp.block_tokens = o.block_tokens;
  setup.plans = plan_client_data(corpora, dp);
  for (const ClientDataPlan& plan : setup.plans) {
    LanguageModelSpec s;
    s.model = setup.model;
    s.sources = o.sources;
    s.plan = plan;
    s.local_steps = o.local_steps;
    s.batch = o.batch;
    s.seq_len = o.seq_len;
    s.lr = o.lr;
    s.min_lr = o.min_lr;
    s.warmup = o.warmup;
    s.total_steps = o.rounds * o.local_steps;
    s.eval_windows = o.eval_windows;
    s.seed = o.seed;
    setup.specs.push_back(s.to_json());
  }
  nn::Transformer model(setup.model);
  model.init_random(o.seed);
  for (const auto& [name, t] : model.named_parameters()) setup.initial[name] = t.detach().clone();
  return setup;
}

ExperimentResult run_experiment(const ExperimentOptions& o) {
  ExperimentSetup setup = prepare_experiment(o);
  ExperimentResult result;
  result.plans = setup.plans;
  for (const auto& [n, t] : setup.initial) {
    result.parameters += t.numel();
    if (parse_expert_parameter(n)) result.expert_parameters += t.numel();
  }

  std::string work = o.work_dir;
  const bool temporary = work.empty();
  if (temporary) {
    work =
        (std::filesystem::temp_directory_path() / ("tessera-fed-" + std::to_string(getpid()) + "-" +
                                                   internal::hex(internal::random_bytes(4))))
            .string();
  }
  std::filesystem::create_directories(work);

  ServerOptions so = o.server;
  so.seed = o.seed;
  if (so.enrollment_key.empty()) so.enrollment_key = internal::hex(internal::random_bytes(32));
  const auto start = Clock::now();
  Server server(so, make_strategy(o.strategy, o.strategy_options), setup.initial);

  LauncherOptions lo;
  lo.program = o.program;
  lo.server_address = server.address();
  lo.enrollment_key = so.enrollment_key;
  lo.work_dir = work;
  lo.specs = setup.specs;
  lo.threads_per_client = o.threads_per_client;
  lo.max_message_bytes = so.max_message_bytes;
  ClientLauncher launcher(lo);
  // Wait for every client, failing early when one of them exits.
  const auto join_deadline = Clock::now() + o.join_timeout;
  while (true) {
    try {
      server.wait_for_clients(o.clients, std::chrono::seconds(1));
      break;
    } catch (const DeadlineExceeded& e) {
      std::string exited;
      for (int c = 0; c < launcher.size(); ++c) {
        if (!launcher.running(c))
          exited += " client " + std::to_string(c) + ": " + launcher.log_path(c);
      }
      if (!exited.empty()) {
        TESSERA_THROW(
            Unavailable,
            "experiment: client processes exited before joining (see their logs):", exited);
      }
      if (Clock::now() > join_deadline) throw;
    }
  }
  for (int64_t r = 0; r < o.rounds; ++r) {
    RoundRecord rec = server.run_round();
    if (o.on_round) o.on_round(rec);
    result.rounds.push_back(std::move(rec));
  }
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  server.shutdown(std::chrono::seconds(20));
  launcher.wait(std::chrono::seconds(20));
  if (temporary && !o.keep_work_dir) {
    std::error_code ec;
    std::filesystem::remove_all(work, ec);
  }
  return result;
}

}  // namespace tessera::fed
