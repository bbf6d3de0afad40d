#include "tessera/formats/hf.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <optional>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/formats/gguf.h"
#include "tessera/formats/safetensors.h"

namespace fs = std::filesystem;

namespace tessera::nn {
namespace {

void write_text_atomically(const fs::path& path, const std::string& text) {
  AtomicFileWriter out(path.string());
  out.append(text.data(), text.size());
  out.commit();
}

// llama.cpp's converter reorders the rows of q/k so that its rotary kernel
// can rotate adjacent pairs; Hugging Face's rotate_half pairs element i with
// i + d/2. Undo: [heads, 2, d/2, in] was written as [heads, d/2, 2, in].
at::Tensor unpermute_rotary(const at::Tensor& w, int64_t heads) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.view({heads, rows / heads / 2, 2, cols}).transpose(1, 2).reshape({rows, cols});
}

}  // namespace

void save_hf_model(const std::string& dir, const ModelConfig& config, const WeightMap& weights,
                   int64_t max_shard_bytes) {
  fs::create_directories(dir);
  NamedTensors named;
  for (const auto& [name, t] : weights) named.push_back({name, t.detach().contiguous()});
  save_safetensors_folder(dir, named, static_cast<uint64_t>(max_shard_bytes), {{"format", "pt"}});
  write_text_atomically(fs::path(dir) / "config.json", config.to_json() + "\n");
}

namespace {

// The steps of read_gguf_model, in order; each throws InvalidArgument for
// what is not supported, NotFound or DataLoss naming `path` and the key or
// tensor at fault.

// The llama hyperparameters of `file` (everything but the vocabulary).
void read_llama_config(const GgufFile& file, const std::string& path, ModelConfig& c) {
  const std::string arch = file.get_string("general.architecture");
  TESSERA_CHECK(arch == "llama", InvalidArgument, path, ": architecture '", arch,
                "' is not supported (llama only)");
  c.model_type = "llama";
  c.hidden_size = file.get_int("llama.embedding_length");
  c.num_hidden_layers = file.get_int("llama.block_count");
  c.intermediate_size = file.get_int("llama.feed_forward_length");
  c.num_attention_heads = file.get_int("llama.attention.head_count");
  c.num_key_value_heads = file.has("llama.attention.head_count_kv")
                              ? file.get_int("llama.attention.head_count_kv")
                              : c.num_attention_heads;
  c.max_position_embeddings = file.get_int("llama.context_length");
  c.rms_norm_eps = file.get_float("llama.attention.layer_norm_rms_epsilon");
  c.rope_theta =
      file.has("llama.rope.freq_base") ? file.get_float("llama.rope.freq_base") : 10000.0;
  if (file.has("llama.rope.dimension_count")) {
    int64_t rot = file.get_int("llama.rope.dimension_count");
    TESSERA_CHECK(rot == c.hidden_size / c.num_attention_heads, InvalidArgument, path,
                  ": partial rotary embeddings (", rot, " dims) are not supported");
  }
  TESSERA_CHECK(
      !file.has("llama.rope.scaling.type") || file.get_string("llama.rope.scaling.type") == "none",
      InvalidArgument, path, ": rope scaling in GGUF files is not supported");
}

// The byte-level BPE tokenizer, its special ids and the chat template.
void read_gguf_tokenizer(const GgufFile& file, const std::string& path, GgufModel& m) {
  const std::string tok_model = file.get_string("tokenizer.ggml.model");
  TESSERA_CHECK(tok_model == "gpt2", InvalidArgument, path, ": tokenizer model '", tok_model,
                "' is not supported (byte-level BPE, \"gpt2\", only)");
  TokenizerSpec& spec = m.tokenizer;
  spec.vocab = file.get_string_array("tokenizer.ggml.tokens");
  for (const auto& merge : file.get_string_array("tokenizer.ggml.merges")) {
    auto space = merge.find(' ');
    TESSERA_CHECK(space != std::string::npos, DataLoss, path, ": malformed merge '", merge, "'");
    spec.merges.push_back({merge.substr(0, space), merge.substr(space + 1)});
  }
  if (file.has("tokenizer.ggml.token_type")) {
    auto types = file.get_int_array("tokenizer.ggml.token_type");
    for (size_t i = 0; i < types.size() && i < spec.vocab.size(); ++i) {
      // llama.cpp token types: 3 = CONTROL, 4 = USER_DEFINED.
      if (types[i] == 3 || types[i] == 4) {
        AddedToken added;
        added.content = spec.vocab[i];
        added.id = static_cast<int32_t>(i);
        added.special = types[i] == 3;
        spec.added.push_back(added);
      }
    }
  }
  spec.pre = file.has("tokenizer.ggml.pre")
                 ? Tokenizer::pre_tokenizer_from_gguf_name(file.get_string("tokenizer.ggml.pre"))
                 : PreTokenizerKind::kGpt2;
  // llama.cpp takes a whole pre-token from the vocabulary before merging
  // for the Llama-3 family, as Hugging Face's ignore_merges does.
  spec.ignore_merges = spec.pre == PreTokenizerKind::kLlama3;
  auto id = [&](const char* key) -> std::optional<int32_t> {
    if (!file.has(key)) return std::nullopt;
    return static_cast<int32_t>(file.get_int(key));
  };
  spec.bos_id = id("tokenizer.ggml.bos_token_id");
  spec.eos_id = id("tokenizer.ggml.eos_token_id");
  spec.pad_id = id("tokenizer.ggml.padding_token_id");
  spec.unk_id = id("tokenizer.ggml.unknown_token_id");
  if (file.has("tokenizer.chat_template"))
    m.chat_template = file.get_string("tokenizer.chat_template");
}

// The weights, renamed to Hugging Face's names (q and k rows unpermuted).
void read_llama_weights(const GgufFile& file, const std::string& path, GgufModel& m) {
  const ModelConfig& c = m.config;
  auto put = [&](const std::string& gguf_name, const std::string& hf_name) {
    TESSERA_CHECK(file.has_tensor(gguf_name), NotFound, path, ": tensor '", gguf_name,
                  "' is missing");
    m.weights[hf_name] = file.load(gguf_name);
  };
  put("token_embd.weight", "model.embed_tokens.weight");
  put("output_norm.weight", "model.norm.weight");
  if (!c.tie_word_embeddings) put("output.weight", "lm_head.weight");
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string g = "blk." + std::to_string(l) + ".";
    const std::string h = "model.layers." + std::to_string(l) + ".";
    put(g + "attn_norm.weight", h + "input_layernorm.weight");
    put(g + "attn_q.weight", h + "self_attn.q_proj.weight");
    put(g + "attn_k.weight", h + "self_attn.k_proj.weight");
    put(g + "attn_v.weight", h + "self_attn.v_proj.weight");
    put(g + "attn_output.weight", h + "self_attn.o_proj.weight");
    put(g + "ffn_norm.weight", h + "post_attention_layernorm.weight");
    put(g + "ffn_gate.weight", h + "mlp.gate_proj.weight");
    put(g + "ffn_up.weight", h + "mlp.up_proj.weight");
    put(g + "ffn_down.weight", h + "mlp.down_proj.weight");
    auto& q = m.weights[h + "self_attn.q_proj.weight"];
    q = unpermute_rotary(q, c.num_attention_heads);
    auto& k = m.weights[h + "self_attn.k_proj.weight"];
    k = unpermute_rotary(k, c.num_key_value_heads);
  }
}

}  // namespace

GgufModel read_gguf_model(const std::string& path) {
  GgufFile file = GgufFile::open(path);
  GgufModel m;
  ModelConfig& c = m.config;
  read_llama_config(file, path, c);
  read_gguf_tokenizer(file, path, m);
  const TokenizerSpec& spec = m.tokenizer;
  c.vocab_size = file.has("llama.vocab_size") ? file.get_int("llama.vocab_size")
                                              : static_cast<int64_t>(spec.vocab.size());
  if (spec.bos_id) c.bos_token_id = *spec.bos_id;
  if (spec.eos_id) c.eos_token_ids = {*spec.eos_id};
  c.tie_word_embeddings = !file.has_tensor("output.weight");
  c.validate();

  read_llama_weights(file, path, m);
  return m;
}

}  // namespace tessera::nn
