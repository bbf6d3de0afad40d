// tessera/eval/model_backend.h — the evaluation Backend that runs a model in this process.
//
//   tessera::eval::ModelBackendOptions o;
//   o.model_path = "SmolLM2-135M-Instruct.Q4_1.gguf";  // or a Hugging Face folder
//   o.decoding = "fp";                                 // or "w4a16", "qspec", ...
//   auto backend = tessera::eval::ModelBackend::create(o);
//   RunReport report = run_task(task, *backend, run_options);
//
// Generation: requests run in batches of up to `max_batch` prompts through
// nn::generate (fp) or specdec::generate (packed int4 weights: plain W4A16 /
// W4A8 / W4A4 decoding or QSPEC), greedily unless a request asks to sample.
// Each batch decodes in chunks of `chunk_tokens`, then twice that, four
// times, ... tokens; after each chunk the text of every sequence is decoded
// and cut before the first stop string, and sequences that stopped (a stop
// string, an end-of-turn token or max_gen_toks) leave the batch, so one long
// answer does not keep the others' rows busy. The next chunk re-reads
// prompt + text so far; with batch-invariant forwards this gives the same
// tokens as one long decode (ModelBackend tests check it).
//
// Log-likelihoods: as lm-eval, the context and the continuation are encoded
// together and the continuation's tokens are those past the context's own
// encoding (trailing spaces of the context move to the continuation first);
// the log-probability is the sum of log-softmax over those tokens, and
// is_greedy says whether each was the argmax. Requests that share a context
// (the choices of one question) prefill it once into the KV cache; the
// continuations then run against copies of that cache. A context longer than
// the model's window loses tokens from the left, as in lm-eval.
//
// Prompts: with the chat template (instruct models) a request's messages
// are rendered by the model's template (tokenizer/chat.h, ChatML) and
// generation opens the assistant's turn; log-likelihoods then score
// LoglikelihoodRequest::chat_continuation after it. Without it the plain
// `context` is used. BOS is prepended when the model file asks for it.
//
// Not thread-safe: one call at a time (the model runs one forward at a time).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/eval/request.h"
#include "tessera/nn/model.h"
#include "tessera/tokenizer/tokenizer.h"

namespace tessera::eval {

enum class ChatTemplateMode {
  kAuto,  // use the model's chat template when it has one
  kOn,    // always (InvalidArgument at create when the model has none)
  kOff,   // plain completion prompts
};
// "auto" | "on" | "off"; InvalidArgument otherwise.
ChatTemplateMode parse_chat_template_mode(const std::string& name);
const char* chat_template_mode_name(ChatTemplateMode mode);

struct ModelBackendOptions {
  // A GGUF file or a Hugging Face folder (config.json + safetensors).
  std::string model_path;
  // tokenizer.json for a Hugging Face folder (default: <folder>/tokenizer.json;
  // its tokenizer_config.json, when present, gives the chat template and
  // add_bos_token). GGUF files carry their own.
  std::string tokenizer_path;
  // "fp": the model's own weights. "w4a16" | "w4a8" | "w4a4": linear layers
  // packed to int4 (tessera::quant) and decoded plainly in that mode.
  // "qspec": packed, decoded by QSPEC (draft W4A4, verify W4A16). Packed
  // models score log-likelihoods in W4A16 (QSPEC's verify mode).
  std::string decoding = "fp";
  // Inputs per int4 scale for packed decodings (0: quant's choice).
  int64_t group_size = 0;
  // A LoRA / MoS adapter folder (lora::save_adapter's layout) applied on top
  // of the model (and of packed weights); empty for none.
  std::string adapter_path;
  ChatTemplateMode chat_template = ChatTemplateMode::kAuto;
  // Prompts per forward, for generation and for log-likelihood prefills.
  int64_t max_batch = 8;
  // Tokens decoded before the first stop-string check; each later chunk is
  // twice as long (see above). Larger values re-read long prompts less often.
  int64_t chunk_tokens = 64;
  // Forwards whose results do not depend on the batch (nn ForwardOptions::
  // batch_invariant): scores then do not move with max_batch or with which
  // documents share a batch, and greedy outputs equal those of a server
  // that decodes each request alone. fp32 CPU only; slower on long prompts.
  // Packed decodings are always batch-invariant.
  bool batch_invariant = true;
  // Context window in tokens (0: the model's max_position_embeddings).
  int64_t max_length = 0;
};

class ModelBackend final : public Backend {
 public:
  // Loads the model. NotFound for a missing file; InvalidArgument for an
  // unknown decoding, chat_template kOn without a template, a model the
  // loaders refuse; errors of lora::load_adapter for a bad adapter.
  static std::unique_ptr<ModelBackend> create(const ModelBackendOptions& options);

  // A model already in memory (its tokenizer and ChatML template, "" for
  // none); `options.model_path`, `tokenizer_path` and `adapter_path` are
  // ignored, `add_bos` says whether prompts start with the tokenizer's BOS.
  static std::unique_ptr<ModelBackend> from_model(std::unique_ptr<nn::Transformer> model,
                                                  nn::Tokenizer tokenizer,
                                                  std::string chat_template, bool add_bos,
                                                  const ModelBackendOptions& options);
  ~ModelBackend() override;

  std::vector<std::string> generate(const std::vector<GenerateRequest>& requests) override;
  std::vector<LoglikelihoodResult> loglikelihood(
      const std::vector<LoglikelihoodRequest>& requests) override;

  // Whether prompts go through the chat template (resolved from kAuto).
  bool uses_chat_template() const;
  // The token ids a generation request is prompted with (after the chat
  // template, BOS and left truncation), for tests and logs.
  std::vector<int64_t> prompt_tokens(const GenerateRequest& request) const;
  // One line for logs and result files: model, decoding, chat template, adapter.
  std::string describe() const;
  const nn::Tokenizer& tokenizer() const;
  nn::Transformer& model();

 private:
  struct Impl;
  explicit ModelBackend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera::eval
