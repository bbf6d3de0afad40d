// The 3D-HybridEngine transition on real ranks, for every (t, d, t_g) the
// world allows and several weight shapes: each rank's generation shard must
// equal the full weight's slice exactly, and the bytes it received must equal
// (d_g - 1) / t of the weight.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include "test_main.h"

#include "tessera/core/runtime.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/rlhf/hybrid_engine.h"

namespace tessera::rlhf {
namespace {

std::shared_ptr<dist::ProcessGroup> g_world;

TEST(HybridEngineTransition, GenerationShardsEqualTheFullWeightsSlices) {
  const int world = g_world->size(), me = g_world->rank();
  int checked = 0;
  for (int t = 1; t <= world; ++t) {
    if (world % t) continue;
    for (int tg = 1; tg <= t; ++tg) {
      if (t % tg) continue;
      HybridEngineGroups g = hybrid_engine_groups(world, t, tg);
      auto micro = make_micro_dp_group(*g_world, g);
      for (auto [rows, cols] :
           std::vector<std::pair<int64_t, int64_t>>{{8, 5}, {24, 64}, {4 * 96, 33}}) {
        SCOPED_TRACE(testing::Message() << "t=" << t << " d=" << world / t << " t_g=" << tg
                                        << " weight " << rows << "x" << cols);
        auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(rows * 7 + cols));
        at::Tensor full = at::randn({rows, cols}, gen);  // the same on every rank
        const int64_t block = rows / t;
        at::Tensor local = full.narrow(0, (me % t) * block, block).clone();
        int64_t received = 0;
        at::Tensor shard = gather_generation_shard(local, micro, &received);
        const int64_t gen_rows = rows / tg;
        EXPECT_TRUE(at::equal(shard, full.narrow(0, g.gen_tp_rank(me) * gen_rows, gen_rows)));
        EXPECT_EQ(received, hybrid_engine_bytes_per_rank(full.nbytes(), t, tg));
        EXPECT_EQ(shard.size(0), gen_rows);  // no rank holds more than its generation shard
        ++checked;
      }
    }
  }
  EXPECT_GE(checked, 9);
}

}  // namespace
}  // namespace tessera::rlhf

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  tessera::init_runtime();
  tessera::rlhf::g_world = tessera::dist::init_process_group();
  int result = tessera::testutil::run_all_tests();
  tessera::rlhf::g_world->barrier().wait();
  tessera::rlhf::g_world.reset();
  return result;
}
