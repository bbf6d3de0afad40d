#include "tessera/nn/loader.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <filesystem>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/tensor.h"
#include "tessera/dist/redistribute.h"
#include "tessera/nn/gguf.h"
#include "tessera/nn/safetensors.h"

namespace fs = std::filesystem;

namespace tessera::nn {
namespace {

void write_text_atomically(const fs::path& path, const std::string& text) {
  AtomicFileWriter out(path.string());
  out.append(text.data(), text.size());
  out.commit();
}

}  // namespace

void load_weights(Transformer& model, const WeightMap& weights, const std::string& source) {
  for (const auto& name : model.full_parameter_names()) {
    auto it = weights.find(name);
    TESSERA_CHECK(it != weights.end(), NotFound, source, ": tensor '", name,
                  "' is missing (the config needs it)");
    model.load_full(name, it->second);
  }
}

Transformer load_hf_model(const std::string& dir, ParallelGroups groups, at::ScalarType dtype) {
  const fs::path root(dir);
  TESSERA_CHECK(fs::is_directory(root), NotFound, "model folder '", dir, "' does not exist");
  ModelConfig config = ModelConfig::load((root / "config.json").string());
  auto folder = SafetensorsFolder::open(dir);
  Transformer model(config, groups, dtype);
  at::NoGradGuard no_grad;
  for (const auto& name : model.full_parameter_names()) {
    auto shape = model.full_shape(name);
    TESSERA_CHECK(folder.contains(name), NotFound, dir, ": tensor '", name,
                  "' is missing from the checkpoint");
    at::Tensor t = folder.get(name);
    TESSERA_CHECK(t.sizes() == at::IntArrayRef(shape), InvalidArgument, folder.file_of(name),
                  ": tensor '", name, "' has shape ", shape_string(t.sizes()), " but config.json implies ",
                  shape_string(shape));
    TESSERA_CHECK(at::isFloatingType(t.scalar_type()), InvalidArgument, folder.file_of(name),
                  ": tensor '", name, "' has dtype ", dtype_name(t.scalar_type()),
                  ", expected a floating-point type");
    model.load_full(name, t);
  }
  return model;
}

void save_hf_model(const std::string& dir, const ModelConfig& config, const WeightMap& weights,
                   int64_t max_shard_bytes) {
  fs::create_directories(dir);
  NamedTensors named;
  for (const auto& [name, t] : weights) named.push_back({name, t.detach().contiguous()});
  save_safetensors_folder(dir, named, static_cast<uint64_t>(max_shard_bytes), {{"format", "pt"}});
  write_text_atomically(fs::path(dir) / "config.json", config.to_json() + "\n");
}

WeightMap gather_full_weights(Transformer& model,
                              const std::shared_ptr<dist::ProcessGroup>& replica) {
  at::NoGradGuard no_grad;
  WeightMap out;
  const int world = replica ? replica->size() : 1;
  for (const auto& name : model.full_parameter_names()) {
    dist::Layout layout = model.layout_of(name);
    const int me = model.replica_rank();
    at::ScalarType dtype = model.named_parameters().front().second.scalar_type();
    at::Tensor local = model.has_parameter(name)
                           ? model.parameter(name).detach()
                           : at::empty(layout.local_shape(me), at::TensorOptions().dtype(dtype));
    if (world == 1) {
      out[name] = local.clone();
      continue;
    }
    TESSERA_CHECK(layout.world_size() == world, InvalidArgument, "gather_full_weights: group of ",
                  world, " ranks for a model replica of ", layout.world_size());
    out[name] = dist::redistribute(*replica, local, layout,
                                   dist::Layout::replicated(layout.global_shape(), world));
  }
  return out;
}

WeightMap write_random_model(const std::string& dir, const ModelConfig& config, uint64_t seed,
                             int64_t max_shard_bytes) {
  Transformer model(config);
  model.init_random(seed);
  WeightMap weights = gather_full_weights(model);
  save_hf_model(dir, config, weights, max_shard_bytes);
  return weights;
}

// ---------------------------------------------------------------------------
// GGUF

namespace {

// llama.cpp's converter reorders the rows of q/k so that its rotary kernel
// can rotate adjacent pairs; Hugging Face's rotate_half pairs element i with
// i + d/2. Undo: [heads, 2, d/2, in] was written as [heads, d/2, 2, in].
at::Tensor unpermute_rotary(const at::Tensor& w, int64_t heads) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.view({heads, rows / heads / 2, 2, cols}).transpose(1, 2).reshape({rows, cols});
}

}  // namespace

GgufModel read_gguf_model(const std::string& path) {
  GgufFile file = GgufFile::open(path);
  const std::string arch = file.get_string("general.architecture");
  TESSERA_CHECK(arch == "llama", InvalidArgument, path, ": architecture '", arch,
                "' is not supported (llama only)");
  GgufModel m;
  ModelConfig& c = m.config;
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
  c.rope_theta = file.has("llama.rope.freq_base") ? file.get_float("llama.rope.freq_base") : 10000.0;
  if (file.has("llama.rope.dimension_count")) {
    int64_t rot = file.get_int("llama.rope.dimension_count");
    TESSERA_CHECK(rot == c.hidden_size / c.num_attention_heads, InvalidArgument, path,
                  ": partial rotary embeddings (", rot, " dims) are not supported");
  }
  TESSERA_CHECK(!file.has("llama.rope.scaling.type") ||
                    file.get_string("llama.rope.scaling.type") == "none",
                InvalidArgument, path, ": rope scaling in GGUF files is not supported");

  // Tokenizer.
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
  if (file.has("tokenizer.chat_template")) m.chat_template = file.get_string("tokenizer.chat_template");
  c.vocab_size = file.has("llama.vocab_size") ? file.get_int("llama.vocab_size")
                                              : static_cast<int64_t>(spec.vocab.size());
  if (spec.bos_id) c.bos_token_id = *spec.bos_id;
  if (spec.eos_id) c.eos_token_ids = {*spec.eos_id};
  c.tie_word_embeddings = !file.has_tensor("output.weight");
  c.validate();

  // Weights, renamed to Hugging Face's names.
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
  return m;
}

LoadedModel load_gguf_model(const std::string& path, ParallelGroups groups) {
  GgufModel g = read_gguf_model(path);
  auto model = std::make_unique<Transformer>(g.config, std::move(groups));
  load_weights(*model, g.weights, path);
  return LoadedModel{std::move(model), Tokenizer::from_spec(std::move(g.tokenizer)),
                     std::move(g.chat_template)};
}

std::string format_chat(const std::string& chat_template, const std::vector<ChatMessage>& messages) {
  TESSERA_CHECK(chat_template.empty() || chat_template.find("<|im_start|>") != std::string::npos,
                InvalidArgument,
                "format_chat: only ChatML templates (<|im_start|>...<|im_end|>) are supported");
  std::string out;
  bool has_system = !messages.empty() && messages.front().role == "system";
  if (!has_system) {
    // Templates such as SmolLM2's open with a default system prompt:
    // "... messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nTEXT<|im_end|>\n' }}".
    const std::string marker = "<|im_start|>system\\n";
    auto pos = chat_template.find(marker);
    if (pos != std::string::npos) {
      auto end = chat_template.find("<|im_end|>", pos);
      if (end != std::string::npos) {
        std::string text = chat_template.substr(pos + marker.size(), end - pos - marker.size());
        if (text.find("{{") == std::string::npos && text.find("{%") == std::string::npos) {
          out += "<|im_start|>system\n" + text + "<|im_end|>\n";
        }
      }
    }
  }
  for (const auto& m : messages) {
    TESSERA_CHECK(m.role == "system" || m.role == "user" || m.role == "assistant", InvalidArgument,
                  "format_chat: unknown role '", m.role, "'");
    out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  }
  out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace tessera::nn
