#include "tessera/reason/scene_vlm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <random>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/nn/train.h"
#include "tessera/reason/scenes.h"
#include "tessera/tokenizer/tokenizer_folder.h"

namespace fs = std::filesystem;

namespace tessera::reason {
namespace {

void write_text(const fs::path& path, const std::string& text) {
  AtomicFileWriter writer(path.string());
  writer.append(text.data(), text.size());
  writer.commit();
}

const std::vector<std::string> kSpecials = {
    "<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
    "<global-img>"};

}  // namespace

int64_t write_bpe_tokenizer(const std::string& dir, const std::vector<std::string>& texts,
                            int64_t merges, const std::vector<std::string>& specials) {
  TESSERA_CHECK(merges >= 0, InvalidArgument, "write_bpe_tokenizer: negative merge count");
  std::vector<std::string> sym;
  for (int b = 0; b < 256; ++b) sym.push_back(nn::byte_level_symbol(static_cast<uint8_t>(b)));
  // Word frequencies, each word as its byte symbols.
  std::map<std::vector<std::string>, int64_t> words;
  for (const std::string& text : texts) {
    for (std::string_view w : nn::pre_tokenize(text, nn::PreTokenizerKind::kGpt2)) {
      std::vector<std::string> s;
      for (unsigned char b : w) s.push_back(sym[b]);
      ++words[s];
    }
  }
  std::vector<std::string> vocab(sym.begin(), sym.end());
  std::vector<std::pair<std::string, std::string>> merge_list;
  std::vector<std::pair<std::vector<std::string>, int64_t>> current(words.begin(), words.end());
  for (int64_t m = 0; m < merges; ++m) {
    std::map<std::pair<std::string, std::string>, int64_t> pairs;
    for (const auto& [w, n] : current) {
      for (size_t i = 0; i + 1 < w.size(); ++i) pairs[{w[i], w[i + 1]}] += n;
    }
    if (pairs.empty()) break;
    // Most frequent pair; ties go to the smallest pair (deterministic).
    auto best = pairs.begin();
    for (auto it = pairs.begin(); it != pairs.end(); ++it) {
      if (it->second > best->second) best = it;
    }
    const auto [a, b] = best->first;
    merge_list.emplace_back(a, b);
    vocab.push_back(a + b);
    for (auto& [w, n] : current) {
      std::vector<std::string> merged;
      for (size_t i = 0; i < w.size(); ++i) {
        if (i + 1 < w.size() && w[i] == a && w[i + 1] == b) {
          merged.push_back(a + b);
          ++i;
        } else {
          merged.push_back(w[i]);
        }
      }
      w = std::move(merged);
    }
  }
  nn::TokenizerSpec spec;
  spec.vocab = vocab;
  spec.merges = merge_list;
  for (size_t i = 0; i < specials.size(); ++i) {
    nn::AddedToken t;
    t.content = specials[i];
    t.id = static_cast<int32_t>(vocab.size() + i);
    spec.added.push_back(t);
  }
  if (!specials.empty()) spec.eos_id = spec.pad_id = static_cast<int32_t>(vocab.size());
  nn::write_tokenizer_folder(dir, spec);
  return static_cast<int64_t>(vocab.size() + specials.size());
}

namespace {

nn::ImageProcessorConfig scene_processor(int64_t image_size) {
  nn::ImageProcessorConfig p;
  p.image_processor_type = "Idefics3ImageProcessor";
  p.size_longest_edge = image_size;
  p.max_image_size = image_size;
  p.resample = nn::Resample::kLanczos;
  p.do_image_splitting = false;
  p.image_mean = {0.5, 0.5, 0.5};
  p.image_std = {0.5, 0.5, 0.5};
  return p;
}

struct Example {
  std::vector<int64_t> ids;
  std::vector<int64_t>
      labels;  // -100 outside the answers, aligned with ids (predict ids[t] at t-1)
};

// One training sequence: the image in the first user turn, then
// `turns` question / answer pairs; the loss covers the answers and their
// end-of-utterance tokens.
Example make_example(const nn::Tokenizer& tok, const nn::VlmConfig& config, const Scene& scene,
                     uint64_t seed, int64_t turns) {
  const auto qas = perception_questions(scene, seed, static_cast<int>(turns));
  Example ex;
  auto append = [&](const std::string& text, bool supervised) {
    for (int32_t id : tok.encode(text, true)) {
      ex.ids.push_back(id);
      ex.labels.push_back(supervised ? id : -100);
    }
  };
  nn::ProcessedImage whole;
  for (size_t i = 0; i < qas.size(); ++i) {
    std::string user =
        i == 0 ? nn::expand_image_markers(
                     nn::format_vlm_chat(nn::VlmLayout::kIdefics3, {{"user", qas[i].question, 1}}),
                     config, {whole})
               : "User: " + qas[i].question + "<end_of_utterance>\nAssistant:";
    append(user, false);
    append(" " + qas[i].answer + "<end_of_utterance>", true);
    append("\n", false);
  }
  return ex;
}

}  // namespace

SceneVlmReport train_scene_vlm(const SceneVlmOptions& o) {
  TESSERA_CHECK(!o.output_dir.empty(), InvalidArgument, "train_scene_vlm: output_dir is empty");
  TESSERA_CHECK(o.steps >= 1 && o.batch >= 1 && o.questions_per_scene >= 1, InvalidArgument,
                "train_scene_vlm: steps, batch and questions_per_scene must be positive");
  if (o.threads > 0) at::set_num_threads(o.threads);
  Stopwatch watch;
  nn::VlmConfig config;
  std::unique_ptr<nn::VisionLanguageModel> model;
  if (!o.init_from.empty()) {
    fs::create_directories(o.output_dir);
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
      if (fs::absolute(o.init_from) != fs::absolute(o.output_dir)) {
        fs::copy_file(fs::path(o.init_from) / f, fs::path(o.output_dir) / f,
                      fs::copy_options::overwrite_existing);
      }
    }
    model = std::make_unique<nn::VisionLanguageModel>(nn::load_vlm(o.init_from));
    config = model->config();
  }
  // Tokenizer from the text of scenes that training will not use for images.
  int64_t vocab = 0;
  if (o.init_from.empty()) {
    std::vector<std::string> corpus;
    for (uint64_t s = 0; s < 3000; ++s) {
      Scene scene = make_scene(kTrainSceneSeedBase / 2 + s);
      for (const auto& qa : perception_questions(scene, s, 6)) {
        corpus.push_back(qa.question);
        corpus.push_back(" " + qa.answer);
      }
    }
    corpus.push_back("User: Assistant:\n");
    vocab = write_bpe_tokenizer(o.output_dir, corpus, o.bpe_merges, kSpecials);
  }
  nn::Tokenizer tok =
      nn::Tokenizer::from_tokenizer_json((fs::path(o.output_dir) / "tokenizer.json").string());
  if (model == nullptr) {
    config.layout = nn::VlmLayout::kIdefics3;
    config.model_type = "idefics3";
    config.vision.model_type = "idefics3_vision";
    config.vision.hidden_size = o.vision_hidden;
    config.vision.intermediate_size = 2 * o.vision_hidden;
    config.vision.num_hidden_layers = o.vision_layers;
    config.vision.num_attention_heads = o.vision_heads;
    config.vision.image_size = o.image_size;
    config.vision.patch_size = o.patch_size;
    config.scale_factor = o.scale_factor;
    config.text.model_type = "llama";
    config.text.vocab_size = vocab;
    config.text.hidden_size = o.text_hidden;
    config.text.intermediate_size = 2 * o.text_hidden;
    config.text.num_hidden_layers = o.text_layers;
    config.text.num_attention_heads = o.text_heads;
    config.text.num_key_value_heads = o.text_kv_heads;
    config.text.max_position_embeddings = 512;
    config.text.rms_norm_eps = 1e-5;
    config.text.tie_word_embeddings = true;
    config.text.eos_token_ids = {tok.token_to_id("<end_of_utterance>")};
    config.image_token_id = tok.token_to_id("<image>");
    model = std::make_unique<nn::VisionLanguageModel>(config);
    model->init_random(o.seed);
  }
  vocab = config.text.vocab_size;
  model->set_requires_grad(true);
  const nn::ImageProcessorConfig processor = scene_processor(config.vision.image_size);

  // Two optimisers: the language model, and the vision side (encoder and
  // connector) at vision_lr_scale times the learning rate.
  std::vector<at::Tensor> text_params, vision_params;
  for (auto& [name, t] : model->named_parameters()) {
    const bool text = name.rfind("model.text_model.", 0) == 0 || name == "lm_head.weight";
    (text ? text_params : vision_params).push_back(t);
  }
  nn::AdamWOptions adam;
  adam.weight_decay = 0.01;
  nn::AdamW text_optimizer(text_params, adam);
  nn::AdamW vision_optimizer(vision_params, adam);
  SceneVlmReport report;
  report.parameters = config.num_parameters();
  report.vocab_size = vocab;
  TESSERA_LOG(Info, "reason") << "scene VLM: " << config.summary();
  const int64_t pad = tok.token_to_id("<|endoftext|>");
  // Resumed runs draw other scenes than the run they continue.
  std::mt19937_64 order(o.seed * 7919 + 1 + (o.init_from.empty() ? 0 : 104729));
  double loss_sum = 0;
  int64_t loss_n = 0;
  for (int64_t step = 0; step < o.steps; ++step) {
    std::vector<Example> batch;
    std::vector<at::Tensor> pixels;
    for (int64_t b = 0; b < o.batch; ++b) {
      const uint64_t scene_seed = kTrainSceneSeedBase + (order() % (uint64_t{1} << 40));
      Scene scene = make_scene(scene_seed);
      pixels.push_back(nn::preprocess_image(render_scene(scene), processor).pixel_values);
      batch.push_back(make_example(tok, config, scene, scene_seed, o.questions_per_scene));
    }
    size_t longest = 0;
    for (const Example& e : batch) longest = std::max(longest, e.ids.size());
    at::Tensor ids = at::full({o.batch, static_cast<int64_t>(longest)}, pad, at::kLong);
    at::Tensor labels = at::full({o.batch, static_cast<int64_t>(longest)}, -100, at::kLong);
    for (int64_t b = 0; b < o.batch; ++b) {
      const int64_t n = static_cast<int64_t>(batch[b].ids.size());
      ids[b].narrow(0, 0, n).copy_(at::tensor(batch[b].ids, at::kLong));
      labels[b].narrow(0, 0, n).copy_(at::tensor(batch[b].labels, at::kLong));
    }
    at::Tensor logits = model->forward(ids, at::cat(pixels, 0)).logits;  // [B, T, V]
    at::Tensor loss = at::cross_entropy_loss(logits.narrow(1, 0, longest - 1).reshape({-1, vocab}),
                                             labels.narrow(1, 1, longest - 1).reshape({-1}), {},
                                             at::Reduction::Mean, -100);
    text_optimizer.zero_grad();
    vision_optimizer.zero_grad();
    loss.backward();
    const double lr = nn::warmup_cosine_lr(step, o.warmup, o.steps, o.lr, o.min_lr);
    text_optimizer.step(lr, 1.0);
    vision_optimizer.step(lr * o.vision_lr_scale, 1.0);
    loss_sum += loss.item<double>();
    ++loss_n;
    const bool last = step + 1 == o.steps;
    if ((o.log_every > 0 && (step + 1) % o.log_every == 0) || last) {
      report.loss_curve.emplace_back(step + 1, loss_sum / loss_n);
      TESSERA_LOG(Info, "reason") << "step " << step + 1 << "/" << o.steps << " loss "
                                  << loss_sum / loss_n << " (" << watch.seconds() << " s)";
      loss_sum = 0;
      loss_n = 0;
    }
  }
  model->set_requires_grad(false);
  nn::save_vlm(o.output_dir, *model);
  write_text(fs::path(o.output_dir) / "preprocessor_config.json", processor.to_json());
  report.seconds = watch.seconds();
  return report;
}

PerceptionEval evaluate_perception(const nn::LoadedVlm& vlm, uint64_t first_seed, int64_t scenes,
                                   int64_t per_scene) {
  TESSERA_CHECK(first_seed + scenes <= kTrainSceneSeedBase / 2, InvalidArgument,
                "evaluate_perception: scene seeds [", first_seed, ", ", first_seed + scenes,
                ") reach the seeds used for training data");
  at::NoGradGuard no_grad;
  std::vector<QuestionAnswer> qas;
  std::vector<nn::VlmInput> inputs;
  for (int64_t s = 0; s < scenes; ++s) {
    Scene scene = make_scene(first_seed + s);
    nn::Image img = render_scene(scene);
    int64_t taken = 0;
    for (const auto& qa :
         perception_questions(scene, 100000 + first_seed + s, static_cast<int>(per_scene) * 3)) {
      if (qa.kind == "caption" || taken == per_scene) continue;
      ++taken;
      qas.push_back(qa);
      inputs.push_back(vlm.prepare({{"user", qa.question, 1}}, {img}));
    }
  }
  nn::SamplingOptions sampling;
  sampling.max_new_tokens = 8;
  sampling.stop_tokens = vlm.stop_tokens();
  PerceptionEval eval;
  std::map<std::string, std::map<std::string, int64_t>> answers_by_kind;
  for (size_t start = 0; start < inputs.size(); start += 32) {
    std::vector<nn::VlmInput> chunk(inputs.begin() + start,
                                    inputs.begin() + std::min(inputs.size(), start + 32));
    nn::GenerationResult r = nn::generate_vlm(*vlm.model, chunk, sampling);
    for (size_t i = 0; i < chunk.size(); ++i) {
      const QuestionAnswer& qa = qas[start + i];
      std::vector<int32_t> toks(r.tokens[i].begin(), r.tokens[i].end());
      std::string text = vlm.tokenizer.decode(toks, /*skip_special=*/true);
      while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front())))
        text.erase(0, 1);
      while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back())))
        text.pop_back();
      const bool ok = text == qa.answer;
      eval.correct += ok;
      auto& k = eval.by_kind[qa.kind];
      k.first += ok;
      k.second += 1;
      ++answers_by_kind[qa.kind][qa.answer];
    }
  }
  eval.questions = static_cast<int64_t>(qas.size());
  eval.accuracy = eval.questions ? static_cast<double>(eval.correct) / eval.questions : 0;
  int64_t majority = 0;
  for (const auto& [kind, counts] : answers_by_kind) {
    int64_t best = 0;
    for (const auto& [answer, n] : counts) best = std::max(best, n);
    majority += best;
  }
  eval.majority_baseline = eval.questions ? static_cast<double>(majority) / eval.questions : 0;
  return eval;
}

}  // namespace tessera::reason
