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
//   --temperature T      0 = greedy (default)
//   --top-k K            keep the K most likely tokens (default 0: all)
//   --top-p P            nucleus sampling mass (default 1: off)
//   --seed S             sampling seed (default 0)
//   -h, --help           print the options and exit
//
// Exit codes: 0 success, 1 an error while loading or generating, 2 a bad
// command line (unknown option, missing or malformed value).
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"

int main(int argc, char** argv) {
  std::string model_path, tokenizer_path, system;
  std::vector<std::string> prompts;
  bool raw = false;
  tessera::nn::SamplingOptions sampling;
  sampling.max_new_tokens = 128;

  CLI::App app{"Generates text from a model file: a GGUF file or a Hugging Face folder.",
               "tessera-generate"};
  app.option_defaults()->always_capture_default();
  app.add_option("--model", model_path,
                 "a GGUF file, or a Hugging Face folder (config.json + safetensors)")
      ->required();
  app.add_option("--tokenizer", tokenizer_path,
                 "tokenizer.json (folders only; default: MODEL/tokenizer.json; GGUF files carry "
                 "their tokenizer)");
  app.add_option("--prompt", prompts, "the user message; repeat for one batch of several prompts")
      ->required()
      ->allow_extra_args(false);
  app.add_option("--system", system, "a system message (default: the template's own, if any)");
  app.add_flag("--raw", raw, "feed the prompt as is, without the chat template");
  app.add_option("--max-tokens", sampling.max_new_tokens, "new tokens per prompt");
  app.add_option("--temperature", sampling.temperature, "sampling temperature; 0 = greedy");
  app.add_option("--top-k", sampling.top_k, "keep the K most likely tokens; 0 = all");
  app.add_option("--top-p", sampling.top_p, "nucleus sampling mass; 1 = off");
  app.add_option("--seed", sampling.seed, "sampling seed");
  app.footer(
      "Examples:\n"
      "  tessera-generate --model SmolLM2-135M-Instruct.Q4_1.gguf --prompt \"What is 2+3?\"\n"
      "  tessera-generate --model hf_folder/ --prompt \"...\" --raw\n"
      "Exit codes: 0 success, 1 an error while loading or generating, 2 a bad command line.");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv)) return *code;

  try {
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
  } catch (const std::exception& e) {
    std::cerr << "tessera-generate: " << e.what() << "\n";
    return 1;
  }
}
