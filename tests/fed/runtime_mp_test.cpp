// The runtime with real processes: this test is the server, and spawned
// copies of it are language-model clients (a tiny Mixtral on the domain
// corpora). A client killed mid-round is dropped, the round completes with
// the others (its experts served from the server's copy), and the client,
// restarted, restores its saved model and takes part in the next round.
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "tessera/core/error.h"
#include "tessera/core/runtime.h"
#include "tessera/fed/experiment.h"
#include "test_main.h"

namespace tessera::fed {
namespace {

std::string testdata_dir() { return std::string(TESSERA_SOURCE_DIR) + "/../shared/testdata"; }

ExperimentOptions tiny_options() {
  ExperimentOptions o;
  o.clients = 3;
  o.rounds = 3;
  o.alpha = 1.0;
  o.seed = 11;
  nn::ModelConfig m = small_fed_config(257);
  m.hidden_size = 32;
  m.intermediate_size = 64;
  m.num_attention_heads = 2;
  m.num_key_value_heads = 1;
  m.max_position_embeddings = 64;
  o.model = m;
  o.local_steps = 3;
  o.batch = 4;
  o.seq_len = 32;
  o.eval_windows = 2;
  o.tokens_per_client = 16 * 128;
  o.block_tokens = 128;
  o.sources = default_sources(TESSERA_SOURCE_DIR, testdata_dir());
  o.sources.max_tokens = 40000;
  o.sources.arithmetic_examples = 4000;
  return o;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(RuntimeProcesses, KilledClientIsDroppedAndRejoinsNextRound) {
  if (!std::filesystem::exists(testdata_dir() + "/text/moby-dick.txt")) {
    GTEST_SKIP() << "shared test data not found at " << testdata_dir();
  }
  const ExperimentOptions o = tiny_options();
  const ExperimentSetup setup = prepare_experiment(o);

  const std::string work =
      (std::filesystem::temp_directory_path() / ("tessera-fed-mp-test-" + std::to_string(getpid())))
          .string();
  std::filesystem::remove_all(work);
  std::atomic<pid_t> victim{-1};
  std::atomic<bool> killed{false};
  ServerOptions so;
  so.enrollment_key = "mp-test-enrollment-key-0123456789";
  so.client_timeout = std::chrono::seconds(3);
  so.heartbeat_interval = std::chrono::milliseconds(300);
  so.poll_wait = std::chrono::milliseconds(300);
  so.phase_timeout = std::chrono::seconds(120);
  // Client 1 dies as soon as it has its round-2 fit payload.
  so.on_event = [&](const TaskEvent& e) {
    if (e.client == 1 && e.round == 2 && e.fit && e.what == TaskEvent::What::kStarted &&
        !killed.exchange(true)) {
      ::kill(victim.load(), SIGKILL);
    }
  };
  FedMoEDAOptions da;
  da.domain_aware.neighbours = 11;  // every expert of every client: client 1's are always needed
  da.domain_aware.temperature = 0.2;
  Server server(so, std::make_unique<FedMoEDA>(da), setup.initial);

  LauncherOptions lo;
  lo.server_address = server.address();
  lo.enrollment_key = so.enrollment_key;
  lo.work_dir = work;
  lo.specs = setup.specs;
  ClientLauncher launcher(lo);
  victim = launcher.pid(1);
  auto logs = [&] {
    std::string all;
    for (int c = 0; c < launcher.size(); ++c)
      all += "--- " + launcher.log_path(c) + "\n" + read_all(launcher.log_path(c));
    return all;
  };
  ASSERT_NO_THROW(server.wait_for_clients(3, std::chrono::seconds(120))) << logs();

  const RoundRecord r1 = server.run_round();
  EXPECT_EQ(r1.fit.size(), 3u) << logs();
  EXPECT_EQ(r1.evaluate.size(), 3u);
  EXPECT_GT(r1.peer_bytes(), 0);
  for (const ClientReport& r : r1.evaluate) {
    EXPECT_TRUE(std::isfinite(r.loss));
    EXPECT_TRUE(r.metrics.count("loss_cantonese"));
  }

  const RoundRecord r2 = server.run_round();
  EXPECT_TRUE(killed);
  ASSERT_EQ(r2.fit_failures.size(), 1u) << logs();
  EXPECT_EQ(r2.fit_failures[0].client, 1);
  EXPECT_NE(r2.fit_failures[0].reason.find("no heartbeat"), std::string::npos)
      << r2.fit_failures[0].reason;
  ASSERT_EQ(r2.fit.size(), 2u);
  EXPECT_EQ(r2.fit[0].client, 0);
  EXPECT_EQ(r2.fit[1].client, 2);
  ASSERT_EQ(r2.evaluate.size(), 2u) << logs();
  EXPECT_TRUE(r2.evaluate_failures.empty());
  // Clients 0 and 2 took client 1's 2 x 4 experts from the server's copy.
  EXPECT_EQ(r2.fallbacks, 16);
  for (const auto& [link, bytes] : r2.peer_links) EXPECT_NE(link.first, 1);

  EXPECT_FALSE(launcher.running(1));
  launcher.restart(1);
  ASSERT_NO_THROW(server.wait_for_clients(3, std::chrono::seconds(120))) << logs();
  const RoundRecord r3 = server.run_round();
  ASSERT_EQ(r3.fit.size(), 3u) << logs();
  EXPECT_TRUE(r3.fit_failures.empty());
  EXPECT_EQ(r3.fit[1].client, 1);
  EXPECT_EQ(r3.fit[1].metrics.count("restored"), 1u) << "client 1 did not restore its saved model";
  EXPECT_EQ(r3.evaluate.size(), 3u);
  EXPECT_EQ(r3.fallbacks, 0);
  bool from_1 = false;
  for (const auto& [link, bytes] : r3.peer_links) from_1 |= link.first == 1 && bytes > 0;
  EXPECT_TRUE(from_1) << "nobody fetched the restarted client's experts from it";

  server.shutdown(std::chrono::seconds(20));
  const std::vector<ExitStatus> exits = launcher.wait(std::chrono::seconds(30));
  for (size_t c = 0; c < exits.size(); ++c)
    EXPECT_TRUE(exits[c].success()) << c << ": " << exits[c].describe();
  std::filesystem::remove_all(work);
}

}  // namespace
}  // namespace tessera::fed

int main(int argc, char** argv) {
  if (auto code = tessera::fed::run_client_if_spawned(tessera::fed::language_model_app))
    return *code;
  tessera::init_runtime();
  ::testing::InitGoogleTest(&argc, argv);
  return tessera::testutil::run_all_tests();
}
