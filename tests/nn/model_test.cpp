// The transformer family on one rank: configs, forward, KV cache, MoE,
// upcycling, and the Hugging Face folder format with its failure modes.
#include "tessera/nn/model.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "tessera/core/error.h"
#include "tessera/nn/generate.h"
#include "tessera/nn/loader.h"
#include "tessera/nn/moe_mixture.h"

namespace fs = std::filesystem;

namespace tessera::nn {
namespace {

ModelConfig tiny(const std::string& type = "llama") {
  ModelConfig c;
  c.model_type = type;
  c.vocab_size = 97;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 128;
  c.rope_theta = 10000;
  c.attention_bias = type == "qwen2" || type == "qwen2_moe";
  if (type == "mixtral" || type == "qwen2_moe") {
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
    c.moe_intermediate_size = type == "qwen2_moe" ? 24 : 0;
    c.shared_expert_intermediate_size = type == "qwen2_moe" ? 40 : 0;
    c.norm_topk_prob = type == "mixtral";
  }
  return c;
}

fs::path temp_dir(const std::string& name) {
  fs::path p =
      fs::path(::testing::TempDir()) / ("tessera_nn_" + std::to_string(getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

TEST(ModelConfig, ParsesFamiliesAndRoundTrips) {
  auto llama = ModelConfig::parse(R"({"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 2, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
      "tie_word_embeddings": true, "eos_token_id": [1, 2]})");
  EXPECT_EQ(llama.rope_scaling, RopeScaling::kLlama3);
  EXPECT_EQ(llama.eos_token_ids, (std::vector<int64_t>{1, 2}));
  auto again = ModelConfig::parse(llama.to_json());
  EXPECT_EQ(again.to_json(), llama.to_json());
  auto mixtral = ModelConfig::parse(R"({"model_type": "mixtral", "vocab_size": 100,
      "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 4, "num_local_experts": 8,
      "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, "sliding_window": null})");
  EXPECT_EQ(mixtral.num_experts, 8);
  EXPECT_TRUE(mixtral.is_moe_layer(1));
  auto qwen = ModelConfig::parse(R"({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64,
      "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
      "num_key_value_heads": 2, "use_sliding_window": false, "sliding_window": 4096,
      "max_window_layers": 21})");
  EXPECT_TRUE(qwen.attention_bias);
}

TEST(ModelConfig, RejectsWhatItDoesNotImplement) {
  auto expect_error = [](const std::string& json, const std::string& needle) {
    try {
      ModelConfig::parse(json, "config.json");
      FAIL() << "accepted " << json;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
    }
  };
  const std::string base = R"("vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
      "num_hidden_layers": 1, "num_attention_heads": 2)";
  expect_error(R"({"model_type": "gpt_neox", )" + base + "}", "unsupported model_type 'gpt_neox'");
  expect_error(R"({"model_type": "llama", "attn_logit_softcap": 30, )" + base + "}",
               "unknown key 'attn_logit_softcap'");
  expect_error(R"({"model_type": "llama", "hidden_act": "gelu", )" + base + "}",
               "hidden_act 'gelu'");
  expect_error(
      R"({"model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 4}, )" + base + "}",
      "rope_scaling type 'yarn'");
  expect_error(
      R"({"model_type": "qwen2", "use_sliding_window": true, "sliding_window": 64, )" + base + "}",
      "sliding-window");
  expect_error(R"({"model_type": "llama", "num_key_value_heads": 3, )" + base + "}",
               "multiple of num_key_value_heads");
  // Found by fuzz/model_config_fuzz.cpp: sizes whose parameter count
  // overflows 64 bits (signed overflow in num_parameters) and layer counts
  // that would make every loop over the layers run for ever.
  expect_error(
      R"({"model_type": "mixtral", "num_local_experts": 6011111111111111111, )" + base + "}",
      "at most 1e18 are supported");
  expect_error(R"({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
      "intermediate_size": 8, "num_hidden_layers": 6011111111111111111,
      "num_attention_heads": 2})",
               "num_hidden_layers 6011111111111111111 is more than");
}

TEST(Model, ForwardShapesAndDeterminism) {
  for (const std::string type : {"llama", "qwen2", "mixtral", "qwen2_moe"}) {
    SCOPED_TRACE(type);
    Transformer model(tiny(type));
    model.init_random(1);
    at::Tensor ids = at::randint(0, 97, {3, 7}, at::kLong);
    auto a = model.forward(ids);
    auto b = model.forward(ids);
    EXPECT_EQ(a.logits.sizes(), (std::vector<int64_t>{3, 7, 97}));
    EXPECT_TRUE(at::equal(a.logits, b.logits));
    if (type == "mixtral" || type == "qwen2_moe") {
      EXPECT_GT(a.aux_loss.item<float>(), 0.f);
      EXPECT_EQ(a.expert_load.sizes(), (std::vector<int64_t>{2, 4}));
      EXPECT_EQ(a.expert_load.sum().item<float>(), 2 * 21 * 2);
    }
  }
  Transformer model(tiny());
  EXPECT_THROW(model.forward(at::full({1, 3}, 97, at::kLong)), InvalidArgument);
  EXPECT_THROW(model.forward(at::zeros({3}, at::kLong)), InvalidArgument);
}

TEST(Model, CausalityAndPaddingDoNotLeak) {
  Transformer model(tiny("qwen2"));
  model.init_random(2);
  at::Tensor ids = at::randint(0, 97, {1, 9}, at::kLong);
  at::Tensor full = model.forward(ids).logits;
  at::Tensor prefix = model.forward(ids.narrow(1, 0, 5)).logits;
  EXPECT_TRUE(at::allclose(full.narrow(1, 0, 5), prefix, 1e-5, 1e-5));
}

TEST(Model, KvCacheGreedyEqualsRecomputation) {
  for (const std::string type : {"llama", "mixtral"}) {
    SCOPED_TRACE(type);
    Transformer model(tiny(type));
    model.init_random(3);
    std::vector<std::vector<int64_t>> prompts{
        {5, 9, 11, 3}, {7}, {1, 2, 3, 4, 5, 6, 7, 8, 9}, {42, 42}};
    SamplingOptions opts;
    opts.max_new_tokens = 12;
    auto cached = generate(model, prompts, opts);
    opts.use_cache = false;
    auto recomputed = generate(model, prompts, opts);
    for (size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ(cached.tokens[i], recomputed.tokens[i]) << "prompt " << i;
      EXPECT_EQ(cached.tokens[i].size(), 12u);
    }
  }
}

TEST(Model, StopTokensAndSamplingAreSeeded) {
  Transformer model(tiny());
  model.init_random(4);
  SamplingOptions opts;
  opts.max_new_tokens = 20;
  opts.temperature = 0.9;
  opts.top_k = 20;
  opts.top_p = 0.9;
  opts.seed = 7;
  auto a = generate(model, {{1, 2, 3}, {4}}, opts);
  auto b = generate(model, {{1, 2, 3}, {4}}, opts);
  EXPECT_EQ(a.tokens, b.tokens);
  opts.temperature = 0;
  opts.stop_tokens = {generate(model, {{1, 2, 3}}, opts).tokens[0][2]};
  auto stopped = generate(model, {{1, 2, 3}}, opts);
  EXPECT_EQ(stopped.finish_reason[0], "stop");
  EXPECT_LE(stopped.tokens[0].size(), 3u);
}

TEST(Model, UpcycledMoeEqualsDense) {
  // Identical experts whose top-k weights sum to one compute exactly the
  // dense MLP, whatever the router says.
  ModelConfig dense_cfg = tiny();
  Transformer dense(dense_cfg);
  dense.init_random(5);
  WeightMap weights = gather_full_weights(dense);
  auto up = upcycle_to_moe(dense_cfg, weights, 4, 2, 11);
  Transformer moe(up.config);
  load_weights(moe, up.weights, "upcycled");
  at::Tensor ids = at::randint(0, 97, {2, 6}, at::kLong);
  EXPECT_TRUE(at::allclose(dense.forward(ids).logits, moe.forward(ids).logits, 1e-5, 1e-5));
}

TEST(Model, CapacityFactorDropsOverflow) {
  ModelConfig c = tiny("mixtral");
  c.capacity_factor = 0.25;
  Transformer model(c);
  model.init_random(6);
  ForwardOptions opts;
  opts.record_routing = true;
  at::Tensor ids = at::randint(0, 97, {2, 16}, at::kLong);
  auto out = model.forward(ids, opts);
  ASSERT_EQ(out.routing.size(), 2u);
  EXPECT_EQ(out.routing[0].experts.sizes(), (std::vector<int64_t>{32, 2}));
  EXPECT_TRUE(at::isfinite(out.logits).all().item<bool>());
  // The same weights without a capacity limit, and with one no expert can
  // reach (capacity ceil(10 * 32 * 2 / 4) = 160 >= 64 assignments): the
  // roomy limit drops nothing (identical logits), the tight one (4 per
  // expert, 16 of 64 assignments kept) changes the output.
  auto weights = gather_full_weights(model);
  auto with_capacity = [&](double factor) {
    ModelConfig cc = c;
    cc.capacity_factor = factor;
    Transformer m(cc);
    load_weights(m, weights, "memory");
    return m.forward(ids).logits;
  };
  const at::Tensor unlimited = with_capacity(0.0);
  EXPECT_TRUE(at::equal(with_capacity(10.0), unlimited));
  EXPECT_FALSE(at::allclose(out.logits, unlimited, 1e-4, 1e-5));
  // A dropped assignment contributes nothing: at capacity 0.25 some token's
  // logits differ from the unlimited run, and some (all kept) do not.
  const at::Tensor same_token = (out.logits - unlimited).abs().amax(-1).view({-1}) < 1e-5;
  EXPECT_GT(same_token.sum().item<int64_t>(), 0);
  EXPECT_LT(same_token.sum().item<int64_t>(), 32);
}

TEST(HfFormat, SaveLoadGivesIdenticalLogitsAlsoSharded) {
  for (const std::string type : {"llama", "qwen2_moe"}) {
    SCOPED_TRACE(type);
    fs::path dir = temp_dir("roundtrip_" + type);
    auto weights = write_random_model(dir.string(), tiny(type), 8, /*max_shard_bytes=*/20000);
    EXPECT_TRUE(fs::exists(dir / "model.safetensors.index.json"));
    Transformer original(tiny(type));
    load_weights(original, weights, "memory");
    Transformer loaded = load_hf_model(dir.string());
    at::Tensor ids = at::randint(0, 97, {2, 5}, at::kLong);
    EXPECT_TRUE(at::equal(original.forward(ids).logits, loaded.forward(ids).logits));
    fs::remove_all(dir);
  }
}

TEST(HfFormat, BrokenFoldersGiveNamedErrors) {
  fs::path dir = temp_dir("broken");
  write_random_model(dir.string(), tiny(), 9);
  const fs::path st = dir / "model.safetensors";
  std::string bytes;
  {
    std::ifstream in(st, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  auto write = [&](const std::string& content) {
    std::ofstream out(st, std::ios::binary | std::ios::trunc);
    out << content;
  };
  auto expect = [&](auto kind_tag, const std::string& needle) {
    using Kind = decltype(kind_tag);
    try {
      load_hf_model(dir.string());
      FAIL() << "loaded a broken folder, expected " << needle;
    } catch (const Kind& e) {
      EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
    }
  };
  // Corrupt header.
  std::string corrupt = bytes;
  corrupt[10] = '#';
  write(corrupt);
  expect(DataLoss(""), "model.safetensors");
  // Truncated file.
  write(bytes.substr(0, bytes.size() - 100));
  expect(DataLoss(""), "model.safetensors");
  // Missing tensor and wrong shape: rewrite the file without / with a bad tensor.
  auto weights = [&] {
    write(bytes);
    Transformer m = load_hf_model(dir.string());
    return gather_full_weights(m);
  }();
  WeightMap missing = weights;
  missing.erase("model.layers.1.mlp.up_proj.weight");
  save_hf_model(dir.string(), tiny(), missing);
  expect(NotFound(""), "model.layers.1.mlp.up_proj.weight");
  WeightMap reshaped = weights;
  reshaped["model.layers.0.self_attn.k_proj.weight"] = at::zeros({8, 32});
  save_hf_model(dir.string(), tiny(), reshaped);
  expect(InvalidArgument(""), "model.layers.0.self_attn.k_proj.weight");
  WeightMap ints = weights;
  ints["model.norm.weight"] = at::zeros({32}, at::kInt);
  save_hf_model(dir.string(), tiny(), ints);
  expect(InvalidArgument(""), "model.norm.weight");
  fs::remove_all(dir);
}

// Bad input reaches the caller as tessera::Error, never as c10::Error: what
// nn checks itself, and what only LibTorch notices (a label outside the
// vocabulary fails inside the cross-entropy's gather), which the entry
// point translates and names.
TEST(Errors, LibTorchErrorsSurfaceAsTesseraErrors) {
  Transformer model(tiny());
  model.init_random(1);
  auto message = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const InvalidArgument& e) {
      return e.what();
    } catch (const std::exception& e) {
      return std::string("non-tessera error: ") + e.what();
    }
    return "no error";
  };
  EXPECT_NE(message([&] {
              model.forward(at::ones({1, 4}, at::kFloat));
            }).find("INVALID_ARGUMENT: forward"),
            std::string::npos);
  EXPECT_NE(message([&] {
              model.forward(at::full({1, 4}, 500, at::kLong));
            }).find("outside the vocabulary"),
            std::string::npos);
  const std::string from_libtorch = message([&] {
    model.loss(at::zeros({2, 4}, at::kLong), at::full({2, 4}, 500, at::kLong));
  });
  EXPECT_EQ(from_libtorch.rfind("INVALID_ARGUMENT: Transformer::loss: ", 0), 0u) << from_libtorch;
  SamplingOptions so;
  so.max_new_tokens = 2;
  EXPECT_NE(message([&] {
              generate(model, {{1, 2, 1000}}, so);
            }).find("outside the vocabulary"),
            std::string::npos);
}

// The mixture equals a direct per-token, per-assignment loop (each expert a
// different linear map), and refuses expert ids out of range.
TEST(MoeMixture, EqualsADirectLoop) {
  at::manual_seed(7);
  const int64_t N = 23, H = 8, E = 5, K = 2;
  at::Tensor x = at::randn({N, H}, at::kDouble);
  at::Tensor top_e = at::randint(E, {N, K}, at::kLong);
  at::Tensor top_w = at::rand({N, K}, at::kDouble);
  at::Tensor maps = at::randn({E, H, H}, at::kDouble);
  int calls = 0;
  at::Tensor got = moe_mixture(x, top_e, top_w, E, [&](int64_t e, const at::Tensor& rows) {
    ++calls;
    return at::matmul(rows, maps[e]);
  });
  at::Tensor want = at::zeros({N, H}, at::kDouble);
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = top_e[t][j].item<int64_t>();
      want[t] += top_w[t][j] * at::matmul(x[t], maps[e]);
    }
  }
  EXPECT_TRUE(at::allclose(got, want, 1e-12, 1e-12));
  EXPECT_LE(calls, E);  // each expert once, on all its rows
  EXPECT_THROW(moe_mixture(x, at::full({N, K}, E, at::kLong), top_w, E,
                           [](int64_t, const at::Tensor& r) { return r; }),
               InvalidArgument);
}

}  // namespace
}  // namespace tessera::nn
