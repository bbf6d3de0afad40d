#include "tessera/synth/reversegen.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <set>

#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/formats/safetensors.h"
#include "tessera/nn/align.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/train.h"
#include "tessera/synth/jsonl.h"

namespace tessera::synth {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::shared_ptr<lora::Adapter> compose_lora(const nn::Transformer& model, lora::Adapter& first,
                                            lora::Adapter& second) {
  std::vector<std::string> names;
  for (const auto& t : first.targets()) names.push_back(t.name);
  std::vector<std::string> second_names;
  for (const auto& t : second.targets()) second_names.push_back(t.name);
  TESSERA_CHECK(names == second_names, InvalidArgument,
                "compose_lora: the adapters adapt different modules");
  lora::LoraConfig c;
  c.rank = first.rank() + second.rank();
  c.alpha = static_cast<double>(c.rank);  // scale 1: the factors carry the scales
  c.target_modules = names;
  auto out = lora::make_lora(model, c);
  std::map<std::string, at::Tensor> dst;
  for (auto& [name, t] : out->named_trainable()) dst[name] = t;
  at::NoGradGuard no_grad;
  for (const auto& name : names) {
    at::Tensor a = at::cat({first.a(name).detach(), second.a(name).detach()}, 0);
    at::Tensor b = at::cat(
        {first.b(name).detach() * first.scale(), second.b(name).detach() * second.scale()}, 1);
    dst.at(name + ".lora_A.weight").copy_(a);
    dst.at(name + ".lora_B.weight").copy_(b);
  }
  return out;
}

namespace {

// splitmix64 over a list of values: per-item seeds that do not depend on
// what else runs (so resumed stages draw the same prompts and samples).
uint64_t mix(std::initializer_list<uint64_t> parts) {
  uint64_t h = 0x243F6A8885A308D3ULL;
  for (uint64_t p : parts) {
    h ^= p + 0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2);
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ULL;
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBULL;
    h ^= h >> 31;
  }
  return h;
}

std::string clean_instruction(std::string text) {
  auto trim = [](std::string& s) {
    s.erase(0, s.find_first_not_of(" \t\r\n"));
    s.erase(s.find_last_not_of(" \t\r\n") + 1);
  };
  trim(text);
  text = text.substr(0, text.find('\n'));
  if (text.rfind("Question:", 0) == 0) text = text.substr(9);
  trim(text);
  return text;
}

json label_to_json(const LabelledInstruction& l) {
  return {{"id", l.id},
          {"prompt", l.prompt},
          {"sample", l.sample},
          {"text", l.text},
          {"valid", l.label.valid},
          {"failure", l.label.failure},
          {"reason", l.label.reason},
          {"reference", l.label.reference},
          {"answer", l.label.answer},
          {"score", l.label.score},
          {"response", l.response}};
}

LabelledInstruction label_from_json(const json& j) {
  LabelledInstruction l;
  l.id = j.at("id").get<std::string>();
  l.prompt = j.at("prompt").get<int64_t>();
  l.sample = j.at("sample").get<int64_t>();
  l.text = j.at("text").get<std::string>();
  l.label.valid = j.at("valid").get<bool>();
  l.label.failure = j.at("failure").get<bool>();
  l.label.reason = j.at("reason").get<std::string>();
  l.label.reference = j.at("reference").get<std::string>();
  l.label.answer = j.at("answer").get<std::string>();
  l.label.score = j.at("score").get<double>();
  l.response = j.at("response").get<std::string>();
  return l;
}

json report_to_json(const RoundReport& r) {
  return {{"round", r.round},
          {"sampled", r.sampled},
          {"duplicates", r.duplicates},
          {"invalid", r.invalid},
          {"valid", r.valid},
          {"failures", r.failures},
          {"failure_rate", r.failure_rate},
          {"duplicate_rate", r.duplicate_rate},
          {"distinct_1", r.distinct_1},
          {"distinct_2", r.distinct_2},
          {"distinct_3", r.distinct_3},
          {"pairs", r.pairs},
          {"dpo_steps", r.dpo_steps},
          {"dpo_loss", r.dpo_loss},
          {"dpo_margin", r.dpo_margin},
          {"dpo_accuracy", r.dpo_accuracy},
          {"sample_seconds", r.sample_seconds},
          {"label_seconds", r.label_seconds},
          {"dpo_seconds", r.dpo_seconds},
          {"resumed", r.resumed}};
}

RoundReport report_from_json(const json& j) {
  RoundReport r;
  r.round = j.at("round").get<int64_t>();
  r.sampled = j.at("sampled").get<int64_t>();
  r.duplicates = j.at("duplicates").get<int64_t>();
  r.invalid = j.at("invalid").get<int64_t>();
  r.valid = j.at("valid").get<int64_t>();
  r.failures = j.at("failures").get<int64_t>();
  r.failure_rate = j.at("failure_rate").get<double>();
  r.duplicate_rate = j.at("duplicate_rate").get<double>();
  r.distinct_1 = j.at("distinct_1").get<double>();
  r.distinct_2 = j.at("distinct_2").get<double>();
  r.distinct_3 = j.at("distinct_3").get<double>();
  r.pairs = j.at("pairs").get<int64_t>();
  r.dpo_steps = j.at("dpo_steps").get<int64_t>();
  r.dpo_loss = j.at("dpo_loss").get<double>();
  r.dpo_margin = j.at("dpo_margin").get<double>();
  r.dpo_accuracy = j.at("dpo_accuracy").get<double>();
  r.sample_seconds = j.at("sample_seconds").get<double>();
  r.label_seconds = j.at("label_seconds").get<double>();
  r.dpo_seconds = j.at("dpo_seconds").get<double>();
  r.resumed = j.at("resumed").get<bool>();
  return r;
}

// Model output may hold invalid UTF-8 (a character cut by max_tokens): it
// is replaced by U+FFFD rather than failing the record.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json parse_record(const std::string& text, const std::string& file) {
  auto j = json::parse(text, nullptr, false);
  TESSERA_CHECK(!j.is_discarded() && j.is_object(), DataLoss, file, ": malformed record");
  return j;
}

bool adapter_exists(const std::string& dir) {
  return fs::exists(fs::path(dir) / "adapter_config.json");
}

void check_training(const LoraTrainingOptions& t, const char* what) {
  TESSERA_CHECK(
      t.rank >= 1 && t.batch >= 1 && t.epochs >= 1 && t.lr > 0 && t.max_length >= 2 &&
          t.checkpoint_every >= 1 && t.warmup_steps >= 0 && !t.target_modules.empty(),
      InvalidArgument, "ReverseGen: ", what,
      " training needs rank, batch, epochs, checkpoint_every >= 1, lr > 0, max_length >= 2 "
      "and target modules");
}

// Resumable training: every `every` steps the adapter and the optimiser
// state go to <dir>/ckpt/step-<k>/ and <dir>/ckpt/latest.json names the
// newest complete one (written last, so a crash mid-save leaves the previous
// checkpoint in force).
class TrainingCheckpoint {
 public:
  TrainingCheckpoint(std::string dir, lora::Adapter& adapter, nn::AdamW& optimizer)
      : dir_(std::move(dir)), adapter_(adapter), optimizer_(optimizer) {}

  // The step to continue from (0 without a checkpoint); restores the state.
  int64_t restore(const nn::Transformer& base) {
    auto latest = read_file_if_exists(dir_ + "/ckpt/latest.json");
    if (!latest) return 0;
    json j = parse_record(*latest, dir_ + "/ckpt/latest.json");
    const int64_t step = j.at("step").get<int64_t>();
    const std::string at_dir = dir_ + "/ckpt/step-" + std::to_string(step);
    auto saved = lora::load_adapter(at_dir + "/adapter", base);
    std::map<std::string, at::Tensor> src;
    for (auto& [name, t] : saved->named_trainable()) src[name] = t;
    at::NoGradGuard no_grad;
    for (auto& [name, t] : adapter_.named_trainable()) {
      auto it = src.find(name);
      TESSERA_CHECK(it != src.end(), DataLoss, at_dir, ": the adapter lacks ", name);
      t.copy_(it->second);
    }
    auto file = nn::SafetensorsFile::open(at_dir + "/optimizer.safetensors");
    for (auto& [name, t] : optimizer_.state_tensors()) t.copy_(file.get(name));
    TESSERA_LOG(Info, "synth") << dir_ << ": resuming training at step " << step;
    return step;
  }

  void save(int64_t step) {
    const std::string at_dir = dir_ + "/ckpt/step-" + std::to_string(step);
    fs::create_directories(at_dir);
    lora::save_adapter(adapter_, at_dir + "/adapter");
    nn::NamedTensors state;
    for (auto& [name, t] : optimizer_.state_tensors()) state.emplace_back(name, t);
    nn::save_safetensors(at_dir + "/optimizer.safetensors", state);
    write_file_atomic(dir_ + "/ckpt/latest.json", json{{"step", step}}.dump() + "\n");
    std::vector<fs::path> older;
    for (const auto& entry : fs::directory_iterator(dir_ + "/ckpt")) {
      const std::string name = entry.path().filename().string();
      if (entry.is_directory() && name != "step-" + std::to_string(step))
        older.push_back(entry.path());
    }
    for (const auto& p : older) fs::remove_all(p);
  }

  void clear() { fs::remove_all(dir_ + "/ckpt"); }

 private:
  std::string dir_;
  lora::Adapter& adapter_;
  nn::AdamW& optimizer_;
};

// The batch of step `step`: an epoch-wise seeded permutation of [0, n).
std::vector<int64_t> batch_indices(int64_t n, int64_t batch, int64_t step, uint64_t seed) {
  const int64_t per_epoch = (n + batch - 1) / batch;
  const int64_t epoch = step / per_epoch, j = step % per_epoch;
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(mix({seed, static_cast<uint64_t>(epoch)}));
  std::shuffle(order.begin(), order.end(), rng);
  const int64_t begin = j * batch, end = std::min(n, begin + batch);
  return std::vector<int64_t>(order.begin() + begin, order.begin() + end);
}

}  // namespace

struct ReverseGen::Impl {
  std::shared_ptr<FailureLabeller> labeller;
  std::shared_ptr<Generator> generator;

  std::unique_ptr<nn::Transformer> load_base(const std::string& path) {
    if (fs::is_regular_file(path)) return std::move(nn::load_gguf_model(path).model);
    return std::make_unique<nn::Transformer>(nn::load_hf_model(path));
  }
};

ReverseGen::ReverseGen(ReverseGenOptions options, std::shared_ptr<FailureLabeller> labeller,
                       std::shared_ptr<Generator> generator)
    : options_(std::move(options)), impl_(std::make_unique<Impl>()) {
  const auto& o = options_;
  TESSERA_CHECK(!o.work_dir.empty(), InvalidArgument, "ReverseGen: work_dir is empty");
  TESSERA_CHECK(!o.model.empty(), InvalidArgument, "ReverseGen: model is empty");
  TESSERA_CHECK(labeller && generator, InvalidArgument,
                "ReverseGen: needs a labeller and a generator");
  TESSERA_CHECK(o.shots >= 1 && static_cast<int64_t>(o.seed_tasks.size()) >= o.shots + 1,
                InvalidArgument, "ReverseGen: ", o.seed_tasks.size(), " seed tasks for ", o.shots,
                "-shot prompts (need at least shots + 1)");
  TESSERA_CHECK(
      o.warmup_examples >= 1 && o.prompts_per_round >= 1 && o.samples_per_prompt >= 1 &&
          o.proposer_max_tokens >= 1 && o.target_max_tokens >= 1 && o.generation_chunk >= 1 &&
          o.max_pairs_per_prompt >= 1 && o.dpo_beta > 0,
      InvalidArgument,
      "ReverseGen: sizes must be positive (warmup_examples, prompts_per_round, "
      "samples_per_prompt, max tokens, generation_chunk, max_pairs_per_prompt, dpo_beta)");
  check_training(o.warmup, "warm-up");
  check_training(o.dpo, "DPO");
  TESSERA_CHECK(
      o.warmup.target_modules == o.dpo.target_modules, InvalidArgument,
      "ReverseGen: warm-up and DPO adapters must adapt the same modules (they are composed)");
  impl_->labeller = std::move(labeller);
  impl_->generator = std::move(generator);
  fs::create_directories(o.work_dir);
}

ReverseGen::~ReverseGen() = default;

std::string ReverseGen::proposer_message(int64_t round, int64_t prompt) const {
  const auto& o = options_;
  std::mt19937_64 rng(
      mix({o.seed, 1, static_cast<uint64_t>(round), static_cast<uint64_t>(prompt)}));
  std::vector<size_t> order(o.seed_tasks.size());
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::string m = "Here are some example questions:\n";
  for (int64_t i = 0; i < o.shots; ++i) m += "Question: " + o.seed_tasks[order[i]] + "\n";
  return m + o.proposer_instruction;
}

std::string ReverseGen::proposer_adapter(int64_t round) const {
  if (round == 0) return options_.work_dir + "/warmup/adapter";
  return options_.work_dir + "/round_" + std::to_string(round - 1) + "/proposer_adapter";
}

std::string ReverseGen::warm_up(double* seconds) {
  const auto& o = options_;
  const std::string dir = o.work_dir + "/warmup";
  const std::string out = dir + "/adapter";
  if (auto done = read_file_if_exists(dir + "/done.json")) {
    if (seconds) *seconds = parse_record(*done, dir + "/done.json").at("seconds").get<double>();
    return out;
  }
  Stopwatch watch;
  // Few-shot prompts of `shots` seeds, each answered by one more seed.
  std::vector<nn::SftExample> examples;
  for (int64_t i = 0; i < o.warmup_examples; ++i) {
    std::mt19937_64 rng(mix({o.seed, 2, static_cast<uint64_t>(i)}));
    std::vector<size_t> order(o.seed_tasks.size());
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::string m = "Here are some example questions:\n";
    for (int64_t k = 0; k < o.shots; ++k) m += "Question: " + o.seed_tasks[order[k]] + "\n";
    m += o.proposer_instruction;
    const std::string prompt = impl_->generator->apply_chat_template({{"user", m}});
    examples.push_back({impl_->generator->tokenize(prompt),
                        impl_->generator->tokenize(o.seed_tasks[order[o.shots]] + o.end_of_turn)});
  }
  auto model = impl_->load_base(o.model);
  auto adapter =
      lora::make_lora(*model, {o.warmup.rank, o.warmup.alpha, 0.0, false, o.warmup.target_modules},
                      mix({o.seed, 3}));
  model->set_adapter(adapter);
  const int64_t n = static_cast<int64_t>(examples.size());
  const int64_t total = o.warmup.epochs * ((n + o.warmup.batch - 1) / o.warmup.batch);
  nn::TrainerOptions t;
  t.steps = total;
  t.lr = o.warmup.lr;
  t.min_lr = o.warmup.lr / 10;
  t.warmup = o.warmup.warmup_steps;
  nn::Trainer trainer(*model, t, nullptr, adapter->trainable());
  TrainingCheckpoint ckpt(dir, *adapter, trainer.optimizer());
  trainer.set_steps(ckpt.restore(*model));
  auto log = JsonlLog::open(dir + "/train.jsonl");
  for (int64_t step = trainer.steps(); step < total; ++step) {
    std::vector<nn::SftExample> part;
    for (int64_t i : batch_indices(n, o.warmup.batch, step, mix({o.seed, 4})))
      part.push_back(examples[i]);
    auto batch = nn::make_sft_batch(part, {0, o.warmup.max_length});
    auto stats = trainer.step(batch.input_ids, batch.labels);
    log.append(json{{"step", stats.step}, {"loss", stats.loss}, {"lr", stats.lr}}.dump());
    if ((step + 1) % o.warmup.checkpoint_every == 0 && step + 1 < total) ckpt.save(step + 1);
    TESSERA_LOG(Info, "synth") << "warm-up step " << step + 1 << "/" << total << " loss "
                               << stats.loss;
    if (o.progress) o.progress("warmup", step + 1);
  }
  lora::save_adapter(*adapter, out);
  ckpt.clear();
  const double s = watch.seconds();
  write_file_atomic(dir + "/done.json", json{{"seconds", s}, {"steps", total}}.dump() + "\n");
  if (seconds) *seconds = s;
  return out;
}

std::vector<LabelledInstruction> ReverseGen::labelled(int64_t round) const {
  const std::string file = options_.work_dir + "/round_" + std::to_string(round) + "/labels.jsonl";
  TESSERA_CHECK(fs::exists(file), FailedPrecondition, "ReverseGen: round ", round,
                " has no labels yet (", file, ")");
  auto log = JsonlLog::open(file);
  std::vector<LabelledInstruction> out;
  for (const auto& r : log.records()) out.push_back(label_from_json(parse_record(r, file)));
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return std::make_pair(a.prompt, a.sample) < std::make_pair(b.prompt, b.sample);
  });
  return out;
}

RoundReport ReverseGen::run_round(int64_t round, bool train) {
  const auto& o = options_;
  const std::string dir = o.work_dir + "/round_" + std::to_string(round);
  if (auto done = read_file_if_exists(dir + "/summary.json")) {
    RoundReport r = report_from_json(parse_record(*done, dir + "/summary.json"));
    TESSERA_CHECK(!train || fs::exists(dir + "/proposer_adapter/adapter_config.json"),
                  FailedPrecondition, "ReverseGen: round ", round,
                  " finished without training; remove ", dir, "/summary.json to train it");
    return r;
  }
  const std::string proposer = proposer_adapter(round);
  TESSERA_CHECK(adapter_exists(proposer), FailedPrecondition, "ReverseGen: proposer ", round,
                " does not exist yet (", proposer, "); run the warm-up and earlier rounds first");
  RoundReport report;
  report.round = round;
  Generator& gen = *impl_->generator;

  // --- Sampling: n instructions per few-shot prompt.
  Stopwatch watch;
  auto samples = JsonlLog::open(dir + "/samples.jsonl");
  std::set<int64_t> sampled_prompts;
  for (const auto& r : samples.records())
    sampled_prompts.insert(parse_record(r, samples.path()).at("prompt").get<int64_t>());
  report.resumed = !sampled_prompts.empty();
  std::vector<int64_t> todo;
  for (int64_t p = 0; p < o.prompts_per_round; ++p) {
    if (!sampled_prompts.count(p)) todo.push_back(p);
  }
  for (size_t begin = 0; begin < todo.size(); begin += static_cast<size_t>(o.generation_chunk)) {
    const size_t end = std::min(todo.size(), begin + static_cast<size_t>(o.generation_chunk));
    std::vector<GenerationRequest> requests;
    for (size_t i = begin; i < end; ++i) {
      GenerationRequest r;
      r.prompt = gen.apply_chat_template({{"user", proposer_message(round, todo[i])}});
      r.n = o.samples_per_prompt;
      r.temperature = o.proposer_temperature;
      r.top_p = o.proposer_top_p;
      r.max_tokens = o.proposer_max_tokens;
      r.seed = mix({o.seed, 5, static_cast<uint64_t>(round), static_cast<uint64_t>(todo[i])});
      r.stop = {"\n"};
      r.adapter = proposer;
      requests.push_back(std::move(r));
    }
    auto texts = gen.generate(requests);
    std::vector<std::string> records;
    for (size_t i = begin; i < end; ++i) {
      for (int64_t s = 0; s < o.samples_per_prompt; ++s) {
        const int64_t p = todo[i];
        records.push_back(
            dump(json{{"id", "r" + std::to_string(round) + "-p" + std::to_string(p) + "-s" +
                                 std::to_string(s)},
                      {"prompt", p},
                      {"sample", s},
                      {"text", clean_instruction(texts[i - begin][static_cast<size_t>(s)])}}));
      }
    }
    samples.append(records);
    TESSERA_LOG(Info, "synth") << "round " << round << ": sampled " << samples.size()
                               << " instructions";
    if (o.progress) o.progress("sample", samples.size());
  }
  report.sample_seconds = watch.seconds();

  // --- Near-duplicate removal (deterministic: recomputed on resume).
  struct Sample {
    std::string id;
    int64_t prompt, sample;
    std::string text;
  };
  std::vector<Sample> all;
  for (const auto& r : samples.records()) {
    json j = parse_record(r, samples.path());
    all.push_back({j.at("id").get<std::string>(), j.at("prompt").get<int64_t>(),
                   j.at("sample").get<int64_t>(), j.at("text").get<std::string>()});
  }
  std::sort(all.begin(), all.end(), [](const Sample& a, const Sample& b) {
    return std::make_pair(a.prompt, a.sample) < std::make_pair(b.prompt, b.sample);
  });
  std::vector<std::string> texts;
  for (const auto& s : all) texts.push_back(s.text);
  DedupResult dedup = deduplicate(texts, o.minhash, o.seed_tasks);
  report.sampled = static_cast<int64_t>(all.size());
  report.duplicates = report.sampled - static_cast<int64_t>(dedup.kept.size());
  report.duplicate_rate = dedup.duplicate_rate;
  std::vector<std::string> kept_texts;
  for (int64_t i : dedup.kept) kept_texts.push_back(texts[i]);
  report.distinct_1 = distinct_n(kept_texts, 1);
  report.distinct_2 = distinct_n(kept_texts, 2);
  report.distinct_3 = distinct_n(kept_texts, 3);

  // --- Target answers and failure labels.
  watch.reset();
  auto labels = JsonlLog::open(dir + "/labels.jsonl");
  std::set<std::string> labelled_ids;
  for (const auto& r : labels.records())
    labelled_ids.insert(parse_record(r, labels.path()).at("id").get<std::string>());
  report.resumed = report.resumed || !labelled_ids.empty();
  const FailureLabeller& labeller = *impl_->labeller;
  const TargetQuery query = labeller.query();
  std::vector<LabelledInstruction> pending;
  std::vector<std::string> invalid_records;
  for (int64_t i : dedup.kept) {
    const Sample& s = all[i];
    if (labelled_ids.count(s.id)) continue;
    LabelledInstruction l{s.id, s.prompt, s.sample, s.text, labeller.precheck(s.text), ""};
    if (!l.label.valid) {
      invalid_records.push_back(dump(label_to_json(l)));
    } else {
      pending.push_back(std::move(l));
    }
  }
  labels.append(invalid_records);
  for (size_t begin = 0; begin < pending.size(); begin += static_cast<size_t>(o.generation_chunk)) {
    const size_t end = std::min(pending.size(), begin + static_cast<size_t>(o.generation_chunk));
    std::vector<GenerationRequest> requests;
    for (size_t i = begin; i < end; ++i) {
      GenerationRequest r;
      r.prompt = gen.apply_chat_template({{"user", pending[i].text + o.target_suffix}});
      r.max_tokens = o.target_max_tokens;
      if (query.greedy) requests.push_back(r);
      if (query.samples > 0) {
        r.n = query.samples;
        r.temperature = query.temperature;
        r.seed =
            mix({o.seed, 6, static_cast<uint64_t>(round), std::hash<std::string>{}(pending[i].id)});
        requests.push_back(r);
      }
    }
    auto answers = gen.generate(requests);
    std::vector<std::string> records;
    size_t k = 0;
    for (size_t i = begin; i < end; ++i) {
      TargetResponses responses;
      if (query.greedy) responses.greedy = answers[k++].front();
      if (query.samples > 0) responses.samples = answers[k++];
      LabelledInstruction& l = pending[i];
      l.label = labeller.label(l.text, responses);
      l.response = query.greedy ? responses.greedy : responses.samples.front();
      records.push_back(dump(label_to_json(l)));
    }
    labels.append(records);
    TESSERA_LOG(Info, "synth") << "round " << round << ": labelled " << labels.size() << "/"
                               << dedup.kept.size();
    if (o.progress) o.progress("label", labels.size());
  }
  report.label_seconds = watch.seconds();
  std::vector<LabelledInstruction> done = labelled(round);
  for (const auto& l : done) {
    if (!l.label.valid) {
      ++report.invalid;
    } else {
      ++report.valid;
      report.failures += l.label.failure;
    }
  }
  report.failure_rate =
      report.valid > 0 ? static_cast<double>(report.failures) / report.valid : 0.0;

  // --- Preference pairs: failure-inducing over solved (then unjudgeable),
  // within one prompt.
  std::map<int64_t, std::vector<const LabelledInstruction*>> chosen, rejected, unjudged;
  for (const auto& l : done) {
    if (l.label.valid && l.label.failure) chosen[l.prompt].push_back(&l);
    if (l.label.valid && !l.label.failure) rejected[l.prompt].push_back(&l);
    if (!l.label.valid && o.invalid_as_rejected) unjudged[l.prompt].push_back(&l);
  }
  std::vector<std::pair<const LabelledInstruction*, const LabelledInstruction*>> pairs;
  std::string pair_records;
  for (auto& [p, good] : chosen) {
    auto bad = rejected[p];
    bad.insert(bad.end(), unjudged[p].begin(), unjudged[p].end());
    const size_t count =
        std::min({good.size(), bad.size(), static_cast<size_t>(o.max_pairs_per_prompt)});
    for (size_t i = 0; i < count; ++i) {
      pairs.emplace_back(good[i], bad[i]);
      pair_records += dump(json{{"prompt", p},
                                {"chosen", good[i]->id},
                                {"rejected", bad[i]->id},
                                {"chosen_text", good[i]->text},
                                {"rejected_text", bad[i]->text}}) +
                      "\n";
    }
  }
  write_file_atomic(dir + "/pairs.jsonl", pair_records);
  report.pairs = static_cast<int64_t>(pairs.size());

  if (train) {
    // --- DPO: proposer round + 1 = base + A0 (merged, the reference) + A1.
    watch.reset();
    auto model = impl_->load_base(o.model);
    auto a0 = lora::load_adapter(proposer_adapter(0), *model);
    lora::merge(*model, *a0);
    const std::string previous =
        o.work_dir + "/round_" + std::to_string(round - 1) + "/dpo_adapter";
    std::shared_ptr<lora::Adapter> a1 =
        round > 0 && adapter_exists(previous)
            ? lora::load_adapter(previous, *model)
            : lora::make_lora(*model, {o.dpo.rank, o.dpo.alpha, 0.0, false, o.dpo.target_modules},
                              mix({o.seed, 7}));
    model->set_adapter(a1);
    const int64_t n = static_cast<int64_t>(pairs.size());
    const int64_t total = n == 0 ? 0 : o.dpo.epochs * ((n + o.dpo.batch - 1) / o.dpo.batch);
    nn::DpoOptions d;
    d.beta = o.dpo_beta;
    d.steps = std::max<int64_t>(total, 1);
    d.lr = o.dpo.lr;
    d.min_lr = o.dpo.lr / 10;
    d.warmup = o.dpo.warmup_steps;
    nn::DpoTrainer trainer(*model, d, nullptr, a1->trainable());
    TrainingCheckpoint ckpt(dir, *a1, trainer.optimizer());
    trainer.set_steps(ckpt.restore(*model));
    std::vector<nn::PreferencePair> token_pairs;
    for (const auto& [good, bad] : pairs) {
      const std::string prompt =
          gen.apply_chat_template({{"user", proposer_message(round, good->prompt)}});
      token_pairs.push_back({gen.tokenize(prompt), gen.tokenize(good->text + o.end_of_turn),
                             gen.tokenize(bad->text + o.end_of_turn)});
    }
    // The reference (the warm-up proposer) scores every pair once.
    std::vector<double> ref_chosen(static_cast<size_t>(n)), ref_rejected(static_cast<size_t>(n));
    for (int64_t begin = 0; begin < n; begin += o.dpo.batch) {
      const int64_t count = std::min(o.dpo.batch, n - begin);
      std::vector<nn::PreferencePair> part(token_pairs.begin() + begin,
                                           token_pairs.begin() + begin + count);
      at::Tensor ref =
          trainer.reference_logprobs(nn::make_preference_batch(part, {0, o.dpo.max_length}));
      for (int64_t i = 0; i < count; ++i) {
        ref_chosen[begin + i] = ref[i].item<double>();
        ref_rejected[begin + i] = ref[count + i].item<double>();
      }
    }
    auto log = JsonlLog::open(dir + "/dpo.jsonl");
    for (int64_t step = trainer.steps(); step < total; ++step) {
      std::vector<nn::PreferencePair> part;
      std::vector<double> rc, rr;
      for (int64_t i :
           batch_indices(n, o.dpo.batch, step, mix({o.seed, 8, static_cast<uint64_t>(round)}))) {
        part.push_back(token_pairs[i]);
        rc.push_back(ref_chosen[i]);
        rr.push_back(ref_rejected[i]);
      }
      auto batch = nn::make_preference_batch(part, {0, o.dpo.max_length});
      rc.insert(rc.end(), rr.begin(), rr.end());
      batch.reference_logprobs = at::tensor(rc, at::kDouble);
      auto s = trainer.step(batch);
      log.append(json{
          {"step", s.step},
          {"loss", s.loss},
          {"margin", s.margin},
          {"accuracy", s.accuracy},
          {"chosen_reward", s.chosen_reward},
          {"rejected_reward", s.rejected_reward},
          {"grad_norm", s.grad_norm},
          {"lr",
           s.lr}}.dump());
      report.dpo_loss = s.loss;
      report.dpo_margin = s.margin;
      report.dpo_accuracy = s.accuracy;
      if ((step + 1) % o.dpo.checkpoint_every == 0 && step + 1 < total) ckpt.save(step + 1);
      TESSERA_LOG(Info, "synth") << "round " << round << " dpo step " << step + 1 << "/" << total
                                 << " loss " << s.loss << " margin " << s.margin;
      if (o.progress) o.progress("dpo", step + 1);
    }
    if (report.dpo_loss == 0 && !log.records().empty()) {
      // Finished before an interruption: the last logged step's numbers.
      json last = parse_record(log.records().back(), log.path());
      report.dpo_loss = last.at("loss").get<double>();
      report.dpo_margin = last.at("margin").get<double>();
      report.dpo_accuracy = last.at("accuracy").get<double>();
    }
    report.dpo_steps = total;
    lora::save_adapter(*a1, dir + "/dpo_adapter");
    auto composed = compose_lora(*model, *a0, *a1);
    lora::save_adapter(*composed, dir + "/proposer_adapter");
    ckpt.clear();
    report.dpo_seconds = watch.seconds();
  }
  write_file_atomic(dir + "/summary.json", report_to_json(report).dump(2) + "\n");
  TESSERA_LOG(Info, "synth") << "round " << round << ": failure rate " << report.failure_rate
                             << " (" << report.failures << "/" << report.valid
                             << " valid), duplicates " << report.duplicates << ", invalid "
                             << report.invalid << ", pairs " << report.pairs;
  return report;
}

std::string ReverseGen::sft_target(const std::string& name,
                                   const std::vector<TargetExample>& examples,
                                   const LoraTrainingOptions& training, uint64_t seed,
                                   double* seconds) {
  check_training(training, "target");
  TESSERA_CHECK(!examples.empty(), InvalidArgument, "ReverseGen: no examples to fine-tune '", name,
                "' on");
  const auto& o = options_;
  const std::string dir = o.work_dir + "/target/" + name;
  const std::string out = dir + "/adapter";
  if (auto done = read_file_if_exists(dir + "/done.json")) {
    if (seconds) *seconds = parse_record(*done, dir + "/done.json").at("seconds").get<double>();
    return out;
  }
  Stopwatch watch;
  Generator& gen = *impl_->generator;
  std::vector<nn::SftExample> rows;
  std::string data;
  for (const auto& e : examples) {
    const std::string prompt = gen.apply_chat_template({{"user", e.instruction + o.target_suffix}});
    rows.push_back({gen.tokenize(prompt), gen.tokenize(e.response + o.end_of_turn)});
    data += dump(json{{"instruction", e.instruction}, {"response", e.response}}) + "\n";
  }
  write_file_atomic(dir + "/data.jsonl", data);
  auto model = impl_->load_base(o.model);
  auto adapter = lora::make_lora(
      *model, {training.rank, training.alpha, 0.0, false, training.target_modules}, mix({seed, 9}));
  model->set_adapter(adapter);
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t total = training.epochs * ((n + training.batch - 1) / training.batch);
  nn::TrainerOptions t;
  t.steps = total;
  t.lr = training.lr;
  t.min_lr = training.lr / 10;
  t.warmup = training.warmup_steps;
  nn::Trainer trainer(*model, t, nullptr, adapter->trainable());
  TrainingCheckpoint ckpt(dir, *adapter, trainer.optimizer());
  trainer.set_steps(ckpt.restore(*model));
  auto log = JsonlLog::open(dir + "/train.jsonl");
  for (int64_t step = trainer.steps(); step < total; ++step) {
    std::vector<nn::SftExample> part;
    for (int64_t i : batch_indices(n, training.batch, step, mix({seed, 10})))
      part.push_back(rows[i]);
    auto batch = nn::make_sft_batch(part, {0, training.max_length});
    auto stats = trainer.step(batch.input_ids, batch.labels);
    log.append(json{{"step", stats.step}, {"loss", stats.loss}, {"lr", stats.lr}}.dump());
    if ((step + 1) % training.checkpoint_every == 0 && step + 1 < total) ckpt.save(step + 1);
    TESSERA_LOG(Info, "synth") << "target '" << name << "' step " << step + 1 << "/" << total
                               << " loss " << stats.loss;
    if (o.progress) o.progress("target:" + name, step + 1);
  }
  lora::save_adapter(*adapter, out);
  ckpt.clear();
  const double s = watch.seconds();
  write_file_atomic(dir + "/done.json",
                    json{{"seconds", s}, {"steps", total}, {"examples", n}}.dump() + "\n");
  if (seconds) *seconds = s;
  return out;
}

EvalReport ReverseGen::evaluate(const std::string& name, const std::string& adapter,
                                const std::vector<std::string>& problems) {
  const auto& o = options_;
  Stopwatch watch;
  auto log = JsonlLog::open(o.work_dir + "/eval/" + name + ".jsonl");
  std::map<int64_t, json> answered;
  for (const auto& r : log.records()) {
    json j = parse_record(r, log.path());
    answered[j.at("i").get<int64_t>()] = j;
  }
  const FailureLabeller& labeller = *impl_->labeller;
  const TargetQuery query = labeller.query();
  std::vector<int64_t> todo;
  for (int64_t i = 0; i < static_cast<int64_t>(problems.size()); ++i) {
    if (!answered.count(i)) todo.push_back(i);
  }
  for (size_t begin = 0; begin < todo.size(); begin += static_cast<size_t>(o.generation_chunk)) {
    const size_t end = std::min(todo.size(), begin + static_cast<size_t>(o.generation_chunk));
    std::vector<GenerationRequest> requests;
    for (size_t k = begin; k < end; ++k) {
      GenerationRequest r;
      r.prompt =
          impl_->generator->apply_chat_template({{"user", problems[todo[k]] + o.target_suffix}});
      r.max_tokens = o.target_max_tokens;
      r.adapter = adapter;
      if (query.greedy) requests.push_back(r);
      if (query.samples > 0) {
        r.n = query.samples;
        r.temperature = query.temperature;
        r.seed = mix({o.seed, 11, static_cast<uint64_t>(todo[k])});
        requests.push_back(r);
      }
    }
    auto answers = impl_->generator->generate(requests);
    std::vector<std::string> records;
    size_t a = 0;
    for (size_t k = begin; k < end; ++k) {
      TargetResponses responses;
      if (query.greedy) responses.greedy = answers[a++].front();
      if (query.samples > 0) responses.samples = answers[a++];
      FailureLabel l = labeller.label(problems[todo[k]], responses);
      json j = {{"i", todo[k]},
                {"text", problems[todo[k]]},
                {"valid", l.valid},
                {"failure", l.failure},
                {"answer", l.answer},
                {"reference", l.reference},
                {"response", query.greedy ? responses.greedy : responses.samples.front()}};
      answered[todo[k]] = j;
      records.push_back(dump(j));
    }
    log.append(records);
    if (o.progress) o.progress("eval:" + name, log.size());
  }
  EvalReport report;
  report.problems = static_cast<int64_t>(problems.size());
  for (const auto& [i, j] : answered) {
    if (i >= report.problems || !j.at("valid").get<bool>()) continue;
    ++report.valid;
    report.failures += j.at("failure").get<bool>();
  }
  report.accuracy =
      report.valid > 0 ? 1.0 - static_cast<double>(report.failures) / report.valid : 0.0;
  report.seconds = watch.seconds();
  return report;
}

}  // namespace tessera::synth
