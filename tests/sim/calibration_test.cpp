// sim: the calibration's result files (the measurements themselves run on
// real ranks in sim_mp_test).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "tessera/sim/calibration.h"

namespace tessera::sim {
namespace {

// What scripts/sim_calibrate_local.sh reads back: every field, numbers at
// full precision, the job path as a JSON string even when it needs escaping.
TEST(Calibration, HostSharingJson) {
  HostSharing h;
  h.compute_slowdown = {1.0, 1.0312345678, 1.61, 2.2};
  h.sync_skew = {0.0, 0.021, 0.04, 0.05};
  h.lockstep_slowdown = {1.0, 1.09, 1.7, 2.3};
  h.lockstep_ratio = {1.0, 1.06, 1.05, 1.04};
  h.sync_us = {0.0, 850.5, 0.0, 1200.0};
  h.comm_load = {{4096, 0.65}, {8 << 20, 0.97}};
  h.comm_load_slowdown = {1.39, 1.63};
  h.busy_slowdown = 1.66;
  h.foreign_cpu = {0.01, 0.2};
  h.repeats_kept = 7;
  const std::string job = R"(jobs/a "quoted" \dense.json)";
  const nlohmann::json j = nlohmann::json::parse(host_sharing_to_json(h, job));
  EXPECT_EQ(j.at("schema"), "tessera.sim.host_sharing/1");
  EXPECT_EQ(j.at("job"), job);
  EXPECT_EQ(j.at("compute_slowdown").get<std::vector<double>>(), h.compute_slowdown);
  EXPECT_EQ(j.at("sync_skew").get<std::vector<double>>(), h.sync_skew);
  EXPECT_EQ(j.at("lockstep_slowdown").get<std::vector<double>>(), h.lockstep_slowdown);
  EXPECT_EQ(j.at("lockstep_ratio").get<std::vector<double>>(), h.lockstep_ratio);
  EXPECT_EQ(j.at("sync_us").get<std::vector<double>>(), h.sync_us);
  ASSERT_EQ(j.at("comm_load").size(), 2u);
  EXPECT_EQ(j.at("comm_load")[1].at("bytes"), 8 << 20);
  EXPECT_EQ(j.at("comm_load")[1].at("load"), 0.97);
  EXPECT_EQ(j.at("comm_load_slowdown").get<std::vector<double>>(), h.comm_load_slowdown);
  EXPECT_EQ(j.at("busy_slowdown"), 1.66);
  EXPECT_EQ(j.at("foreign_cpu").get<std::vector<double>>(), h.foreign_cpu);
  EXPECT_EQ(j.at("repeats_kept"), 7);
}

}  // namespace
}  // namespace tessera::sim
