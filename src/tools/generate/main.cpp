// tessera-generate: generate text from a model file.
//
//   tessera-generate --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt "What is 2+3?"
//   tessera-generate --model hf_folder/ --tokenizer hf_folder/tokenizer.json --prompt "..." --raw
//
// Options:
//   --model PATH         a GGUF file, or a Hugging Face folder (config.json + safetensors)
//   --tokenizer PATH     tokenizer.json (folders only; GGUF files carry their tokenizer)
//   --prompt TEXT        the user message (repeatable: one batch of several prompts)
//   --system TEXT        a system message (default: the template's own, if any)
//   --raw                feed the prompt as is, without the chat template
//   --max-tokens N       new tokens per prompt (default 128)
//   --temperature T      0 = greedy (default); with --top-k K and --top-p P
//   --seed S             sampling seed (default 0)
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"

namespace {

constexpr const char* kUsage =
    "usage: tessera-generate --model PATH [--tokenizer tokenizer.json] --prompt TEXT [--prompt TEXT ...]\n"
    "                        [--system TEXT] [--raw] [--max-tokens N] [--temperature T]\n"
    "                        [--top-k K] [--top-p P] [--seed S]";

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, tokenizer_path, system;
  std::vector<std::string> prompts;
  bool raw = false;
  tessera::nn::SamplingOptions sampling;
  sampling.max_new_tokens = 128;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      auto value = [&]() -> std::string {
        TESSERA_CHECK(i + 1 < argc, InvalidArgument, a, " needs a value\n", kUsage);
        return argv[++i];
      };
      if (a == "--model") model_path = value();
      else if (a == "--tokenizer") tokenizer_path = value();
      else if (a == "--prompt") prompts.push_back(value());
      else if (a == "--system") system = value();
      else if (a == "--raw") raw = true;
      else if (a == "--max-tokens") sampling.max_new_tokens = std::stoll(value());
      else if (a == "--temperature") sampling.temperature = std::stod(value());
      else if (a == "--top-k") sampling.top_k = std::stoll(value());
      else if (a == "--top-p") sampling.top_p = std::stod(value());
      else if (a == "--seed") sampling.seed = std::stoull(value());
      else if (a == "--help" || a == "-h") {
        std::cout << kUsage << "\n";
        return 0;
      } else {
        TESSERA_THROW(InvalidArgument, "unknown argument '", a, "'\n", kUsage);
      }
    }
    TESSERA_CHECK(!model_path.empty() && !prompts.empty(), InvalidArgument,
                  "--model and --prompt are required\n", kUsage);
    tessera::init_runtime();

    std::unique_ptr<tessera::nn::Transformer> model;
    std::optional<tessera::nn::Tokenizer> tokenizer;
    std::string chat_template;
    if (std::filesystem::is_directory(model_path)) {
      model = std::make_unique<tessera::nn::Transformer>(tessera::nn::load_hf_model(model_path));
      if (tokenizer_path.empty()) tokenizer_path = model_path + "/tokenizer.json";
      tokenizer = tessera::nn::Tokenizer::from_tokenizer_json(tokenizer_path);
    } else {
      auto loaded = tessera::nn::load_gguf_model(model_path);
      model = std::move(loaded.model);
      tokenizer = std::move(loaded.tokenizer);
      chat_template = std::move(loaded.chat_template);
    }
    std::vector<std::vector<int64_t>> batch;
    for (const auto& p : prompts) {
      std::string text = p;
      if (!raw) {
        std::vector<tessera::nn::ChatMessage> messages;
        if (!system.empty()) messages.push_back({"system", system});
        messages.push_back({"user", p});
        text = tessera::nn::format_chat(chat_template, messages);
      }
      auto ids = tokenizer->encode(text);
      batch.emplace_back(ids.begin(), ids.end());
    }
    if (auto eos = tokenizer->eos_id()) sampling.stop_tokens.push_back(*eos);
    for (auto id : model->config().eos_token_ids) sampling.stop_tokens.push_back(id);

    auto result = tessera::nn::generate(*model, batch, sampling);
    for (size_t i = 0; i < prompts.size(); ++i) {
      std::vector<int32_t> out;
      for (auto t : result.tokens[i]) out.push_back(static_cast<int32_t>(t));
      if (prompts.size() > 1) std::cout << "[" << i << "] ";
      std::cout << tokenizer->decode(out, /*skip_special=*/true) << "\n";
    }
    std::cerr << "tessera-generate: " << result.new_tokens << " tokens in "
              << result.prefill_seconds + result.decode_seconds << " s ("
              << result.new_tokens / std::max(result.decode_seconds + result.prefill_seconds, 1e-9)
              << " tokens/s)\n";
    return 0;
  } catch (const tessera::Error& e) {
    std::cerr << "tessera-generate: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "tessera-generate: " << e.what() << "\n" << kUsage << "\n";
    return 2;
  }
}
