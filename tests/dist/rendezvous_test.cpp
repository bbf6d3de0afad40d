// Store-level rendezvous and process groups whose ranks are threads of this
// process (in-memory store): fast checks of the logic that the multi-process
// tests then run for real.
#include "tessera/dist/rendezvous.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <thread>

#include "tessera/core/error.h"
#include "tessera/dist/device_mesh.h"

namespace tessera::dist {
namespace {

TEST(Rendezvous, AllArrive) {
  auto store = Store::in_memory();
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int r = 0; r < 4; ++r) {
    threads.emplace_back([&, r] {
      rendezvous_barrier(*store, "t", r, 4, std::chrono::seconds(10));
      ok++;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 4);
}

TEST(Rendezvous, TimeoutNamesMissingRanks) {
  auto store = Store::in_memory();
  rendezvous_barrier(*store, "x", 1, 1, std::chrono::seconds(1));  // a world of one: immediate
  std::thread other([&] {
    EXPECT_THROW(rendezvous_barrier(*store, "y", 2, 4, std::chrono::milliseconds(300)),
                 DeadlineExceeded);
  });
  try {
    rendezvous_barrier(*store, "y", 0, 4, std::chrono::milliseconds(300));
    FAIL() << "no throw";
  } catch (const DeadlineExceeded& e) {
    EXPECT_NE(e.message().find("2 of 4 ranks arrived; missing ranks 1, 3"), std::string::npos)
        << e.message();
  }
  other.join();
}

TEST(Rendezvous, DuplicateRankRejected) {
  auto store = Store::in_memory();
  std::thread first([&] {
    EXPECT_THROW(rendezvous_barrier(*store, "d", 0, 2, std::chrono::milliseconds(300)),
                 DeadlineExceeded);
  });
  first.join();
  EXPECT_THROW(rendezvous_barrier(*store, "d", 0, 2, std::chrono::milliseconds(300)),
               InvalidArgument);
}

TEST(EnvInfo, ParsesTorchrunAndSlurmVariables) {
  for (const char* v :
       {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"})
    unsetenv(v);
  EXPECT_FALSE(EnvInfo::from_env().distributed);
  setenv("SLURM_PROCID", "3", 1);
  setenv("SLURM_NTASKS", "8", 1);
  setenv("SLURM_LOCALID", "1", 1);
  setenv("SLURM_NTASKS_PER_NODE", "2(x4)", 1);
  auto slurm = EnvInfo::from_env();
  EXPECT_TRUE(slurm.distributed);
  EXPECT_EQ(slurm.rank, 3);
  EXPECT_EQ(slurm.world_size, 8);
  EXPECT_EQ(slurm.local_rank, 1);
  EXPECT_EQ(slurm.local_world_size, 2);
  setenv("RANK", "9", 1);  // torchrun's variables win over Slurm's; 9 >= 8
  try {
    EnvInfo::from_env();
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("RANK='9'"), std::string::npos) << e.message();
  }
  setenv("RANK", "1", 1);
  setenv("WORLD_SIZE", "2", 1);
  setenv("MASTER_PORT", "http", 1);
  EXPECT_THROW(EnvInfo::from_env(), InvalidArgument);
  for (const char* v : {"RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                        "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"})
    unsetenv(v);
}

// Runs fn(rank, group) on `world` threads sharing one in-memory store.
template <typename Fn>
void run_threads(int world, Fn fn) {
  auto store = Store::in_memory();
  std::vector<std::thread> threads;
  std::vector<std::string> errors(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        ProcessGroupOptions opts;
        opts.gloo_address = "127.0.0.1";
        opts.timeout = std::chrono::seconds(30);
        auto group = ProcessGroup::create(store, r, world, opts);
        fn(r, group);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < world; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

TEST(ThreadedGroup, MeshAxesAndSubgroups) {
  run_threads(4, [](int rank, std::shared_ptr<ProcessGroup> world) {
    auto mesh = DeviceMesh::create(world, {{"dp", 2}, {"tp", 2}});
    EXPECT_EQ(mesh.coord("dp"), rank / 2);
    EXPECT_EQ(mesh.coord("tp"), rank % 2);
    at::Tensor t = at::full({3}, static_cast<double>(rank + 1), at::kDouble);
    mesh.group("tp")->all_reduce(t).wait();
    // tp groups {0,1} and {2,3}
    double expect = rank < 2 ? 1 + 2 : 3 + 4;
    EXPECT_TRUE(at::equal(t, at::full({3}, expect, at::kDouble)));
    EXPECT_EQ(mesh.group("dp")->world_ranks(), (std::vector<int>{rank % 2, rank % 2 + 2}));
    auto odd = world->new_subgroup({1, 3});
    EXPECT_EQ(odd != nullptr, rank % 2 == 1);
    EXPECT_THROW(mesh.group("pp"), NotFound);
  });
}

}  // namespace
}  // namespace tessera::dist
