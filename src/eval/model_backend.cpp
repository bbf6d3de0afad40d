#include "tessera/eval/model_backend.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <numeric>
#include <optional>
#include <sstream>

#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/lora/lora.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/quant/model.h"
#include "tessera/specdec/qspec.h"
#include "tessera/tokenizer/chat.h"

#include "prompt_tokens.h"

namespace tessera::eval {

namespace fs = std::filesystem;

ChatTemplateMode parse_chat_template_mode(const std::string& name) {
  if (name == "auto") return ChatTemplateMode::kAuto;
  if (name == "on") return ChatTemplateMode::kOn;
  if (name == "off") return ChatTemplateMode::kOff;
  TESSERA_THROW(InvalidArgument, "unknown chat template mode '", name,
                "' (expected auto, on or off)");
}

const char* chat_template_mode_name(ChatTemplateMode mode) {
  switch (mode) {
    case ChatTemplateMode::kAuto:
      return "auto";
    case ChatTemplateMode::kOn:
      return "on";
    case ChatTemplateMode::kOff:
      return "off";
  }
  return "?";
}

namespace {
using Ids = std::vector<int64_t>;
}  // namespace

struct ModelBackend::Impl {
  ModelBackendOptions options;
  std::unique_ptr<nn::Transformer> model;
  nn::Tokenizer tokenizer;
  std::string chat_template;
  bool chat = false;
  bool add_bos = false;
  std::shared_ptr<quant::QuantizedModel> packed;  // null for "fp"
  specdec::GenerateOptions spec;                  // decoding of packed models
  std::vector<int64_t> stop_tokens;               // end of text / end of turn
  int64_t max_length = 0;
  std::string description;

  Impl(std::unique_ptr<nn::Transformer> m, nn::Tokenizer t) : model(std::move(m)), tokenizer(t) {}

  bool batch_invariant() const { return packed != nullptr || options.batch_invariant; }

  Ids encode(const std::string& text) const { return detail::encode(tokenizer, add_bos, text); }

  std::string decode(const Ids& ids) const {
    std::vector<int32_t> narrow(ids.begin(), ids.end());
    return tokenizer.decode(narrow, /*skip_special=*/true);
  }

  std::string generation_prompt(const GenerateRequest& r) const {
    return chat ? nn::format_chat(chat_template, detail::to_chat(r.messages)) : r.context;
  }

  // Prompt ids, cut from the left so that the prompt and `max_new` tokens
  // fit the window.
  Ids prompt_ids(const GenerateRequest& r, int64_t max_new) const {
    Ids ids = encode(generation_prompt(r));
    const int64_t room = std::max<int64_t>(max_length - max_new, 1);
    if (static_cast<int64_t>(ids.size()) > room) {
      TESSERA_LOG(Warn, "eval") << "prompt of " << ids.size() << " tokens cut to its last " << room
                                << " (window " << max_length << ", " << max_new << " new tokens)";
      ids.erase(ids.begin(), ids.end() - room);
    }
    TESSERA_CHECK(!ids.empty(), InvalidArgument,
                  "generate: the prompt encodes to no tokens and the model has no BOS token");
    return ids;
  }

  // One decoding call: new tokens per prompt (stop tokens included).
  std::vector<Ids> decode_batch(const std::vector<Ids>& prompts, int64_t max_new,
                                const GenerateRequest& sampling) {
    nn::SamplingOptions s;
    s.max_new_tokens = max_new;
    s.stop_tokens = stop_tokens;
    s.batch_invariant = batch_invariant();
    const bool greedy = !sampling.do_sample || sampling.temperature <= 0;
    s.temperature = greedy ? 0.0 : sampling.temperature;
    if (packed) {
      specdec::GenerateOptions o = spec;
      o.sampling = s;
      return specdec::generate(*model, *packed, prompts, o).tokens;
    }
    return nn::generate(*model, prompts, s).tokens;
  }

  bool is_stop_token(int64_t t) const {
    return std::find(stop_tokens.begin(), stop_tokens.end(), t) != stop_tokens.end();
  }

  void setup(const std::string& source);
  std::vector<std::string> generate(const std::vector<GenerateRequest>& requests);
  std::vector<LoglikelihoodResult> loglikelihood(const std::vector<LoglikelihoodRequest>& requests);
};

namespace {

struct Sequence {
  size_t request = 0;
  Ids prompt;
  Ids generated;
  int64_t max_new = 0;
  std::string text;
  bool done = false;
};

}  // namespace

std::vector<std::string> ModelBackend::Impl::generate(
    const std::vector<GenerateRequest>& requests) {
  std::vector<std::string> out(requests.size());
  std::vector<Sequence> seqs(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    const GenerateRequest& r = requests[i];
    TESSERA_CHECK(r.max_gen_toks > 0, InvalidArgument, "generate: request ", i,
                  ": max_gen_toks must be positive, got ", r.max_gen_toks);
    seqs[i].request = i;
    seqs[i].max_new = r.max_gen_toks;
    seqs[i].prompt = prompt_ids(r, r.max_gen_toks);
  }
  // Longest prompts first (as lm-eval), so a batch holds similar lengths;
  // requests that sample differently never share a batch.
  auto sampling_key = [&](size_t i) {
    const GenerateRequest& r = requests[i];
    const bool greedy = !r.do_sample || r.temperature <= 0;
    return greedy ? 0.0 : r.temperature;
  };
  std::vector<size_t> order(seqs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (sampling_key(a) != sampling_key(b)) return sampling_key(a) < sampling_key(b);
    return seqs[a].prompt.size() > seqs[b].prompt.size();
  });

  const size_t max_batch = static_cast<size_t>(options.max_batch);
  size_t next = 0;
  while (next < order.size()) {
    std::vector<Sequence*> batch;
    const double key = sampling_key(order[next]);
    while (next < order.size() && batch.size() < max_batch && sampling_key(order[next]) == key) {
      batch.push_back(&seqs[order[next++]]);
    }
    const GenerateRequest& sampling = requests[batch.front()->request];
    // Chunks double in length: sequences that stop early leave after the
    // first, and a long answer re-reads its prompt only log2(n) times.
    int64_t chunk_limit = options.chunk_tokens;
    for (;; chunk_limit *= 2) {
      std::vector<Sequence*> active;
      for (Sequence* s : batch) {
        if (!s->done) active.push_back(s);
      }
      if (active.empty()) break;
      int64_t remaining = 0;
      for (Sequence* s : active) {
        remaining = std::max<int64_t>(remaining, s->max_new - s->generated.size());
      }
      const int64_t chunk = std::min<int64_t>(chunk_limit, remaining);
      std::vector<Ids> prompts;
      for (Sequence* s : active) {
        Ids p = s->prompt;
        p.insert(p.end(), s->generated.begin(), s->generated.end());
        prompts.push_back(std::move(p));
      }
      const std::vector<Ids> tokens = decode_batch(prompts, chunk, sampling);
      for (size_t j = 0; j < active.size(); ++j) {
        Sequence& s = *active[j];
        bool stopped = false;
        for (int64_t t : tokens[j]) {
          if (static_cast<int64_t>(s.generated.size()) >= s.max_new) break;
          if (is_stop_token(t)) {
            stopped = true;
            break;
          }
          s.generated.push_back(t);
        }
        s.text = decode(s.generated);
        const size_t cut = detail::first_stop(s.text, requests[s.request].until);
        if (cut != std::string::npos) {
          s.text.resize(cut);
          stopped = true;
        }
        if (stopped || static_cast<int64_t>(s.generated.size()) >= s.max_new) s.done = true;
      }
    }
    for (Sequence* s : batch) out[s->request] = std::move(s->text);
  }
  return out;
}

namespace {

using Scored = detail::ScoredTokens;

// Context tokens of a request, for grouping requests that share them.
Ids context_of(const Scored& s) { return Ids(s.tokens.begin(), s.tokens.begin() + s.context); }

}  // namespace

std::vector<LoglikelihoodResult> ModelBackend::Impl::loglikelihood(
    const std::vector<LoglikelihoodRequest>& requests) {
  std::vector<Scored> scored(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    detail::ScoredTokens s = detail::encode_pair(
        tokenizer, add_bos, detail::loglikelihood_text(requests[i], chat, chat_template), i);
    const size_t window = static_cast<size_t>(max_length);
    if (s.tokens.size() > window) {
      const size_t drop = s.tokens.size() - window;
      TESSERA_CHECK(drop < s.context, InvalidArgument, "loglikelihood: request ", i, ": the ",
                    s.tokens.size() - s.context, "-token continuation does not fit the ", window,
                    "-token window");
      TESSERA_LOG(Warn, "eval") << "log-likelihood context cut by " << drop << " tokens to fit the "
                                << window << "-token window";
      s.tokens.erase(s.tokens.begin(), s.tokens.begin() + drop);
      s.context -= drop;
    }
    scored[i] = std::move(s);
  }

  // Requests by shared context, in first-seen order.
  std::map<Ids, size_t> group_of;
  std::vector<std::vector<size_t>> groups;
  for (size_t i = 0; i < scored.size(); ++i) {
    auto [it, added] = group_of.emplace(context_of(scored[i]), groups.size());
    if (added) groups.emplace_back();
    groups[it->second].push_back(i);
  }

  std::vector<LoglikelihoodResult> out(requests.size());
  std::optional<quant::ScopedMode> mode;
  if (packed) mode.emplace(*packed, spec.qspec.verify_mode);
  at::NoGradGuard no_grad;
  const at::ScalarType dtype = model->named_parameters().front().second.scalar_type();
  const nn::ModelConfig& config = model->config();
  const size_t max_batch = static_cast<size_t>(options.max_batch);

  for (size_t g0 = 0; g0 < groups.size(); g0 += max_batch) {
    const size_t g1 = std::min(groups.size(), g0 + max_batch);
    const int64_t G = static_cast<int64_t>(g1 - g0);
    // Prefill each shared context once.
    int64_t longest_context = 0;
    for (size_t g = g0; g < g1; ++g) {
      longest_context = std::max<int64_t>(longest_context, scored[groups[g].front()].context);
    }
    at::Tensor ids = at::zeros({G, longest_context}, at::kLong);
    at::Tensor lengths = at::empty({G}, at::kLong);
    for (int64_t g = 0; g < G; ++g) {
      const Scored& s = scored[groups[g0 + g].front()];
      for (size_t t = 0; t < s.context; ++t) ids[g][t] = s.tokens[t];
      lengths[g] = static_cast<int64_t>(s.context);
    }
    nn::KVCache cache(config, G, longest_context, at::TensorOptions().dtype(dtype),
                      model->groups().tp_size());
    nn::ForwardOptions fwd;
    fwd.cache = &cache;
    fwd.lengths = lengths;
    fwd.last_logits_only = true;
    fwd.batch_invariant = batch_invariant();
    const at::Tensor first =
        at::log_softmax(model->forward(ids, fwd).logits.select(1, 0).to(at::kFloat), -1);

    // Each request's first continuation token comes from its context's
    // last logits; the rest from a forward of the continuation.
    std::vector<size_t> rows;        // requests with more than one continuation token
    std::vector<int64_t> row_group;  // their prefill row
    for (int64_t g = 0; g < G; ++g) {
      const at::Tensor lp = first[g];
      const int64_t best = lp.argmax().item<int64_t>();
      for (size_t i : groups[g0 + g]) {
        const Scored& s = scored[i];
        const int64_t t = s.tokens[s.context];
        out[i].logprob = lp[t].item<double>();
        out[i].is_greedy = best == t;
        if (s.tokens.size() > s.context + 1) {
          rows.push_back(i);
          row_group.push_back(g);
        }
      }
    }
    for (size_t r0 = 0; r0 < rows.size(); r0 += max_batch) {
      const size_t r1 = std::min(rows.size(), r0 + max_batch);
      const int64_t R = static_cast<int64_t>(r1 - r0);
      at::Tensor index = at::tensor(
          std::vector<int64_t>(row_group.begin() + r0, row_group.begin() + r1), at::kLong);
      // Feed continuation tokens 0..L-2; position j predicts token j+1.
      int64_t longest_rest = 0;
      for (size_t k = r0; k < r1; ++k) {
        const Scored& s = scored[rows[k]];
        longest_rest = std::max<int64_t>(longest_rest, s.tokens.size() - s.context - 1);
      }
      // Every row appends the padded width, so the copy holds the longest
      // context plus the longest rest.
      nn::KVCache copy(config, R, longest_context + longest_rest, at::TensorOptions().dtype(dtype),
                       model->groups().tp_size());
      for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
        copy.key(l).narrow(2, 0, longest_context).copy_(cache.key(l).index_select(0, index));
        copy.value(l).narrow(2, 0, longest_context).copy_(cache.value(l).index_select(0, index));
      }
      copy.set_lengths(cache.lengths().index_select(0, index));
      at::Tensor cont = at::zeros({R, longest_rest}, at::kLong);
      at::Tensor cont_lengths = at::empty({R}, at::kLong);
      for (int64_t k = 0; k < R; ++k) {
        const Scored& s = scored[rows[r0 + k]];
        const int64_t n = static_cast<int64_t>(s.tokens.size() - s.context - 1);
        for (int64_t j = 0; j < n; ++j) cont[k][j] = s.tokens[s.context + j];
        cont_lengths[k] = n;
      }
      nn::ForwardOptions step;
      step.cache = &copy;
      step.lengths = cont_lengths;
      step.batch_invariant = batch_invariant();
      const at::Tensor lp = at::log_softmax(model->forward(cont, step).logits.to(at::kFloat), -1);
      const at::Tensor best = lp.argmax(-1);
      for (int64_t k = 0; k < R; ++k) {
        const size_t i = rows[r0 + k];
        const Scored& s = scored[i];
        const int64_t n = static_cast<int64_t>(s.tokens.size() - s.context - 1);
        const at::Tensor targets =
            at::tensor(Ids(s.tokens.begin() + s.context + 1, s.tokens.end()), at::kLong);
        const at::Tensor picked = lp[k].narrow(0, 0, n).gather(1, targets.view({n, 1}));
        out[i].logprob += picked.to(at::kDouble).sum().item<double>();
        out[i].is_greedy =
            out[i].is_greedy && best[k].narrow(0, 0, n).eq(targets).all().item<bool>();
      }
    }
  }
  return out;
}

ModelBackend::ModelBackend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ModelBackend::~ModelBackend() = default;

// Packs, sets up decoding and stop tokens and resolves the chat mode.
void ModelBackend::Impl::setup(const std::string& source) {
  Impl& impl = *this;
  const ModelBackendOptions& o = impl.options;
  TESSERA_CHECK(o.max_batch > 0, InvalidArgument, "ModelBackend: max_batch must be positive");
  TESSERA_CHECK(o.chunk_tokens > 0, InvalidArgument, "ModelBackend: chunk_tokens must be positive");
  TESSERA_CHECK(o.max_length >= 0, InvalidArgument,
                "ModelBackend: max_length must not be negative");
  const nn::ModelConfig& config = impl.model->config();
  impl.max_length = o.max_length > 0 ? std::min(o.max_length, config.max_position_embeddings)
                                     : config.max_position_embeddings;

  specdec::parse_decoding(o.decoding, &impl.spec);
  if (o.decoding != "fp") {
    quant::QuantConfig qc;
    qc.group_size = o.group_size;
    impl.packed = quant::QuantizedModel::pack(*impl.model, qc);
    impl.model->set_linear_override(impl.packed);
  }

  switch (o.chat_template) {
    case ChatTemplateMode::kAuto:
      impl.chat = !impl.chat_template.empty();
      break;
    case ChatTemplateMode::kOn:
      TESSERA_CHECK(!impl.chat_template.empty(), InvalidArgument, source,
                    ": chat template requested but the model has none");
      impl.chat = true;
      break;
    case ChatTemplateMode::kOff:
      impl.chat = false;
      break;
  }
  if (impl.chat) {
    // Fails early (InvalidArgument) for templates other than ChatML.
    (void)nn::format_chat(impl.chat_template, {{"user", "x"}});
  }

  auto add_stop = [&](int64_t id) {
    if (id >= 0 && !impl.is_stop_token(id)) impl.stop_tokens.push_back(id);
  };
  if (impl.tokenizer.eos_id()) add_stop(*impl.tokenizer.eos_id());
  for (int64_t id : config.eos_token_ids) add_stop(id);
  if (impl.chat) {
    try {
      add_stop(impl.tokenizer.token_to_id("<|im_end|>"));
    } catch (const NotFound&) {
    }
  }

  std::ostringstream d;
  d << source << ", decoding " << o.decoding << ", chat template " << (impl.chat ? "on" : "off")
    << (impl.add_bos ? ", BOS" : "") << (impl.batch_invariant() ? ", batch-invariant" : "");
  if (!o.adapter_path.empty()) d << ", adapter " << o.adapter_path;
  impl.description = d.str();
  TESSERA_LOG(Info, "eval") << "model backend: " << impl.description;
}

std::unique_ptr<ModelBackend> ModelBackend::create(const ModelBackendOptions& options) {
  return translate_errors(
      "ModelBackend::create",
      [&] {
        TESSERA_CHECK(!options.model_path.empty(), InvalidArgument, "ModelBackend: no model_path");
        TESSERA_CHECK(fs::exists(options.model_path), NotFound, "model '", options.model_path,
                      "' does not exist");
        std::unique_ptr<Impl> impl;
        if (fs::is_directory(options.model_path)) {
          auto model = std::make_unique<nn::Transformer>(nn::load_hf_model(options.model_path));
          const std::string tok_path =
              options.tokenizer_path.empty()
                  ? (fs::path(options.model_path) / "tokenizer.json").string()
                  : options.tokenizer_path;
          impl = std::make_unique<Impl>(std::move(model),
                                        nn::Tokenizer::from_tokenizer_json(tok_path));
          detail::read_tokenizer_config(fs::path(tok_path).parent_path().string(),
                                        &impl->chat_template, &impl->add_bos);
        } else {
          nn::LoadedModel loaded = nn::load_gguf_model(options.model_path);
          impl = std::make_unique<Impl>(std::move(loaded.model), std::move(loaded.tokenizer));
          impl->chat_template = std::move(loaded.chat_template);
          impl->add_bos = detail::gguf_add_bos(options.model_path);
        }
        impl->options = options;
        if (!options.adapter_path.empty()) {
          impl->model->set_adapter(lora::load_adapter(options.adapter_path, *impl->model));
        }
        impl->setup(options.model_path);
        return std::unique_ptr<ModelBackend>(new ModelBackend(std::move(impl)));
      },
      ErrorCode::kInvalidArgument);
}

std::unique_ptr<ModelBackend> ModelBackend::from_model(std::unique_ptr<nn::Transformer> model,
                                                       nn::Tokenizer tokenizer,
                                                       std::string chat_template, bool add_bos,
                                                       const ModelBackendOptions& options) {
  TESSERA_CHECK(model != nullptr, InvalidArgument, "ModelBackend::from_model: no model");
  return translate_errors(
      "ModelBackend::from_model",
      [&] {
        auto impl = std::make_unique<Impl>(std::move(model), std::move(tokenizer));
        impl->options = options;
        impl->chat_template = std::move(chat_template);
        impl->add_bos = add_bos;
        impl->setup("<in-memory model>");
        return std::unique_ptr<ModelBackend>(new ModelBackend(std::move(impl)));
      },
      ErrorCode::kInvalidArgument);
}

std::vector<std::string> ModelBackend::generate(const std::vector<GenerateRequest>& requests) {
  return translate_errors("ModelBackend::generate", [&] { return impl_->generate(requests); });
}

std::vector<LoglikelihoodResult> ModelBackend::loglikelihood(
    const std::vector<LoglikelihoodRequest>& requests) {
  return translate_errors("ModelBackend::loglikelihood",
                          [&] { return impl_->loglikelihood(requests); });
}

bool ModelBackend::uses_chat_template() const { return impl_->chat; }

std::vector<int64_t> ModelBackend::prompt_tokens(const GenerateRequest& request) const {
  return impl_->prompt_ids(request, request.max_gen_toks);
}

std::string ModelBackend::describe() const { return impl_->description; }
const nn::Tokenizer& ModelBackend::tokenizer() const { return impl_->tokenizer; }
nn::Transformer& ModelBackend::model() { return *impl_->model; }

}  // namespace tessera::eval
