#include "prompt_tokens.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "tessera/core/error.h"
#include "tessera/formats/gguf.h"

namespace tessera::eval::detail {

namespace fs = std::filesystem;

void read_tokenizer_config(const std::string& dir, std::string* chat_template, bool* add_bos) {
  chat_template->clear();
  *add_bos = false;
  const fs::path path = fs::path(dir) / "tokenizer_config.json";
  if (!fs::exists(path)) return;
  std::ifstream in(path);
  TESSERA_CHECK(in, NotFound, path.string(), ": cannot be opened");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    TESSERA_THROW(InvalidArgument, path.string(), ": not valid JSON: ", e.what());
  }
  if (j.contains("chat_template") && !j["chat_template"].is_null()) {
    TESSERA_CHECK(j["chat_template"].is_string(), InvalidArgument, path.string(),
                  ": chat_template: expected a string (lists of named templates are not "
                  "supported)");
    *chat_template = j["chat_template"].get<std::string>();
  }
  if (j.contains("add_bos_token") && j["add_bos_token"].is_boolean()) {
    *add_bos = j["add_bos_token"].get<bool>();
  }
}

bool gguf_add_bos(const std::string& gguf_path) {
  const nn::GgufFile file = nn::GgufFile::open(gguf_path);
  return file.has("tokenizer.ggml.add_bos_token") && file.get_bool("tokenizer.ggml.add_bos_token");
}

namespace {

// The tokenizer metadata of a GGUF file, read as formats/hf.cpp's
// read_gguf_model reads it, without touching the weights.
TokenizerFiles gguf_tokenizer(const std::string& path) {
  const nn::GgufFile file = nn::GgufFile::open(path);
  const std::string model = file.get_string("tokenizer.ggml.model");
  TESSERA_CHECK(model == "gpt2", InvalidArgument, path, ": tokenizer model '", model,
                "' is not supported (byte-level BPE, \"gpt2\", only)");
  nn::TokenizerSpec spec;
  spec.vocab = file.get_string_array("tokenizer.ggml.tokens");
  for (const std::string& merge : file.get_string_array("tokenizer.ggml.merges")) {
    const size_t space = merge.find(' ');
    TESSERA_CHECK(space != std::string::npos, DataLoss, path, ": malformed merge '", merge, "'");
    spec.merges.push_back({merge.substr(0, space), merge.substr(space + 1)});
  }
  if (file.has("tokenizer.ggml.token_type")) {
    const std::vector<int64_t> types = file.get_int_array("tokenizer.ggml.token_type");
    for (size_t i = 0; i < types.size() && i < spec.vocab.size(); ++i) {
      // llama.cpp token types: 3 = CONTROL, 4 = USER_DEFINED.
      if (types[i] == 3 || types[i] == 4) {
        nn::AddedToken added;
        added.content = spec.vocab[i];
        added.id = static_cast<int32_t>(i);
        added.special = types[i] == 3;
        spec.added.push_back(added);
      }
    }
  }
  spec.pre =
      file.has("tokenizer.ggml.pre")
          ? nn::Tokenizer::pre_tokenizer_from_gguf_name(file.get_string("tokenizer.ggml.pre"))
          : nn::PreTokenizerKind::kGpt2;
  spec.ignore_merges = spec.pre == nn::PreTokenizerKind::kLlama3;
  auto id = [&](const char* key) -> std::optional<int32_t> {
    if (!file.has(key)) return std::nullopt;
    return static_cast<int32_t>(file.get_int(key));
  };
  spec.bos_id = id("tokenizer.ggml.bos_token_id");
  spec.eos_id = id("tokenizer.ggml.eos_token_id");
  spec.pad_id = id("tokenizer.ggml.padding_token_id");
  spec.unk_id = id("tokenizer.ggml.unknown_token_id");
  TokenizerFiles out{nn::Tokenizer::from_spec(std::move(spec)), "", false};
  if (file.has("tokenizer.chat_template")) {
    out.chat_template = file.get_string("tokenizer.chat_template");
  }
  out.add_bos =
      file.has("tokenizer.ggml.add_bos_token") && file.get_bool("tokenizer.ggml.add_bos_token");
  return out;
}

}  // namespace

TokenizerFiles load_tokenizer_files(const std::string& path) {
  TESSERA_CHECK(fs::exists(path), NotFound, "tokenizer '", path, "' does not exist");
  if (fs::is_directory(path))
    return load_tokenizer_files((fs::path(path) / "tokenizer.json").string());
  if (fs::path(path).extension() == ".json") {
    TokenizerFiles out{nn::Tokenizer::from_tokenizer_json(path), "", false};
    read_tokenizer_config(fs::path(path).parent_path().string(), &out.chat_template, &out.add_bos);
    return out;
  }
  return gguf_tokenizer(path);
}

std::vector<nn::ChatMessage> to_chat(const std::vector<ChatMessage>& messages) {
  std::vector<nn::ChatMessage> out;
  out.reserve(messages.size());
  for (const ChatMessage& m : messages) out.push_back({chat_role_name(m.role), m.content});
  return out;
}

std::vector<int64_t> encode(const nn::Tokenizer& tokenizer, bool add_bos, const std::string& text) {
  const std::vector<int32_t> ids = tokenizer.encode(text, /*parse_special=*/true);
  std::vector<int64_t> out;
  out.reserve(ids.size() + 1);
  if (add_bos && tokenizer.bos_id()) out.push_back(*tokenizer.bos_id());
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

TextPair loglikelihood_text(const LoglikelihoodRequest& request, bool chat,
                            const std::string& chat_template) {
  TextPair p;
  p.context = chat ? nn::format_chat(chat_template, to_chat(request.messages)) : request.context;
  p.continuation = chat ? request.chat_continuation : request.continuation;
  const size_t keep = p.context.find_last_not_of(' ');
  const size_t spaces = p.context.size() - (keep == std::string::npos ? 0 : keep + 1);
  if (spaces > 0) {
    p.continuation = p.context.substr(p.context.size() - spaces) + p.continuation;
    p.context.resize(p.context.size() - spaces);
  }
  return p;
}

ScoredTokens encode_pair(const nn::Tokenizer& tokenizer, bool add_bos, const TextPair& pair,
                         size_t request) {
  ScoredTokens s;
  s.tokens = encode(tokenizer, add_bos, pair.context + pair.continuation);
  s.context = encode(tokenizer, add_bos, pair.context).size();
  if (s.context == 0) {
    const std::optional<int32_t> prefix =
        tokenizer.eos_id() ? tokenizer.eos_id() : tokenizer.bos_id();
    TESSERA_CHECK(prefix.has_value(), InvalidArgument, "loglikelihood: request ", request,
                  " has an empty context and the tokenizer has no EOS or BOS token to start it");
    s.tokens.insert(s.tokens.begin(), *prefix);
    s.context = 1;
  }
  TESSERA_CHECK(s.tokens.size() > s.context, InvalidArgument, "loglikelihood: request ", request,
                ": the continuation '", pair.continuation, "' adds no tokens to the context");
  return s;
}

size_t first_stop(const std::string& text, const std::vector<std::string>& until) {
  size_t cut = std::string::npos;
  for (const std::string& s : until) {
    if (s.empty()) continue;
    const size_t at = text.find(s);
    if (at < cut) cut = at;
  }
  return cut;
}

}  // namespace tessera::eval::detail
