// Int4 packing and the quantized GEMM kernels: every instruction-set path
// against an fp64 computation of what the codes stand for, batch
// invariance, accuracy ordering of the modes, bad input, packed models.
#include "tessera/quant/quant.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "tessera/core/error.h"
#include "tessera/quant/model.h"

namespace fs = std::filesystem;

namespace tessera::quant {
namespace {

std::vector<Isa> isas() {
  std::vector<Isa> out;
  for (Isa i : {Isa::kReference, Isa::kAvx2, Isa::kAvx512}) {
    if (isa_supported(i)) out.push_back(i);
  }
  return out;
}

// Activations quantized per token and per group of `group` inputs,
// symmetric, written independently of the library with ATen ops: codes =
// round-half-even(x * qmax / amax) clamped to [-qmax, qmax], scale =
// amax / qmax. Returns the codes and the dequantized activations.
std::pair<at::Tensor, at::Tensor> reference_activations(const at::Tensor& x, int64_t group,
                                                        Mode mode) {
  const double qmax = mode == Mode::kW4A8 ? 127.0 : 7.0;
  at::Tensor xg = x.to(at::kFloat).view({x.size(0), -1, group});
  at::Tensor amax = xg.abs().amax(-1, /*keepdim=*/true);
  at::Tensor inv = at::where(amax > 0, qmax / amax, at::zeros_like(amax));
  at::Tensor codes = at::round(xg * inv).clamp(-qmax, qmax);
  at::Tensor deq = codes.to(at::kDouble) * (amax / static_cast<float>(qmax)).to(at::kDouble);
  return {codes.view({x.size(0), -1}).to(at::kChar), deq.view({x.size(0), -1})};
}

// y = x W^T in fp64 from the weight codes, with activations treated as each
// mode treats them: bf16-rounded (W4A16) or quantized per token and group
// (reference_activations).
at::Tensor expected(const at::Tensor& x, const QuantizedWeight& w, Mode mode) {
  at::Tensor wd = dequantize(w).to(at::kDouble);
  if (mode == Mode::kW4A16) return at::matmul(x.to(at::kBFloat16).to(at::kDouble), wd.t());
  return at::matmul(reference_activations(x, w.config.group_size, mode).second, wd.t());
}

// Bound on fp32 accumulation error: a few ulps of the sum of |terms|.
at::Tensor bound(const at::Tensor& x, const QuantizedWeight& w) {
  return at::matmul(x.abs().to(at::kDouble), dequantize(w).abs().to(at::kDouble).t()) * 2e-6 +
         1e-30;
}

TEST(Kernels, EveryPathMatchesTheCodesOnRandomAndRaggedShapes) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const std::vector<std::array<int64_t, 4>> shapes = {
      // M, N, K, group
      {1, 1, 64, 64},    {3, 7, 128, 64}, {5, 33, 192, 64},  {17, 9, 256, 128},
      {4, 16, 384, 128}, {9, 5, 640, 64}, {2, 70, 128, 128}, {31, 3, 64, 64}};
  for (const auto& [M, N, K, group] : shapes) {
    for (bool symmetric : {true, false}) {
      at::Tensor wt = at::randn({N, K}, gen) * 0.05 + (symmetric ? 0.0 : 0.01);
      at::Tensor x = at::randn({M, K}, gen);
      x.select(1, 0).mul_(8);  // an outlier channel
      QuantizedWeight q = quantize(wt, {group, symmetric});
      for (Mode mode : {Mode::kW4A16, Mode::kW4A8, Mode::kW4A4}) {
        at::Tensor want = expected(x, q, mode);
        at::Tensor tol = bound(x, q);
        for (Isa isa : isas()) {
          at::Tensor got = linear(x, q, mode, isa).to(at::kDouble);
          at::Tensor err = (got - want).abs();
          EXPECT_TRUE((err <= tol * 4 + 1e-6).all().item<bool>())
              << isa_name(isa) << " " << mode_name(mode) << " M" << M << " N" << N << " K" << K
              << " g" << group << (symmetric ? " sym" : " asym") << ": max error "
              << err.max().item<double>();
        }
      }
    }
  }
}

// The library's activation quantization equals the independent reference,
// code for code (the kernels above are checked against the reference).
TEST(Kernels, ActivationCodesEqualTheReference) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  at::Tensor x = at::randn({13, 192}, gen) * 3;
  x.select(1, 5).mul_(20);
  for (Mode mode : {Mode::kW4A8, Mode::kW4A4}) {
    QuantizedActivations qa = quantize_activations(x, 64, mode);
    EXPECT_TRUE(at::equal(qa.codes, reference_activations(x, 64, mode).first)) << mode_name(mode);
  }
}

TEST(Kernels, EachTokenIsIndependentOfItsBatch) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  QuantizedWeight q = quantize(at::randn({37, 256}, gen), {64, false});
  at::Tensor x = at::randn({11, 256}, gen);
  for (Isa isa : isas()) {
    for (Mode mode : {Mode::kW4A16, Mode::kW4A8, Mode::kW4A4}) {
      at::Tensor all = linear(x, q, mode, isa);
      for (int64_t m = 0; m < 11; ++m) {
        at::Tensor one = linear(x.narrow(0, m, 1), q, mode, isa);
        EXPECT_TRUE(at::equal(one, all.narrow(0, m, 1)))
            << isa_name(isa) << " " << mode_name(mode) << " token " << m;
        at::Tensor three = linear(
            x.narrow(0, std::max<int64_t>(0, m - 2), std::min<int64_t>(3, m + 1)), q, mode, isa);
        EXPECT_TRUE(at::equal(three.narrow(0, three.size(0) - 1, 1), all.narrow(0, m, 1)));
      }
    }
  }
}

TEST(Rotation, HadamardIsItsOwnInverseAndKeepsNorms) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4);
  at::Tensor x = at::randn({5, 192}, gen);
  at::Tensor r = hadamard_rotate(x);
  EXPECT_TRUE(at::allclose(hadamard_rotate(r), x, 1e-5, 1e-5));
  EXPECT_NEAR(r.norm().item<double>(), x.norm().item<double>(), 1e-3);
  // A spike becomes flat: e_0 H = (1/8, ..., 1/8) in its block.
  at::Tensor e = at::zeros({1, 64});
  e[0][0] = 1;
  EXPECT_TRUE(at::allclose(hadamard_rotate(e), at::full({1, 64}, 0.125f)));
  EXPECT_THROW(hadamard_rotate(at::zeros({2, 96})), InvalidArgument);
}

TEST(Rotation, RotatedWeightsRunOnEveryPathAndHelpWithOutliers) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  at::Tensor w = at::randn({48, 256}, gen) * 0.05;
  at::Tensor x = at::randn({9, 256}, gen);
  x.select(1, 5).mul_(20);  // an outlier channel inside a group
  x.select(1, 130).mul_(-15);
  at::Tensor ref = at::matmul(x, w.t());
  QuantizedWeight plain = quantize(w, {64, true, false});
  QuantizedWeight rot = quantize(w, {64, true, true});
  // dequantize returns the original basis.
  EXPECT_LT(((dequantize(rot) - w).norm() / w.norm()).item<double>(), 0.2);
  for (Mode mode : {Mode::kW4A16, Mode::kW4A8, Mode::kW4A4}) {
    at::Tensor want = linear(x, rot, mode, Isa::kReference);
    for (Isa isa : isas()) {
      at::Tensor got = linear(x, rot, mode, isa);
      EXPECT_TRUE(at::allclose(got, want, 1e-4, 1e-3)) << isa_name(isa) << " " << mode_name(mode);
      EXPECT_TRUE(at::equal(linear(x.narrow(0, 2, 1), rot, mode, isa), got.narrow(0, 2, 1)))
          << "batch invariance, " << isa_name(isa) << " " << mode_name(mode);
    }
  }
  auto err = [&](const QuantizedWeight& q, Mode m) {
    return ((linear(x, q, m) - ref).norm() / ref.norm()).item<double>();
  };
  std::printf("W4A4 error: plain %.4f, rotated %.4f; W4A16: plain %.4f, rotated %.4f\n",
              err(plain, Mode::kW4A4), err(rot, Mode::kW4A4), err(plain, Mode::kW4A16),
              err(rot, Mode::kW4A16));
  EXPECT_LT(err(rot, Mode::kW4A4), err(plain, Mode::kW4A4));
}

TEST(Quantize, CodesStayWithinHalfAStepAndPackAsDocumented) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  at::Tensor w = at::randn({6, 128}, gen);
  for (bool symmetric : {true, false}) {
    QuantizedWeight q = quantize(w, {64, symmetric});
    ASSERT_EQ(q.codes.sizes(), (std::vector<int64_t>{6, 64}));
    ASSERT_EQ(q.scales.sizes(), (std::vector<int64_t>{6, 2}));
    at::Tensor step = q.scales.repeat_interleave(64, 1);
    EXPECT_TRUE(((dequantize(q) - w).abs() <= step * 0.5 + 1e-6).all().item<bool>());
    if (symmetric) {
      EXPECT_TRUE((q.zeros == 8).all().item<bool>());
    }
  }
  // Byte j of a 64-block: input j low, input j + 32 high.
  at::Tensor ramp = (at::arange(64, at::kFloat) % 16 - 8).view({1, 64});
  QuantizedWeight q = quantize(ramp, {64, true});
  const float s = q.scales.item<float>();
  EXPECT_FLOAT_EQ(s, 8.f / 7.f);
  at::Tensor d = dequantize(q);
  EXPECT_TRUE(((d - ramp).abs() <= s / 2 + 1e-6).all().item<bool>());
  const uint8_t b0 = q.codes[0][0].item<uint8_t>();
  const int code0 = static_cast<int>(std::lround(-8 / s)) + 8, code32 = code0;
  EXPECT_EQ(b0 & 0x0F, std::clamp(code0, 0, 15));
  EXPECT_EQ(b0 >> 4, std::clamp(code32, 0, 15));
}

TEST(Quantize, BadShapesAndGroupSizesAreNamed) {
  auto expect_error = [](auto fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no error, expected one mentioning '" << needle << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error([] { quantize(at::zeros({4, 128}), {48, true}); }, "multiple of 64");
  expect_error([] { quantize(at::zeros({4, 100}), {64, true}); }, "does not divide the 100");
  expect_error([] { quantize(at::zeros({4, 192}), {128, true}); }, "does not divide the 192");
  expect_error([] { quantize(at::zeros({128}), {64, true}); }, "2-D");
  QuantizedWeight q = quantize(at::zeros({4, 128}), {64, true});
  expect_error([&] { linear(at::zeros({2, 64}), q, Mode::kW4A16); }, "128 input features");
  expect_error([] { parse_mode("w3a3"); }, "w3a3");
}

TEST(Accuracy, ModesOrderAsExpectedOnAStructuredLayer) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  at::Tensor w = at::randn({64, 512}, gen) * 0.02;
  at::Tensor x = at::randn({32, 512}, gen);
  at::Tensor ref = at::matmul(x, w.t());
  QuantizedWeight q = quantize(w, {64, false});
  auto rel = [&](Mode m) { return ((linear(x, q, m) - ref).norm() / ref.norm()).item<double>(); };
  const double e16 = rel(Mode::kW4A16), e8 = rel(Mode::kW4A8), e4 = rel(Mode::kW4A4);
  EXPECT_LT(e16, 0.12);
  EXPECT_LE(e16, e8 * 1.01);
  EXPECT_LT(e8, e4);
  std::printf("relative error on a structured layer: W4A16 %.4f, W4A8 %.4f, W4A4 %.4f\n", e16, e8,
              e4);
  EXPECT_LT(e4, 0.2);
}

nn::ModelConfig tiny() {
  nn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 96;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  return c;
}

fs::path scratch(const std::string& name) {
  fs::path p =
      fs::path(::testing::TempDir()) / ("tessera_quant_" + std::to_string(getpid()) + "_" + name);
  fs::remove_all(p);
  return p;
}

TEST(PackedModel, SaveLoadGivesTheSameLogitsInEveryMode) {
  nn::Transformer model(tiny());
  model.init_random(4);
  auto packed = QuantizedModel::pack(model, {64, false});
  EXPECT_EQ(packed->weights().size(), 2u * 7u + 1u);  // 7 linears per layer + lm_head
  model.set_linear_override(packed);
  at::Tensor ids = at::randint(96, {2, 9}, at::kLong);
  const fs::path file = scratch("model.safetensors");
  packed->save(file.string(), model);
  auto loaded = QuantizedModel::load(file.string());
  for (Mode m : {Mode::kW4A16, Mode::kW4A8, Mode::kW4A4, Mode::kFloat}) {
    packed->set_mode(m);
    loaded.packed->set_mode(m);
    at::Tensor a = model.forward(ids).logits, b = loaded.model.forward(ids).logits;
    if (m == Mode::kFloat) {
      // The loaded model's fp weights are the dequantized codes (not the
      // original weights, which the file does not hold): exactly, layer by
      // layer, and its fp forward is close to its own W4A16 forward.
      for (const std::string layer :
           {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}) {
        EXPECT_TRUE(at::equal(loaded.model.parameter(layer + ".weight"),
                              dequantize(packed->weight(layer)).to(at::kFloat)))
            << layer;
        EXPECT_FALSE(at::equal(loaded.model.parameter(layer + ".weight"),
                               model.parameter(layer + ".weight")))
            << layer;
      }
      loaded.packed->set_mode(Mode::kW4A16);
      EXPECT_TRUE(at::allclose(b, loaded.model.forward(ids).logits, 0.05, 0.05));
    } else {
      EXPECT_TRUE(at::equal(a, b)) << mode_name(m);
    }
  }
  // A modified version and a truncated file are refused by name.
  const fs::path v9 = scratch("v9.safetensors"), cut = scratch("cut.safetensors");
  {
    std::ifstream in(file, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    std::string v2 = bytes;
    auto at = v2.find("\"version\":\"1\"");
    ASSERT_NE(at, std::string::npos);
    v2[at + 11] = '9';
    std::ofstream(v9, std::ios::binary) << v2;
    std::ofstream(cut, std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  try {
    QuantizedModel::load(v9.string());
    ADD_FAILURE() << "version 9 accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("version 9"), std::string::npos) << e.what();
  }
  try {
    QuantizedModel::load(cut.string());
    ADD_FAILURE() << "truncated file accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cut.safetensors"), std::string::npos) << e.what();
  }
}

TEST(PackedModel, SmoothingMovesOutliersIntoTheWeights) {
  nn::Transformer model(tiny());
  model.init_random(9);
  {
    // Outlier channels: a few norm weights far above the rest.
    at::NoGradGuard g;
    for (int64_t l = 0; l < 2; ++l) {
      for (const char* n : {"input_layernorm", "post_attention_layernorm"}) {
        at::Tensor w = model.parameter("model.layers." + std::to_string(l) + "." + n + ".weight");
        w.narrow(0, 3, 2).fill_(25.0);
      }
    }
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2);
  std::vector<std::vector<int64_t>> calib;
  for (int i = 0; i < 8; ++i) {
    at::Tensor ids = at::randint(96, {24}, gen, at::kLong);
    calib.emplace_back(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + 24);
  }
  at::Tensor ids = at::randint(96, {4, 16}, gen, at::kLong);
  at::Tensor ref = model.forward(ids).logits;
  auto plain = QuantizedModel::pack(model, {64, false});
  auto smooth = QuantizedModel::pack(model, {64, false}, calib, 0.5);
  EXPECT_EQ(smooth->smoothing().size(), smooth->weights().size());
  auto error = [&](const std::shared_ptr<QuantizedModel>& q, Mode m) {
    model.set_linear_override(q);
    ScopedMode mode(*q, m);
    at::Tensor got = model.forward(ids).logits;
    model.set_linear_override(nullptr);
    return ((got - ref).norm() / ref.norm()).item<double>();
  };
  const double plain4 = error(plain, Mode::kW4A4), smooth4 = error(smooth, Mode::kW4A4);
  std::printf("W4A4 logits error: plain %.4f, smoothed %.4f; W4A16: plain %.4f, smoothed %.4f\n",
              plain4, smooth4, error(plain, Mode::kW4A16), error(smooth, Mode::kW4A16));
  EXPECT_LT(smooth4, plain4);
  // Smoothing survives a save/load round trip.
  model.set_linear_override(smooth);
  const fs::path file = scratch("smooth.safetensors");
  smooth->save(file.string(), model);
  auto loaded = QuantizedModel::load(file.string());
  EXPECT_EQ(loaded.packed->smoothing().size(), smooth->smoothing().size());
  for (Mode m : {Mode::kW4A16, Mode::kW4A4}) {
    smooth->set_mode(m);
    loaded.packed->set_mode(m);
    EXPECT_TRUE(at::equal(model.forward(ids).logits, loaded.model.forward(ids).logits))
        << mode_name(m);
  }
  // The loaded model's own fp32 weights are the dequantized ones, smoothing undone.
  loaded.packed->set_mode(Mode::kFloat);
  EXPECT_LT(((loaded.model.forward(ids).logits - ref).norm() / ref.norm()).item<double>(),
            0.35);  // about the W4A16 error above
  EXPECT_THROW(QuantizedModel::pack(model, {64, false}, {}, 0.5), InvalidArgument);
  EXPECT_THROW(QuantizedModel::pack(model, {64, false}, calib, 1.5), InvalidArgument);
}

TEST(PackedModel, GroupSizeThatDoesNotFitALayerNamesIt) {
  nn::Transformer model(tiny());
  try {
    QuantizedModel::pack(model, {128, true});
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.q_proj"), std::string::npos)
        << e.what();
  }
}

// The default group size (0) picks the largest of 128 and 64 that fits every
// layer: 64 for SmolLM2-135M's widths (576, 1536), 128 for multiples of 128;
// widths that are not multiples of 64 are refused with the widths named.
TEST(QuantConfig, DefaultGroupSizeFitsEveryLoadableModel) {
  EXPECT_EQ(resolve_group_size({}, {576, 1536}).group_size, 64);
  EXPECT_EQ(resolve_group_size({}, {256, 1024}).group_size, 128);
  EXPECT_EQ(resolve_group_size({192, true}, {192}).group_size, 192);  // explicit sizes are kept
  try {
    resolve_group_size({}, {576, 100});
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("576, 100"), std::string::npos) << e.what();
  }
  // A SmolLM2-shaped model packs with the default config.
  nn::ModelConfig c = tiny();
  c.hidden_size = 576;
  c.intermediate_size = 1536;
  c.num_attention_heads = 9;
  c.num_key_value_heads = 3;
  c.num_hidden_layers = 1;
  nn::Transformer model(c);
  model.init_random(2);
  auto packed = QuantizedModel::pack(model, QuantConfig{});
  EXPECT_EQ(packed->config().group_size, 64);
  EXPECT_EQ(packed->weights().at("model.layers.0.mlp.down_proj").config.group_size, 64);
}

// An input of the wrong width meets the smoothing factors in LibTorch before
// the kernel's own check: the caller sees a tessera::Error naming the call.
TEST(Errors, LibTorchErrorsSurfaceAsTesseraErrors) {
  nn::Transformer model(tiny());
  model.init_random(1);
  auto packed = QuantizedModel::pack(model, QuantConfig{}, {{1, 2, 3, 4, 5}}, 0.5);
  try {
    packed->linear("model.layers.0.mlp.down_proj", at::ones({2, 7}));
    ADD_FAILURE();
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("INVALID_ARGUMENT: QuantizedModel::linear: ", 0), 0u)
        << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "non-tessera error: " << e.what();
  }
}

}  // namespace
}  // namespace tessera::quant
