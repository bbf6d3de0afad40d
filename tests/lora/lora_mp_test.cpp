// Adapters trained data parallel on real ranks (tessera-launch --nproc 2):
// the pools' gradients are averaged like any parameter, so dp=2 equals one
// rank on the global batch.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "test_main.h"

#include "tessera/core/runtime.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/lora/lora.h"
#include "tessera/nn/train.h"

namespace tessera::lora {
namespace {

std::shared_ptr<dist::ProcessGroup> g_world;

TEST(DataParallelAdapters, MosAndLoraEqualOneRankOnTheGlobalBatch) {
  nn::ModelConfig c;
  c.vocab_size = 61;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  const int me = g_world->rank(), n = g_world->size();
  for (const std::string kind : {"lora", "mos"}) {
    SCOPED_TRACE(kind);
    auto run = [&](std::shared_ptr<dist::ProcessGroup> dp, int64_t local, int rank, int world) {
      nn::Transformer model(c);
      model.init_random(3);
      std::shared_ptr<Adapter> adapter;
      if (kind == "lora") {
        adapter = make_lora(model, {4, 8, 0.0, false, {"q_proj", "v_proj", "down_proj"}}, 5);
      } else {
        MosConfig m;
        m.target_modules = {"q_proj", "v_proj", "down_proj"};
        m.seed = 5;
        adapter = make_mos(model, m);
      }
      model.set_adapter(adapter);
      nn::TrainerOptions o;
      o.steps = 4;
      o.lr = 1e-2;
      o.warmup = 1;
      nn::Trainer trainer(model, o, dp, adapter->trainable());
      std::vector<double> losses;
      for (int64_t s = 0; s < o.steps; ++s) {
        auto gen = at::make_generator<at::CPUGeneratorImpl>(100 + s);
        at::Tensor all = at::randint(0, 61, {local * world, 9}, gen, at::kLong);
        at::Tensor mine = all.narrow(0, rank * local, local);
        losses.push_back(trainer.step(mine.narrow(1, 0, 8), mine.narrow(1, 1, 8)).loss);
      }
      std::vector<at::Tensor> params;
      for (auto& t : adapter->trainable()) params.push_back(t.detach().clone());
      return std::make_pair(losses, params);
    };
    auto [want, want_params] = run(nullptr, 2 * n, 0, 1);
    auto [got, got_params] = run(g_world, 2, me, n);
    for (size_t i = 0; i < want.size(); ++i)
      EXPECT_NEAR(got[i], want[i], 1e-5 * std::abs(want[i])) << i;
    for (size_t i = 0; i < want_params.size(); ++i) {
      double scale = std::max(1.0, want_params[i].abs().max().item<double>());
      EXPECT_LE((got_params[i] - want_params[i]).abs().max().item<double>(), 1e-4 * scale) << i;
    }
  }
}

}  // namespace
}  // namespace tessera::lora

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  tessera::init_runtime();
  tessera::lora::g_world = tessera::dist::init_process_group();
  int result = tessera::testutil::run_all_tests();
  tessera::lora::g_world->barrier().wait();
  tessera::lora::g_world.reset();
  return result;
}
