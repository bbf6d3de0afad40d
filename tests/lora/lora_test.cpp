// LoRA and MoS adapters on a small model: equivalences, gradients, formats,
// mixed-adapter batches and the registry.
#include "tessera/lora/lora.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/formats/safetensors.h"
#include "tessera/nn/train.h"

namespace fs = std::filesystem;

namespace tessera::lora {
namespace {

nn::ModelConfig tiny(const std::string& type = "llama") {
  nn::ModelConfig c;
  c.model_type = type;
  c.vocab_size = 61;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  if (type == "mixtral") {
    c.num_experts = 4;
    c.num_experts_per_tok = 2;
  }
  return c;
}

std::unique_ptr<nn::Transformer> base_model(const std::string& type = "llama") {
  auto m = std::make_unique<nn::Transformer>(tiny(type));
  m->init_random(1);
  return m;
}

// Gives B non-zero values so that adapters change outputs.
void randomize(Adapter& adapter, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (auto& t : adapter.trainable()) t.copy_(at::randn(t.sizes(), gen) * 0.1);
}

fs::path scratch(const std::string& name) {
  fs::path p =
      fs::path(::testing::TempDir()) / ("tessera_lora_" + std::to_string(getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

TEST(Targets, PeftPatternRules) {
  auto model = base_model("mixtral");
  auto qv = find_targets(*model, {"q_proj", "v_proj"});
  ASSERT_EQ(qv.size(), 4u);
  EXPECT_EQ(qv[0].name, "model.layers.0.self_attn.q_proj");
  EXPECT_EQ(qv[1].in, 32);
  EXPECT_EQ(qv[1].out, 16);  // 2 kv heads x 8
  auto experts = find_targets(*model, {"w1"});
  EXPECT_EQ(experts.size(), 8u);  // 2 layers x 4 experts
  auto all = find_targets(*model, {"all-linear"});
  EXPECT_EQ(all.size(), 2u * (4 + 4 * 3));  // routers, embeddings and head excluded
  EXPECT_THROW(find_targets(*model, {"c_attn"}), InvalidArgument);
}

TEST(Lora, StartsAsIdentityAndChangesOutputsWhenTrained) {
  auto model = base_model();
  at::Tensor ids = at::randint(0, 61, {2, 7}, at::kLong);
  at::Tensor before = model->forward(ids).logits;
  auto adapter = make_lora(*model, {8, 16, 0.0, false, {"q_proj", "v_proj", "down_proj"}}, 3);
  model->set_adapter(adapter);
  EXPECT_TRUE(at::equal(model->forward(ids).logits, before));  // B starts at zero
  randomize(*adapter, 4);
  EXPECT_FALSE(at::allclose(model->forward(ids).logits, before));
}

TEST(Mos, EverySwitchOffEqualsLora) {
  auto model = base_model();
  LoraConfig lc{8, 16, 0.0, false, {"q_proj", "v_proj", "gate_proj", "down_proj"}};
  auto mos = make_mos(*model, MosConfig::all_off(lc));
  auto lora = make_lora(*model, lc);
  // Same parameter count as LoRA.
  EXPECT_EQ(mos->report().trainable, lora->report().trainable);
  EXPECT_EQ(lora->report().trainable, lora->report().lora_equivalent);
  randomize(*mos, 5);
  // Copy MoS's materialised A and B into LoRA: outputs must agree.
  {
    at::NoGradGuard no_grad;
    auto named = lora->named_trainable();
    for (auto& [name, t] : named) {
      std::string module = name.substr(0, name.find(".lora_"));
      t.copy_(name.find("lora_A") != std::string::npos ? mos->a(module) : mos->b(module));
    }
  }
  at::Tensor ids = at::randint(0, 61, {2, 6}, at::kLong);
  model->set_adapter(mos);
  at::Tensor with_mos = model->forward(ids).logits;
  model->set_adapter(lora);
  at::Tensor with_lora = model->forward(ids).logits;
  EXPECT_TRUE(at::allclose(with_mos, with_lora, 1e-6, 1e-6));
  // And each pooled row is used by exactly one matrix row: an exact
  // partition. The gradient of the sum of every materialised A and B with
  // respect to the pools counts how often each pool element is used: 1
  // everywhere (a row used twice gives 2, an unused one 0).
  at::Tensor total = at::zeros({}, at::kFloat);
  for (const auto& t : lora->targets()) {
    EXPECT_EQ(mos->a(t.name).sizes(), lora->a(t.name).sizes());
    EXPECT_EQ(mos->b(t.name).sizes(), lora->b(t.name).sizes());
    total = total + mos->a(t.name).sum() + mos->b(t.name).sum();
  }
  for (auto& pool : mos->trainable()) {
    if (pool.grad().defined()) pool.mutable_grad().zero_();
  }
  total.backward();
  for (auto& pool : mos->trainable()) {
    ASSERT_TRUE(pool.grad().defined());
    EXPECT_TRUE(at::equal(pool.grad(), at::ones_like(pool))) << "pool " << pool.sizes();
  }
}

TEST(Mos, SharesPoolsAcrossShapesWithFewerParameters) {
  auto model = base_model();
  MosConfig c;
  c.rank = 8;
  c.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  c.shards_per_vector = 4;
  c.public_fraction = 0.125;
  c.private_shards = 1;
  c.rank_scaling = true;
  auto mos = make_mos(*model, c);
  auto report = mos->report();
  EXPECT_LT(report.trainable * 4, report.lora_equivalent);
  EXPECT_GT(report.stored, report.trainable);  // index tables
  EXPECT_LT(report.equivalent_rank, 2.0);
  // Different widths (32 -> 16 k_proj, 64 -> 32 down_proj) draw from one pool.
  EXPECT_EQ(mos->a("model.layers.0.mlp.down_proj").sizes(), (std::vector<int64_t>{8, 64}));
  EXPECT_EQ(mos->b("model.layers.0.self_attn.k_proj").sizes(), (std::vector<int64_t>{16, 8}));
  MosConfig bad = c;
  bad.shards_per_vector = 5;
  EXPECT_THROW(make_mos(*model, bad), InvalidArgument);
}

TEST(Mos, PoolGradientsMatchFiniteDifferences) {
  // Double precision, a tiny model, every ingredient on.
  nn::ModelConfig cfg = tiny();
  cfg.num_hidden_layers = 1;
  nn::Transformer model(cfg, {}, at::kDouble);
  model.init_random(2);
  MosConfig c;
  c.rank = 2;
  c.target_modules = {"q_proj", "down_proj"};
  c.shards_per_vector = 2;
  c.public_fraction = 0.5;
  c.rank_scaling = true;
  auto mos = make_mos(model, c);
  {
    at::NoGradGuard no_grad;
    for (auto& t : mos->trainable()) t.set_data(t.to(at::kDouble));
  }
  randomize(*mos, 8);
  model.set_adapter(mos);
  at::Tensor ids = at::randint(0, 61, {1, 5}, at::kLong);
  at::Tensor labels = at::roll(ids, -1, 1);
  auto loss_value = [&] { return model.loss(ids, labels).total.item<double>(); };
  auto named = mos->named_trainable();
  for (auto& [name, t] : named) t.mutable_grad() = at::Tensor();
  model.loss(ids, labels).total.backward();
  for (auto& [name, t] : named) {
    ASSERT_TRUE(t.grad().defined()) << name;
    at::Tensor flat = t.detach().view({-1});
    at::Tensor grad = t.grad().view({-1});
    for (int64_t i = 0; i < std::min<int64_t>(flat.numel(), 6); ++i) {
      int64_t k = (i * 7919) % flat.numel();
      const double h = 1e-6, orig = flat[k].item<double>();
      {
        at::NoGradGuard no_grad;
        flat[k] = orig + h;
      }
      double up = loss_value();
      {
        at::NoGradGuard no_grad;
        flat[k] = orig - h;
      }
      double down = loss_value();
      {
        at::NoGradGuard no_grad;
        flat[k] = orig;
      }
      double numeric = (up - down) / (2 * h);
      EXPECT_NEAR(grad[k].item<double>(), numeric, 1e-6 + 1e-4 * std::abs(numeric))
          << name << "[" << k << "]";
    }
  }
}

TEST(Merge, MergedAndUnmergedForwardsAgree) {
  for (const std::string kind : {"lora", "mos"}) {
    SCOPED_TRACE(kind);
    auto model = base_model();
    std::shared_ptr<Adapter> adapter;
    if (kind == "lora") {
      adapter = make_lora(*model, {4, 8, 0.0, false, {"all-linear"}});
    } else {
      MosConfig c;
      c.target_modules = {"all-linear"};
      adapter = make_mos(*model, c);
    }
    randomize(*adapter, 9);
    at::Tensor ids = at::randint(0, 61, {2, 5}, at::kLong);
    at::Tensor base_logits = model->forward(ids).logits;
    model->set_adapter(adapter);
    at::Tensor adapted = model->forward(ids).logits;
    model->set_adapter(nullptr);
    merge(*model, *adapter);
    at::Tensor merged = model->forward(ids).logits;
    EXPECT_LE((merged - adapted).abs().max().item<double>(),
              1e-5 * adapted.abs().max().item<double>());
    unmerge(*model, *adapter);
    EXPECT_LE((model->forward(ids).logits - base_logits).abs().max().item<double>(),
              1e-5 * base_logits.abs().max().item<double>());
  }
}

TEST(PeftFormat, KnownTensorsLoadWithTheRightNamesAndDelta) {
  auto model = base_model();
  fs::path dir = scratch("peft");
  // Written by hand, as PEFT would: r = 2, alpha = 4, scale 2.
  {
    std::ofstream(dir / "adapter_config.json")
        << R"({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
               "lora_dropout": 0.05, "target_modules": ["q_proj"], "bias": "none",
               "fan_in_fan_out": false, "base_model_name_or_path": "tiny", "revision": null,
               "modules_to_save": null, "init_lora_weights": true, "inference_mode": true})";
    at::Tensor a = at::arange(64, at::kFloat).view({2, 32}) / 100;
    at::Tensor b = at::arange(64, at::kFloat).view({32, 2}) / 50;
    nn::NamedTensors t;
    for (int l = 0; l < 2; ++l) {
      std::string base = "base_model.model.model.layers." + std::to_string(l) + ".self_attn.q_proj";
      t.push_back({base + ".lora_A.weight", a});
      t.push_back({base + ".lora_B.weight", b});
    }
    nn::save_safetensors((dir / "adapter_model.safetensors").string(), t);
  }
  auto adapter = load_adapter(dir.string(), *model);
  EXPECT_EQ(adapter->kind(), "lora");
  EXPECT_EQ(adapter->rank(), 2);
  EXPECT_DOUBLE_EQ(adapter->scale(), 2.0);
  at::Tensor w_before = model->parameter("model.layers.1.self_attn.q_proj.weight").clone();
  merge(*model, *adapter);
  at::Tensor expected_delta = at::matmul(at::arange(64, at::kFloat).view({32, 2}) / 50,
                                         at::arange(64, at::kFloat).view({2, 32}) / 100) *
                              2.0;
  EXPECT_TRUE(at::allclose(model->parameter("model.layers.1.self_attn.q_proj.weight") - w_before,
                           expected_delta, 1e-5, 1e-6));
  // Round trip of both kinds is exact.
  for (const std::string kind : {"lora", "mos"}) {
    std::shared_ptr<Adapter> a = kind == "lora"
                                     ? make_lora(*model, {4, 8, 0.0, false, {"v_proj", "up_proj"}})
                                     : make_mos(*model, MosConfig{});
    randomize(*a, 10);
    fs::path out = scratch("rt_" + kind);
    save_adapter(*a, out.string());
    auto back = load_adapter(out.string(), *model);
    EXPECT_EQ(back->kind(), kind);
    for (const auto& t : a->targets()) {
      EXPECT_TRUE(at::equal(a->a(t.name), back->a(t.name))) << t.name;
      EXPECT_TRUE(at::equal(a->b(t.name), back->b(t.name))) << t.name;
    }
    fs::remove_all(out);
  }
  fs::remove_all(dir);
}

TEST(PeftFormat, BrokenAdaptersGiveClearErrors) {
  auto model = base_model();
  fs::path dir = scratch("broken");
  auto adapter = make_lora(*model, {4, 8, 0.0, false, {"q_proj"}});
  save_adapter(*adapter, dir.string());
  auto expect_error = [&](auto tag, const std::string& needle) {
    using Kind = decltype(tag);
    try {
      load_adapter(dir.string(), *model);
      FAIL() << "loaded, expected " << needle;
    } catch (const Kind& e) {
      EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
    }
  };
  std::string good;
  {
    std::ifstream in(dir / "adapter_config.json");
    good.assign(std::istreambuf_iterator<char>(in), {});
  }
  std::ofstream(dir / "adapter_config.json") << "{\"peft_type\": \"LORA\", \"r\": 4,";
  expect_error(InvalidArgument(""), "malformed JSON at line 1");
  std::ofstream(dir / "adapter_config.json") << good;
  // A rank that does not match the tensors.
  std::string wrong_rank = good;
  wrong_rank.replace(wrong_rank.find("\"r\": 4"), 6, "\"r\": 8");
  std::ofstream(dir / "adapter_config.json") << wrong_rank;
  expect_error(InvalidArgument(""), "lora_A.weight' has shape [4, 32], expected [8, 32]");
  // A missing tensor.
  std::ofstream(dir / "adapter_config.json") << good;
  nn::save_safetensors(
      (dir / "adapter_model.safetensors").string(),
      {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", at::zeros({4, 32})}});
  expect_error(NotFound(""), "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
  fs::remove_all(dir);
}

TEST(AdapterBank, MixedBatchEqualsEachSequenceAlone) {
  auto model = base_model();
  std::vector<std::shared_ptr<Adapter>> adapters;
  for (int64_t r : {4, 8, 16}) {
    adapters.push_back(
        make_lora(*model, {r, 2.0 * r, 0.0, false, {"q_proj", "v_proj", "down_proj"}}, r));
  }
  MosConfig mc;
  mc.target_modules = {"q_proj", "up_proj", "down_proj"};
  adapters.push_back(make_mos(*model, mc));
  for (size_t i = 0; i < adapters.size(); ++i) randomize(*adapters[i], 20 + i);
  auto bank = std::make_shared<AdapterBank>();
  for (auto& a : adapters) bank->add(a);
  at::Tensor ids = at::randint(0, 61, {6, 9}, at::kLong);
  std::vector<int64_t> choice{2, 0, -1, 3, 1, 3};
  nn::ForwardOptions opts;
  opts.sequence_adapters = at::tensor(choice, at::kLong);
  model->set_adapter(bank);
  at::Tensor batched = model->forward(ids, opts).logits;
  for (int64_t s = 0; s < 6; ++s) {
    model->set_adapter(choice[s] < 0 ? nullptr : adapters[choice[s]]);
    at::Tensor alone = model->forward(ids.narrow(0, s, 1)).logits;
    EXPECT_LE((batched.narrow(0, s, 1) - alone).abs().max().item<double>(), 1e-5)
        << "sequence " << s;
  }
}

TEST(Registry, LoadsOnDemandEvictsLruAndIsThreadSafe) {
  auto model = base_model();
  fs::path root = scratch("registry");
  for (int k = 0; k < 4; ++k) {
    auto a = make_lora(*model, {2 + k, 4, 0.0, false, {"q_proj"}}, k);
    save_adapter(*a, (root / ("a" + std::to_string(k))).string());
  }
  AdapterRegistry registry({root.string(), 2}, *model);
  std::vector<std::thread> threads;
  std::vector<int64_t> ranks(8);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] { ranks[t] = registry.get("a" + std::to_string(t % 2))->rank(); });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(ranks[t], 2 + t % 2);
  EXPECT_EQ(registry.loads(), 2);  // each loaded once despite 8 concurrent requests
  registry.get("a2");
  EXPECT_EQ(registry.resident().size(), 2u);
  EXPECT_EQ(registry.resident().front(), "a2");
  EXPECT_THROW(registry.get("missing"), NotFound);
  EXPECT_THROW(registry.get("../etc"), InvalidArgument);
  fs::remove_all(root);
}

TEST(Training, OnlyAdapterParametersMove) {
  auto model = base_model();
  MosConfig c;
  c.target_modules = {"q_proj", "v_proj"};
  auto mos = make_mos(*model, c);
  model->set_adapter(mos);
  at::Tensor w = model->parameter("model.layers.0.self_attn.q_proj.weight").clone();
  nn::TrainerOptions o;
  o.steps = 5;
  o.lr = 1e-2;
  nn::Trainer trainer(*model, o, nullptr, mos->trainable());
  at::Tensor ids = at::randint(0, 61, {2, 9}, at::kLong);
  double first = 0, last = 0;
  for (int s = 0; s < 5; ++s) {
    last = trainer.step(ids.narrow(1, 0, 8), ids.narrow(1, 1, 8)).loss;
    if (s == 0) first = last;
  }
  EXPECT_LT(last, first);
  EXPECT_TRUE(at::equal(model->parameter("model.layers.0.self_attn.q_proj.weight"), w));
}

// An input of the wrong width reaches LibTorch's matmul inside the adapter;
// the caller sees a tessera::Error naming the adapter, not a c10::Error.
TEST(Errors, LibTorchErrorsSurfaceAsTesseraErrors) {
  auto model = base_model();
  auto adapter = make_lora(*model, {4, 8, 0.0, false, {"q_proj"}});
  randomize(*adapter, 2);
  const std::string name = "model.layers.0.self_attn.q_proj";
  try {
    adapter->apply(name, at::ones({1, 2, 7}), at::ones({1, 2, 32}), {});
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("lora Adapter::apply"), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "non-tessera error: " << e.what();
  }
}

}  // namespace
}  // namespace tessera::lora
