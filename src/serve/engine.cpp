// The serving engine's public API: options, model loading, submitting and
// cancelling requests, adapters, statistics. The engine thread lives in
// engine_loop.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "engine_impl.h"
#include "hash.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/vlm.h"
#include "tessera/tokenizer/chat.h"

namespace fs = std::filesystem;

namespace tessera::serve {

namespace {

constexpr const char* kLog = "serve";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// vLLM's bucket bounds for the latency histograms.
const std::vector<double> kTtftBuckets = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                          0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                          20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
const std::vector<double> kItlBuckets = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                         0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
const std::vector<double> kRequestBuckets = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,    2.5,
                                             5.0,  10.0,  15.0,  20.0,  30.0,  40.0,   50.0,
                                             60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

// The "chat_template" of a Hugging Face folder's tokenizer_config.json, or "".
std::string folder_chat_template(const fs::path& dir) {
  const fs::path file = dir / "tokenizer_config.json";
  if (!fs::exists(file)) return "";
  std::ifstream in(file);
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::exception& e) {
    TESSERA_THROW(InvalidArgument, file.string(), ": malformed JSON: ", e.what());
  }
  auto it = j.find("chat_template");
  return it != j.end() && it->is_string() ? it->get<std::string>() : "";
}

// Hex digest of the images' sizes and pixels (FNV-1a 64, then mixed): the
// prefix-cache namespace of a request with images.
std::string image_digest(const std::vector<nn::Image>& images) {
  uint64_t h = 0xcbf29ce484222325ULL;
  auto add = [&h](uint8_t byte) {
    h ^= byte;
    h *= 0x100000001b3ULL;
  };
  for (const nn::Image& img : images) {
    for (int64_t v : {img.height, img.width}) {
      for (int k = 0; k < 8; ++k) add(static_cast<uint8_t>(v >> (8 * k)));
    }
    for (uint8_t b : img.pixels) add(b);
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(mix64(h)));
  return buf;
}

}  // namespace

// ---------------------------------------------------------------------------
// RequestHandle

bool RequestHandle::wait(std::chrono::milliseconds timeout) const {
  if (!state_) return true;
  std::unique_lock<std::mutex> lock(state_->mu);
  return state_->cv.wait_for(lock, timeout, [&] { return state_->finished; });
}

bool RequestHandle::finished() const {
  if (!state_) return true;
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->finished;
}

// ---------------------------------------------------------------------------
// EngineOptions

EngineOptions EngineOptions::from_json(const std::string& json_text, const std::string& source) {
  ConfigObject cfg = ConfigObject::parse(json_text, source);
  EngineOptions o;
  o.model = cfg.get_string("model", o.model);
  o.tokenizer = cfg.get_string("tokenizer", o.tokenizer);
  o.model_name = cfg.get_string("model_name", o.model_name);
  o.quantization = cfg.get_string("quantization", o.quantization);
  o.block_size = cfg.get_int("block_size", o.block_size);
  o.num_blocks = cfg.get_int("num_blocks", o.num_blocks);
  o.kv_memory_bytes = cfg.get_int("kv_memory_bytes", o.kv_memory_bytes);
  o.enable_prefix_caching = cfg.get_bool("enable_prefix_caching", o.enable_prefix_caching);
  o.max_num_seqs = cfg.get_int("max_num_seqs", o.max_num_seqs);
  o.max_num_batched_tokens = cfg.get_int("max_num_batched_tokens", o.max_num_batched_tokens);
  o.enable_chunked_prefill = cfg.get_bool("enable_chunked_prefill", o.enable_chunked_prefill);
  o.priority_aging_steps = cfg.get_int("priority_aging_steps", o.priority_aging_steps);
  o.max_model_len = cfg.get_int("max_model_len", o.max_model_len);
  if (cfg.has("adapters")) {
    ConfigObject a = cfg.get_object("adapters");
    for (const std::string& name : a.keys()) o.adapters[name] = a.get_string(name);
  }
  o.max_loaded_adapters = cfg.get_int("max_loaded_adapters", o.max_loaded_adapters);
  o.max_images_per_request = cfg.get_int("max_images_per_request", o.max_images_per_request);
  o.num_threads = static_cast<int>(cfg.get_int("num_threads", o.num_threads));
  o.chat_template = cfg.get_string("chat_template", o.chat_template);
  o.qspec_gamma = cfg.get_int("qspec_gamma", o.qspec_gamma);
  const int64_t seed = cfg.get_int("seed", 0);
  TESSERA_CHECK(seed >= 0, InvalidArgument, cfg.where(), ": seed must be non-negative, got ", seed);
  o.seed = static_cast<uint64_t>(seed);
  o.max_logprobs = cfg.get_int("max_logprobs", o.max_logprobs);
  cfg.check_no_unknown_keys();
  return o;
}

// ---------------------------------------------------------------------------
// Loading

// A vision-language folder: config.json's model_type names a VLM layout.
static bool is_vlm_folder(const fs::path& dir) {
  std::ifstream in(dir / "config.json");
  if (!in) return false;  // load_hf_model names the missing file
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("model_type") || !j["model_type"].is_string()) return false;
  const std::string type = j["model_type"].get<std::string>();
  return type == "idefics3" || type == "smolvlm" || type == "llava";
}

void Engine::Impl::load(const EngineOptions& o) {
  options = o;
  TESSERA_CHECK(!o.model.empty(), InvalidArgument,
                "EngineOptions.model is empty (a model folder or GGUF file)");
  TESSERA_CHECK(o.quantization == "fp" || o.quantization == "w4a16" || o.quantization == "qspec",
                InvalidArgument, "EngineOptions.quantization '", o.quantization,
                "' (expected fp, w4a16 or qspec)");
  TESSERA_CHECK(o.block_size >= 1, InvalidArgument, "EngineOptions.block_size must be >= 1, got ",
                o.block_size);
  TESSERA_CHECK(o.num_blocks >= 0 && o.kv_memory_bytes >= 0, InvalidArgument,
                "EngineOptions.num_blocks and kv_memory_bytes must be >= 0");
  TESSERA_CHECK(o.max_model_len >= 0, InvalidArgument, "EngineOptions.max_model_len must be >= 0");
  TESSERA_CHECK(o.qspec_gamma >= 1 && o.qspec_gamma <= 16, InvalidArgument,
                "EngineOptions.qspec_gamma must be in [1, 16], got ", o.qspec_gamma);
  TESSERA_CHECK(o.max_logprobs >= 0, InvalidArgument, "EngineOptions.max_logprobs must be >= 0");
  TESSERA_CHECK(o.num_threads >= 0, InvalidArgument, "EngineOptions.num_threads must be >= 0");
  TESSERA_CHECK(o.max_images_per_request >= 0, InvalidArgument,
                "EngineOptions.max_images_per_request must be >= 0");

  if (o.tensor_parallel && o.tensor_parallel->size() > 1) {
    tp = o.tensor_parallel;
    TESSERA_CHECK(o.quantization == "fp", InvalidArgument,
                  "tensor-parallel serving runs float weights (quantization fp), not '",
                  o.quantization, "'");
    TESSERA_CHECK(o.adapters.empty(), InvalidArgument,
                  "tensor-parallel serving does not serve adapters (", o.adapters.size(),
                  " given)");
  }
  const nn::ParallelGroups groups{tp, nullptr};

  const fs::path path(o.model);
  TESSERA_CHECK(fs::exists(path), NotFound, "model '", o.model, "' does not exist");
  at::NoGradGuard no_grad;
  if (fs::is_directory(path) && is_vlm_folder(path)) {
    TESSERA_CHECK(!tp, InvalidArgument, "model folder '", o.model,
                  "' is a vision-language model: tensor-parallel serving runs text models");
    TESSERA_CHECK(o.tokenizer.empty(), InvalidArgument, "model folder '", o.model,
                  "' is a vision-language model: its tokenizer.json is used, not "
                  "EngineOptions.tokenizer");
    vlm = std::make_unique<nn::LoadedVlm>(nn::load_vlm_folder(o.model));
    model = &vlm->model->language_model();
    tokenizer = vlm->tokenizer;
  } else if (fs::is_directory(path)) {
    owned_model = std::make_unique<nn::Transformer>(nn::load_hf_model(o.model, groups));
    model = owned_model.get();
    const std::string tok = o.tokenizer.empty() ? (path / "tokenizer.json").string() : o.tokenizer;
    TESSERA_CHECK(fs::exists(tok), NotFound, "model folder '", o.model,
                  "' has no tokenizer.json; set EngineOptions.tokenizer");
    tokenizer = nn::Tokenizer::from_tokenizer_json(tok);
    chat_template = folder_chat_template(path);
  } else if (ends_with(o.model, ".gguf")) {
    nn::LoadedModel loaded = nn::load_gguf_model(o.model, groups);
    owned_model = std::move(loaded.model);
    model = owned_model.get();
    tokenizer = std::move(loaded.tokenizer);
    chat_template = std::move(loaded.chat_template);
  } else if (ends_with(o.model, ".safetensors")) {
    // A packed model written by quant::QuantizedModel::save.
    TESSERA_CHECK(!tp, InvalidArgument, "packed model '", o.model,
                  "': tensor-parallel serving runs float weights (a folder or GGUF file)");
    quant::QuantizedModel::Loaded loaded = quant::QuantizedModel::load(o.model);
    owned_model = std::make_unique<nn::Transformer>(std::move(loaded.model));
    model = owned_model.get();
    packed = loaded.packed;
    TESSERA_CHECK(!o.tokenizer.empty(), InvalidArgument, "packed model '", o.model,
                  "' needs EngineOptions.tokenizer (a tokenizer.json)");
    tokenizer = nn::Tokenizer::from_tokenizer_json(o.tokenizer);
  } else {
    TESSERA_THROW(
        InvalidArgument, "model '", o.model,
        "' is neither a Hugging Face folder, a .gguf file nor a packed .safetensors file");
  }
  if (!o.chat_template.empty()) chat_template = o.chat_template;
  const nn::ModelConfig& c = model->config();
  TESSERA_CHECK(
      model->groups().ep_size() == 1 && model->groups().tp_size() == (tp ? tp->size() : 1),
      InvalidArgument, "the engine's model must span EngineOptions::tensor_parallel");

  if (o.quantization == "fp") {
    model->set_linear_override(nullptr);
    packed.reset();
  } else {
    if (!packed) packed = quant::QuantizedModel::pack(*model);
    packed->set_mode(quant::Mode::kW4A16);
    model->set_linear_override(packed);
    qspec = o.quantization == "qspec";
  }

  name = o.model_name;
  if (name.empty()) {
    fs::path p = path;
    if (!p.has_filename()) p = p.parent_path();
    name = fs::is_directory(p) ? p.filename().string() : p.stem().string();
  }
  vocab = c.vocab_size;
  max_len = o.max_model_len > 0 ? o.max_model_len : c.max_position_embeddings;
  for (int64_t e : c.eos_token_ids) {
    if (e >= 0 && e < vocab) eos_ids.push_back(e);
  }
  if (auto e = tokenizer->eos_id();
      e && *e < vocab && std::find(eos_ids.begin(), eos_ids.end(), *e) == eos_ids.end()) {
    eos_ids.push_back(*e);
  }
  if (vlm) {
    // <end_of_utterance> ends an Idefics3 answer.
    for (int64_t e : vlm->stop_tokens()) {
      if (e >= 0 && e < vocab && std::find(eos_ids.begin(), eos_ids.end(), e) == eos_ids.end())
        eos_ids.push_back(e);
    }
  }

  // The KV pool: the scheduler's blocks, then QSPEC's scratch blocks.
  const int tp_size = tp ? tp->size() : 1;
  const int64_t per_block = nn::PagedKVCache::bytes_per_block(c, o.block_size, tp_size);
  manager_blocks =
      o.num_blocks > 0
          ? o.num_blocks
          : std::max<int64_t>(
                1, (o.kv_memory_bytes > 0 ? o.kv_memory_bytes : int64_t{512} << 20) / per_block);
  const int64_t scratch =
      qspec ? o.max_num_seqs * ((o.qspec_gamma + o.block_size - 1) / o.block_size) : 0;
  TESSERA_CHECK(manager_blocks + scratch <= std::numeric_limits<int32_t>::max(), InvalidArgument,
                "EngineOptions: ", manager_blocks, " KV blocks do not fit in a block id");
  cache = std::make_unique<nn::PagedKVCache>(c, manager_blocks + scratch, o.block_size, tp_size);
  for (int64_t b = manager_blocks + scratch - 1; b >= manager_blocks; --b) {
    free_scratch.push_back(static_cast<int32_t>(b));
  }

  SchedulerOptions so;
  so.max_num_seqs = o.max_num_seqs;
  so.max_num_batched_tokens = o.max_num_batched_tokens;
  so.enable_chunked_prefill = o.enable_chunked_prefill;
  so.priority_aging_steps = o.priority_aging_steps;
  so.block_manager.num_blocks = manager_blocks;
  so.block_manager.block_size = o.block_size;
  so.block_manager.enable_prefix_caching = o.enable_prefix_caching;
  scheduler = std::make_unique<Scheduler>(so);

  adapters = std::make_unique<detail::AdapterRegistry>(*model, o.max_loaded_adapters);
  for (const auto& [adapter_name, folder] : o.adapters) adapters->load(adapter_name, folder);
  seed_source.seed(o.seed);

  const MetricLabels labels = {{"model_name", name}};
  running_gauge = &metrics.gauge("vllm:num_requests_running",
                                 "Number of requests in model execution batches.", labels);
  waiting_gauge = &metrics.gauge("vllm:num_requests_waiting",
                                 "Number of requests waiting to be processed.", labels);
  kv_usage_gauge = &metrics.gauge("vllm:kv_cache_usage_perc",
                                  "KV-cache usage. 1 means 100 percent usage.", labels);
  prefix_queries =
      &metrics.counter("vllm:prefix_cache_queries",
                       "Prefix cache queries, in terms of number of queried tokens.", labels);
  prefix_hits = &metrics.counter("vllm:prefix_cache_hits",
                                 "Prefix cache hits, in terms of number of cached tokens.", labels);
  prompt_tokens_total =
      &metrics.counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", labels);
  generation_tokens_total = &metrics.counter("vllm:generation_tokens_total",
                                             "Number of generation tokens processed.", labels);
  ttft = &metrics.histogram("vllm:time_to_first_token_seconds",
                            "Histogram of time to first token in seconds.", kTtftBuckets, labels);
  itl = &metrics.histogram("vllm:inter_token_latency_seconds",
                           "Histogram of inter-token latency in seconds.", kItlBuckets, labels);
  e2e = &metrics.histogram("vllm:e2e_request_latency_seconds",
                           "Histogram of e2e request latency in seconds.", kRequestBuckets, labels);
  queue_time = &metrics.histogram("vllm:request_queue_time_seconds",
                                  "Histogram of time spent in WAITING phase for request.",
                                  kRequestBuckets, labels);
  for (FinishReason r : {FinishReason::kStop, FinishReason::kLength, FinishReason::kAbort})
    success(r);
  TESSERA_LOG(Info, kLog) << "engine '" << name << "': " << c.summary() << ", " << o.quantization
                          << (tp ? ", tp " + std::to_string(tp_size) : std::string()) << ", "
                          << manager_blocks << " KV blocks of " << o.block_size << " ("
                          << (manager_blocks * per_block >> 20) << " MiB), max_model_len "
                          << max_len;
}

Counter& Engine::Impl::success(FinishReason reason) {
  return metrics.counter("vllm:request_success_total", "Count of successfully processed requests.",
                         {{"model_name", name}, {"finished_reason", finish_reason_name(reason)}});
}

std::string Engine::Impl::token_bytes(int64_t token) const {
  if (token < 0 || token >= tokenizer->vocab_size()) return "";
  return tokenizer->decode({static_cast<int32_t>(token)}, /*skip_special=*/true);
}

void Engine::Impl::prepare_images(detail::RequestState& r, const std::string& prompt_text) {
  const std::vector<nn::Image>& images = r.request.images;
  TESSERA_CHECK(vlm, InvalidArgument, "request: model '", name,
                "' is not a vision-language model and takes no images");
  TESSERA_CHECK(static_cast<int64_t>(images.size()) <= options.max_images_per_request,
                InvalidArgument, "request: ", images.size(), " images; at most ",
                options.max_images_per_request, " per request (max_images_per_request)");
  TESSERA_CHECK(r.request.prompt_tokens.empty(), InvalidArgument,
                "request: images need prompt_text with one <image> marker per image, not "
                "prompt_tokens");
  const nn::VlmConfig& c = vlm->model->config();
  std::vector<nn::ProcessedImage> processed;
  processed.reserve(images.size());
  for (size_t i = 0; i < images.size(); ++i) {
    try {
      processed.push_back(nn::preprocess_image(images[i], vlm->processor));
    } catch (const Error& e) {
      TESSERA_THROW(InvalidArgument, "request: image ", i, ": ", e.message());
    }
  }
  // InvalidArgument naming both counts when the markers do not match.
  const std::string text = nn::expand_image_markers(prompt_text, c, processed);
  r.prompt = encode(text);
  for (size_t p = 0; p < r.prompt.size(); ++p) {
    if (r.prompt[p] == c.image_token_id) r.image_positions.push_back(static_cast<int64_t>(p));
  }
  std::vector<at::Tensor> pixels;
  for (const nn::ProcessedImage& img : processed) pixels.push_back(img.pixel_values);
  {
    // The vision encoder and connector only (the engine thread runs the
    // language model meanwhile), over the request's own images in one
    // batch as nn::LoadedVlm::prepare stacks them: an image's tokens do not
    // depend on what else is submitted.
    std::lock_guard<std::mutex> lock(vision_mu);
    at::NoGradGuard no_grad;
    r.image_embeds = vlm->model->image_features(at::cat(pixels, 0))
                         .reshape({-1, c.text.hidden_size})
                         .contiguous();
  }
  TESSERA_CHECK(static_cast<int64_t>(r.image_positions.size()) == r.image_embeds.size(0),
                InvalidArgument, "request: the prompt holds ", r.image_positions.size(),
                " image tokens (id ", c.image_token_id, ") but its ", images.size(),
                " image(s) give ", r.image_embeds.size(0),
                " (is there an <image> token in the text itself?)");
}

std::vector<int64_t> Engine::Impl::encode(const std::string& text) const {
  std::vector<int32_t> ids = tokenizer->encode(text, /*parse_special=*/true);
  return std::vector<int64_t>(ids.begin(), ids.end());
}

const JsonTokenMasker& Engine::Impl::json() {
  std::call_once(json_once, [&] {
    std::vector<std::string> vocab_bytes(vocab);
    for (int64_t i = 0; i < vocab; ++i) {
      if (i < tokenizer->vocab_size() && !tokenizer->is_special(static_cast<int32_t>(i))) {
        vocab_bytes[i] = tokenizer->decode({static_cast<int32_t>(i)});
      }
    }
    json_masker = std::make_unique<JsonTokenMasker>(vocab_bytes, eos_ids);
  });
  return *json_masker;
}

// ---------------------------------------------------------------------------
// Engine

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::unique_ptr<Engine> Engine::create(const EngineOptions& options) {
  TESSERA_CHECK(!options.tensor_parallel || options.tensor_parallel->rank() == 0, InvalidArgument,
                "Engine::create on tensor-parallel rank ", options.tensor_parallel->rank(),
                ": rank 0 creates the engine, the others call run_tensor_parallel_rank");
  auto impl = std::make_unique<Impl>();
  translate_errors(
      "Engine::create", [&] { impl->load(options); }, ErrorCode::kInvalidArgument);
  Impl* raw = impl.get();
  const int threads = options.num_threads > 0 ? options.num_threads : at::get_num_threads();
  raw->options.num_threads = threads;
  std::unique_ptr<Engine> engine(new Engine(std::move(impl)));
  raw->thread = std::thread([raw] { raw->run(); });
  return engine;
}

void Engine::run_tensor_parallel_rank(const EngineOptions& options) {
  TESSERA_CHECK(options.tensor_parallel && options.tensor_parallel->size() > 1 &&
                    options.tensor_parallel->rank() > 0,
                InvalidArgument,
                "Engine::run_tensor_parallel_rank: EngineOptions::tensor_parallel must be a group "
                "of two or more ranks, and this rank not its rank 0");
  Impl impl;
  translate_errors(
      "Engine::run_tensor_parallel_rank", [&] { impl.load(options); }, ErrorCode::kInvalidArgument);
  at::init_num_threads();
  at::set_num_threads(options.num_threads > 0 ? options.num_threads : at::get_num_threads());
  at::NoGradGuard no_grad;
  while (true) {
    const detail::StepMessage message = detail::receive_step(*impl.tp);
    if (message.stop) return;
    try {
      detail::run_step(*impl.model, *impl.cache, message);
    } catch (const Error& e) {
      // Rank 0 meets the same error in the same place (the same checks on
      // the same batch) and fails the step's requests; carry on with it.
      if (e.code() == ErrorCode::kUnavailable || e.code() == ErrorCode::kDeadlineExceeded) throw;
      TESSERA_LOG(Warn, kLog) << "tensor-parallel step failed: " << e.what();
    }
  }
}

Engine::~Engine() {
  if (!impl_) return;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->accepting = false;
    impl_->stopping = true;
    for (const auto& [id, r] : impl_->requests) impl_->pending_cancels.push_back(id);
  }
  impl_->wake.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
}

RequestHandle Engine::submit(const GenerateRequest& request, TokenCallback callback) {
  Impl& m = *impl_;
  auto r = std::make_shared<detail::RequestState>();
  r->request = request;
  // The request's own copy: max_tokens 0 is resolved in place below.
  const SamplingParams& p = r->request.params;
  r->callback = std::move(callback);
  r->submitted = Clock::now();

  TESSERA_CHECK(request.prompt_tokens.empty() || request.prompt_text.empty(), InvalidArgument,
                "request: give prompt_tokens or prompt_text, not both");
  if (!request.images.empty()) {
    m.prepare_images(*r, request.prompt_text);
    r->request.images.clear();
  } else {
    r->prompt =
        request.prompt_tokens.empty() ? m.encode(request.prompt_text) : request.prompt_tokens;
    if (m.vlm) {
      const int64_t id = m.vlm->model->config().image_token_id;
      const auto placeholders = std::count(r->prompt.begin(), r->prompt.end(), id);
      TESSERA_CHECK(placeholders == 0, InvalidArgument, "request: the prompt holds ", placeholders,
                    " image token(s) (id ", id, ") but the request has no images");
    }
  }
  r->request.prompt_text.clear();
  TESSERA_CHECK(!r->prompt.empty(), InvalidArgument, "request: the prompt is empty");
  for (size_t i = 0; i < r->prompt.size(); ++i) {
    TESSERA_CHECK(r->prompt[i] >= 0 && r->prompt[i] < m.vocab, InvalidArgument,
                  "request: prompt token ", i, " is ", r->prompt[i],
                  ", outside the vocabulary [0, ", m.vocab, ")");
  }
  TESSERA_CHECK(p.max_tokens >= 0, InvalidArgument,
                "request: max_tokens must be >= 1 (or 0: the rest of the context), got ",
                p.max_tokens);
  const int64_t prompt_len = static_cast<int64_t>(r->prompt.size());
  if (p.max_tokens == 0) {
    TESSERA_CHECK(prompt_len < m.max_len, InvalidArgument, "request: the prompt's ", prompt_len,
                  " tokens leave no room for an answer within max_model_len ", m.max_len);
    r->request.params.max_tokens = m.max_len - prompt_len;
  }
  TESSERA_CHECK(prompt_len + p.max_tokens <= m.max_len, InvalidArgument, "request: the prompt's ",
                prompt_len, " tokens + max_tokens ", p.max_tokens, " = ", prompt_len + p.max_tokens,
                " exceed max_model_len ", m.max_len);
  TESSERA_CHECK(std::isfinite(p.temperature) && p.temperature >= 0, InvalidArgument,
                "request: temperature must be >= 0, got ", p.temperature);
  TESSERA_CHECK(std::isfinite(p.top_p) && p.top_p > 0 && p.top_p <= 1, InvalidArgument,
                "request: top_p must be in (0, 1], got ", p.top_p);
  TESSERA_CHECK(p.top_k >= -1, InvalidArgument, "request: top_k must be >= 0 (or -1: off), got ",
                p.top_k);
  TESSERA_CHECK(!p.logprobs || (*p.logprobs >= 0 && *p.logprobs <= m.options.max_logprobs),
                InvalidArgument, "request: logprobs must be in [0, ", m.options.max_logprobs,
                "], got ", p.logprobs ? *p.logprobs : 0);
  TESSERA_CHECK(p.n >= 1 && p.n <= m.options.max_num_seqs, InvalidArgument,
                "request: n must be in [1, ", m.options.max_num_seqs, "] (max_num_seqs), got ",
                p.n);
  TESSERA_CHECK(p.priority >= std::numeric_limits<int32_t>::min() &&
                    p.priority <= std::numeric_limits<int32_t>::max(),
                InvalidArgument, "request: priority ", p.priority, " does not fit in an int32");
  for (size_t i = 0; i < p.stop.size(); ++i) {
    TESSERA_CHECK(!p.stop[i].empty(), InvalidArgument, "request: stop string ", i, " is empty");
  }
  for (int64_t t : p.stop_token_ids) {
    TESSERA_CHECK(t >= 0 && t < m.vocab, InvalidArgument, "request: stop token id ", t,
                  " outside the vocabulary [0, ", m.vocab, ")");
  }
  if (!p.ignore_eos) r->stop_token_ids = m.eos_ids;
  for (int64_t t : p.stop_token_ids) {
    if (std::find(r->stop_token_ids.begin(), r->stop_token_ids.end(), t) ==
        r->stop_token_ids.end()) {
      r->stop_token_ids.push_back(t);
    }
  }
  r->sampling = {p.temperature, p.top_p, p.top_k < 0 ? 0 : p.top_k};
  if (p.json_object) m.json();  // built once, outside the engine lock
  if (!request.adapter.empty()) {
    auto acquired = m.adapters->acquire(request.adapter);
    r->adapter = acquired.adapter;
    r->salt = acquired.salt;
  }
  if (!request.cache_salt.empty()) r->salt += "|salt:" + request.cache_salt;
  if (!request.images.empty()) {
    // Blocks holding image tokens depend on the pixels, which the token
    // ids do not show: only requests with the same images share blocks.
    r->salt += "|images:" + image_digest(request.images);
  }
  r->handle = std::make_shared<RequestHandle::State>();

  std::lock_guard<std::mutex> lock(m.mu);
  TESSERA_CHECK(m.accepting, FailedPrecondition,
                "the engine is draining or shutting down; request refused");
  r->id = m.next_id++;
  r->seed = p.seed ? *p.seed : m.seed_source();
  if (request.echo && p.logprobs) {
    // Prompt log-probabilities need every prompt position computed: no
    // prefix-cache hits (a salt no other request has).
    r->salt += "|echo:" + std::to_string(r->id);
  }
  auto sample = std::make_unique<detail::SampleState>();
  sample->request = r.get();
  sample->index = 0;
  sample->rng = detail::SampleRng(detail::sample_seed(r->seed, 0));
  sample->stops = StopStringMatcher(p.stop);
  if (p.json_object) sample->json.emplace(JsonGrammarOptions{32, 16});
  Request sr;
  sr.prompt_token_ids = r->prompt;
  sr.max_new_tokens = p.max_tokens;
  sr.priority = static_cast<int32_t>(p.priority);
  sr.cache_salt = r->salt;
  sr.stop_token_ids = r->stop_token_ids;
  sample->seq = m.scheduler->add_request(std::move(sr));  // InvalidArgument: nothing queued
  m.by_seq[sample->seq] = sample.get();
  r->samples.push_back(std::move(sample));
  m.requests[r->id] = r;
  m.wake.notify_all();
  return RequestHandle(r->id, r->handle);
}

bool Engine::accepting() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->accepting;
}

void Engine::cancel(uint64_t request_id) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->requests.count(request_id) == 0) return;
    impl_->pending_cancels.push_back(request_id);
  }
  impl_->wake.notify_all();
}

bool Engine::drain(std::chrono::milliseconds deadline) {
  Impl& m = *impl_;
  std::unique_lock<std::mutex> lock(m.mu);
  m.accepting = false;
  const bool done = m.progress.wait_for(lock, deadline, [&] { return m.requests.empty(); });
  if (done) return true;
  for (const auto& [id, r] : m.requests) m.pending_cancels.push_back(id);
  m.wake.notify_all();
  m.progress.wait(lock, [&] { return m.requests.empty(); });
  return false;
}

void Engine::load_adapter(const std::string& name, const std::string& path) {
  TESSERA_CHECK(!impl_->tp, FailedPrecondition, "adapter '", name,
                "': tensor-parallel serving does not serve adapters");
  impl_->adapters->load(name, path);
}

void Engine::unload_adapter(const std::string& name) { impl_->adapters->unload(name); }

std::vector<std::string> Engine::adapters() const { return impl_->adapters->names(); }

const std::string& Engine::model_name() const { return impl_->name; }
int64_t Engine::max_model_len() const { return impl_->max_len; }
int64_t Engine::vocab_size() const { return impl_->vocab; }

std::string Engine::apply_chat_template(const std::vector<nn::ChatMessage>& messages) const {
  if (impl_->vlm) return apply_chat_template(messages, std::vector<int64_t>(messages.size(), 0));
  TESSERA_CHECK(!impl_->chat_template.empty(), InvalidArgument, "model '", impl_->name,
                "' has no chat template (set EngineOptions.chat_template)");
  return nn::format_chat(impl_->chat_template, messages);
}

std::string Engine::apply_chat_template(const std::vector<nn::ChatMessage>& messages,
                                        const std::vector<int64_t>& images_per_message) const {
  TESSERA_CHECK(images_per_message.size() == messages.size(), InvalidArgument,
                "apply_chat_template: ", images_per_message.size(), " image counts for ",
                messages.size(), " messages");
  const Impl& m = *impl_;
  if (!m.vlm) {
    for (int64_t n : images_per_message) {
      TESSERA_CHECK(n == 0, InvalidArgument, "model '", m.name,
                    "' is not a vision-language model and takes no images");
    }
    return apply_chat_template(messages);
  }
  std::vector<nn::VlmMessage> vm;
  for (size_t i = 0; i < messages.size(); ++i) {
    TESSERA_CHECK(images_per_message[i] >= 0, InvalidArgument,
                  "apply_chat_template: negative image count");
    vm.push_back({messages[i].role, messages[i].content, images_per_message[i]});
  }
  return nn::format_vlm_chat(m.vlm->model->config().layout, vm);
}

bool Engine::accepts_images() const { return impl_->vlm != nullptr; }
int64_t Engine::max_images_per_request() const { return impl_->options.max_images_per_request; }

std::vector<int64_t> Engine::tokenize(const std::string& text) const { return impl_->encode(text); }

std::string Engine::detokenize(const std::vector<int64_t>& tokens) const {
  std::string out;
  for (int64_t t : tokens) {
    TESSERA_CHECK(t >= 0 && t < impl_->vocab, InvalidArgument, "detokenize: token ", t,
                  " outside the vocabulary [0, ", impl_->vocab, ")");
    out += impl_->token_bytes(t);
  }
  return out;
}

EngineStats Engine::stats() const {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  const SchedulerStats s = m.scheduler->stats();
  EngineStats out;
  out.running = s.num_running;
  out.waiting = s.num_waiting;
  out.kv_cache_usage = s.kv_cache_usage;
  out.num_blocks = m.scheduler->block_manager().num_blocks();
  out.free_blocks = m.scheduler->block_manager().num_free_blocks();
  out.prefix_cache_queries = s.prefix_cache.queries;
  out.prefix_cache_hits = s.prefix_cache.hits;
  out.preemptions = s.num_preemptions_total;
  out.prompt_tokens = m.prompt_tokens;
  out.generation_tokens = m.generation_tokens;
  out.steps = m.steps;
  out.finished_requests = m.finished_requests;
  out.spec_drafted = m.spec_drafted;
  out.spec_accepted = m.spec_accepted;
  return out;
}

const MetricsRegistry& Engine::metrics() const { return impl_->metrics; }

}  // namespace tessera::serve
