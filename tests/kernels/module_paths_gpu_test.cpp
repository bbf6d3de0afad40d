// The modules' GPU paths against their CPU paths, where a CUDA device is
// present: nn::moe_mixture (kernels/moe's sort, gather and combine) and
// lora::AdapterBank (kernels/lora's gathered shrink/expand) give the CPU
// results on random inputs with ragged sizes. Skipped without a device.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/grad_mode.h>  // at::NoGradGuard (not in ATen.h since LibTorch 2.x)
#include <gtest/gtest.h>

#include "tessera/lora/lora.h"
#include "tessera/nn/moe_mixture.h"

namespace tessera {
namespace {

bool have_device() { return at::hasCUDA(); }

TEST(GpuPaths, MoeMixtureMatchesTheCpuPath) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(3);
  for (auto [N, H, E, K] : std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>{
           {1, 64, 4, 2}, {37, 96, 8, 2}, {513, 128, 16, 4}}) {
    at::Tensor x = at::randn({N, H});
    at::Tensor top_e = at::randint(E, {N, K}, at::kLong);
    at::Tensor top_w = at::rand({N, K});
    at::Tensor maps = at::randn({E, H, H}) / 8;
    auto run = [&](const at::Device& d) {
      at::NoGradGuard no_grad;
      at::Tensor m = maps.to(d);
      return nn::moe_mixture(
                 x.to(d), top_e.to(d), top_w.to(d), E,
                 [&](int64_t e, const at::Tensor& rows) { return at::matmul(rows, m[e]); })
          .cpu();
    };
    EXPECT_TRUE(at::allclose(run(at::kCUDA), run(at::kCPU), 1e-4, 1e-5)) << N << " tokens";
  }
}

TEST(GpuPaths, AdapterBankMatchesTheCpuPath) {
  if (!have_device()) GTEST_SKIP() << "no CUDA device";
  nn::ModelConfig c;
  c.model_type = "llama";
  c.vocab_size = 64;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  nn::Transformer model(c);
  model.init_random(1);
  lora::AdapterBank bank;
  for (int64_t rank : {4, 8, 16}) {
    auto a = lora::make_lora(model, {rank, 16, 0.0, false, {"q_proj", "down_proj"}}, rank);
    at::NoGradGuard g;
    for (auto& t : a->trainable()) t.copy_(at::randn(t.sizes()) * 0.1);
    bank.add(a);
  }
  at::Tensor ids = at::tensor({2, -1, 0, 1, 2}, at::kLong);
  for (auto [name, in, out] : std::vector<std::tuple<std::string, int64_t, int64_t>>{
           {"model.layers.0.self_attn.q_proj", 64, 64}, {"model.layers.0.mlp.down_proj", 96, 64}}) {
    at::Tensor x = at::randn({5, 7, in}), y = at::randn({5, 7, out});
    nn::AdapterContext ctx;
    at::NoGradGuard no_grad;
    ctx.sequence_adapters = ids;
    at::Tensor cpu = bank.apply(name, x, y, ctx);
    ctx.sequence_adapters = ids.to(at::kCUDA);
    at::Tensor gpu = bank.apply(name, x.to(at::kCUDA), y.to(at::kCUDA), ctx).cpu();
    EXPECT_TRUE(at::allclose(gpu, cpu, 1e-4, 1e-5)) << name;
  }
}

}  // namespace
}  // namespace tessera
