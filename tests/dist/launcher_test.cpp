// tessera-launch end to end: real processes, real signals.
#include "tessera/dist/launcher.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/subprocess.h"

namespace fs = std::filesystem;

namespace tessera::dist {
namespace {

struct Result {
  int exit_code = -1;
  std::string output;
};

// Starts argv with extra environment, output (both streams) to a file.
Subprocess start(const std::vector<std::string>& argv, const std::vector<std::string>& env,
                 const std::string& out_path) {
  SpawnOptions o;
  o.argv = argv;
  for (const auto& e : env) o.env[e.substr(0, e.find('='))] = e.substr(e.find('=') + 1);
  o.stdout_mode = SpawnOptions::Stream::kFile;
  o.stdout_file = out_path;
  o.stderr_mode = SpawnOptions::Stream::kStdout;
  // The launcher must stay in the test's process group so that the signals
  // the tests send reach it alone.
  o.new_process_group = false;
  return Subprocess::spawn(o);
}

Result finish(Subprocess& process, const std::string& out_path, int timeout_s = 60) {
  Result r;
  std::optional<ExitStatus> status = process.wait_for(std::chrono::seconds(timeout_s));
  if (!status) {
    process.signal(SIGKILL);
    process.wait();
    r.output = "TIMED OUT";
    return r;
  }
  r.exit_code = status->shell_code();
  std::ifstream in(out_path);
  std::stringstream ss;
  ss << in.rdbuf();
  r.output = ss.str();
  return r;
}

Result finish(Subprocess&& process, const std::string& out_path, int timeout_s = 60) {
  return finish(process, out_path, timeout_s);
}

bool alive(pid_t pid) {
  if (kill(pid, 0) != 0) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  auto close_paren = line.rfind(')');
  return close_paren == std::string::npos || line.size() < close_paren + 2 ||
         line[close_paren + 2] != 'Z';  // a zombie is dead, only unreaped
}

std::vector<pid_t> recorded_pids(const fs::path& dir) {
  std::vector<pid_t> pids;
  for (const auto& entry : fs::directory_iterator(dir)) {
    std::ifstream in(entry.path());
    pid_t p;
    while (in >> p) pids.push_back(p);
  }
  return pids;
}

void expect_all_gone(const std::vector<pid_t>& pids) {
  // Reparented grandchildren are reaped by init asynchronously.
  for (int i = 0; i < 100; ++i) {
    bool any = false;
    for (pid_t p : pids) any |= alive(p);
    if (!any) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  for (pid_t p : pids) EXPECT_FALSE(alive(p)) << "process " << p << " outlived the launcher";
}

class LauncherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("tessera_launch_" + std::to_string(getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "pids");
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string piddir_env() const { return "TESSERA_TEST_PIDDIR=" + (dir_ / "pids").string(); }
  fs::path dir_;
};

TEST_F(LauncherTest, OneFailingRankStopsAllAndIsNamed) {
  std::string out = (dir_ / "out.txt").string();
  Subprocess launcher = start({TESSERA_LAUNCH_BIN, "--nproc", "4", "--grace", "2", "--",
                               TESSERA_HELPER_BIN, "fail", "2", "3"},
                              {piddir_env()}, out);
  Result r = finish(launcher, out);
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_NE(r.output.find("rank 2 (pid"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("exited with code 3"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("[rank 2] rank 2 failing on purpose"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("3 other ranks were stopped"), std::string::npos) << r.output;
  auto pids = recorded_pids(dir_ / "pids");
  EXPECT_EQ(pids.size(), 8u);  // 4 ranks, each with a child
  expect_all_gone(pids);
}

TEST_F(LauncherTest, InterruptStopsEveryRank) {
  std::string out = (dir_ / "out.txt").string();
  Subprocess launcher =
      start({TESSERA_LAUNCH_BIN, "--nproc", "3", "--grace", "1", "--", TESSERA_HELPER_BIN, "sleep"},
            {piddir_env()}, out);
  for (int i = 0; i < 200 && recorded_pids(dir_ / "pids").size() < 6; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  auto pids = recorded_pids(dir_ / "pids");
  ASSERT_EQ(pids.size(), 6u);
  kill(launcher.pid(), SIGINT);
  Result r = finish(launcher, out);
  EXPECT_EQ(r.exit_code, 130) << r.output;
  expect_all_gone(pids);
}

// --drain-on-signal: SIGTERM still reaches every rank, and the launcher
// returns the ranks' own code (0 after a clean drain, not 130).
TEST_F(LauncherTest, DrainOnSignalReturnsTheRanksCode) {
  for (int code : {0, 5}) {
    SCOPED_TRACE(code);
    fs::remove_all(dir_ / "pids");
    fs::create_directories(dir_ / "pids");
    std::string out = (dir_ / "out.txt").string();
    Subprocess launcher =
        start({TESSERA_LAUNCH_BIN, "--nproc", "2", "--grace", "5", "--drain-on-signal", "--",
               TESSERA_HELPER_BIN, "drain", std::to_string(code)},
              {piddir_env()}, out);
    for (int i = 0; i < 200 && recorded_pids(dir_ / "pids").size() < 4; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    auto pids = recorded_pids(dir_ / "pids");
    ASSERT_EQ(pids.size(), 4u);
    kill(launcher.pid(), SIGTERM);
    Result r = finish(launcher, out);
    EXPECT_EQ(r.exit_code, code) << r.output;
    EXPECT_NE(r.output.find("[rank 1] rank 1 drained"), std::string::npos) << r.output;
    expect_all_gone(pids);
  }
}

TEST_F(LauncherTest, RanksRendezvousAndReduce) {
  std::string out = (dir_ / "out.txt").string();
  Result r = finish(
      start({TESSERA_LAUNCH_BIN, "--nproc", "3", "--", TESSERA_HELPER_BIN, "rendezvous"}, {}, out),
      out);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_NE(r.output.find("[rank " + std::to_string(rank) + "] sum=6"), std::string::npos)
        << r.output;
  }
}

TEST_F(LauncherTest, DeadPeerGivesClearError) {
  std::string out = (dir_ / "out.txt").string();
  Result r = finish(
      start({TESSERA_LAUNCH_BIN, "--nproc", "2", "--", TESSERA_HELPER_BIN, "peer-dies"}, {}, out),
      out);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("caught: "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("all_reduce on group 'world' (rank 0 of 2)"), std::string::npos)
      << r.output;
}

TEST_F(LauncherTest, RendezvousTimeoutNamesMissingRank) {
  // Rank 0 of 2 alone: rendezvous must give up with a clear message.
  std::string out = (dir_ / "out.txt").string();
  auto started = std::chrono::steady_clock::now();
  Result r = finish(
      start({TESSERA_HELPER_BIN, "rendezvous"},
            {"RANK=0", "WORLD_SIZE=2", "MASTER_ADDR=127.0.0.1",
             "MASTER_PORT=" + std::to_string(20000 + getpid() % 20000), "TESSERA_RDZV_TIMEOUT=2"},
            out),
      out);
  double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("DEADLINE_EXCEEDED"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("1 of 2 ranks arrived; missing rank 1"), std::string::npos) << r.output;
  EXPECT_LT(seconds, 30);
}

TEST_F(LauncherTest, MissingRankZeroGivesClearError) {
  std::string out = (dir_ / "out.txt").string();
  Result r = finish(start({TESSERA_HELPER_BIN, "rendezvous"},
                          {"RANK=1", "WORLD_SIZE=2", "MASTER_ADDR=127.0.0.1",
                           "MASTER_PORT=" + std::to_string(20000 + (getpid() + 7) % 20000),
                           "TESSERA_RDZV_TIMEOUT=2"},
                          out),
                    out);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("cannot reach the rendezvous store at 127.0.0.1"), std::string::npos)
      << r.output;
}

// Two launchers on this machine acting as two nodes of 2 ranks each: the
// collectives test runs as one world of 4 ranks.
TEST_F(LauncherTest, TwoNodesRunTheCollectivesTestAsOneWorld) {
  const std::string port = std::to_string(free_port());
  const std::string agent = std::to_string(free_port());
  std::vector<Subprocess> nodes;
  for (int node = 0; node < 2; ++node) {
    nodes.push_back(start({TESSERA_LAUNCH_BIN, "--nproc", "2", "--nnodes", "2", "--node-rank",
                           std::to_string(node), "--master-addr", "127.0.0.1", "--master-port",
                           port, "--agent-port", agent, "--", TESSERA_COLLECTIVES_BIN},
                          {}, (dir_ / ("node" + std::to_string(node) + ".txt")).string()));
  }
  for (int node = 0; node < 2; ++node) {
    Result r = finish(nodes[node], (dir_ / ("node" + std::to_string(node) + ".txt")).string(), 300);
    EXPECT_EQ(r.exit_code, 0) << "node " << node << ":\n" << r.output;
    // gtest's summary from every rank of this node.
    for (int local = 0; local < 2; ++local) {
      const std::string rank = std::to_string(node * 2 + local);
      EXPECT_NE(r.output.find("[rank " + rank + "] [  PASSED  ]"), std::string::npos) << r.output;
    }
  }
}

// A rank failing on node 1 stops node 0's ranks too; both launchers report it.
TEST_F(LauncherTest, FailingRankOnOneNodeStopsTheOtherNode) {
  const std::string port = std::to_string(free_port());
  const std::string agent = std::to_string(free_port());
  std::vector<Subprocess> nodes;
  for (int node = 0; node < 2; ++node) {
    nodes.push_back(start({TESSERA_LAUNCH_BIN, "--nproc", "2", "--nnodes", "2", "--node-rank",
                           std::to_string(node), "--master-port", port, "--agent-port", agent,
                           "--grace", "2", "--", TESSERA_HELPER_BIN, "fail", "3", "5"},
                          {piddir_env()},
                          (dir_ / ("node" + std::to_string(node) + ".txt")).string()));
  }
  Result r0 = finish(nodes[0], (dir_ / "node0.txt").string());
  Result r1 = finish(nodes[1], (dir_ / "node1.txt").string());
  EXPECT_EQ(r1.exit_code, 5) << r1.output;
  EXPECT_NE(r1.output.find("rank 3 (pid"), std::string::npos) << r1.output;
  EXPECT_EQ(r0.exit_code, 5) << r0.output;
  EXPECT_NE(r0.output.find("node 1: rank 3 exited with code 5; stopping the ranks of node 0"),
            std::string::npos)
      << r0.output;
  EXPECT_NE(r0.output.find("2 other ranks were stopped"), std::string::npos) << r0.output;
  auto pids = recorded_pids(dir_ / "pids");
  EXPECT_EQ(pids.size(), 8u);  // 4 ranks over two nodes, each with a child
  expect_all_gone(pids);
}

TEST(LaunchArgs, ParsesAndRejects) {
  auto o = parse_launch_args({"--nproc", "4", "--master-port", "1234", "--", "prog", "--x"});
  EXPECT_EQ(o.nproc, 4);
  EXPECT_EQ(o.master_port, 1234);
  EXPECT_EQ(o.command, (std::vector<std::string>{"prog", "--x"}));
  EXPECT_THROW(parse_launch_args({"--nproc", "0", "--", "p"}), InvalidArgument);
  EXPECT_THROW(parse_launch_args({"--nproc", "2"}), InvalidArgument);
  EXPECT_THROW(parse_launch_args({"--bogus", "--", "p"}), InvalidArgument);
  EXPECT_THROW(parse_launch_args({"--", "p"}), InvalidArgument);
  auto n = parse_launch_args({"--nproc", "2", "--nnodes", "2", "--node-rank", "1", "--master-port",
                              "4000", "--agent-port", "4100", "--", "p"});
  EXPECT_EQ(n.nnodes, 2);
  EXPECT_EQ(n.node_rank, 1);
  EXPECT_EQ(n.agent_port, 4100);
  EXPECT_THROW(parse_launch_args({"--nproc", "2", "--nnodes", "2", "--node-rank", "2",
                                  "--master-port", "4000", "--", "p"}),
               InvalidArgument);
}

// -h/--help before the program asks for the usage text and wins over
// missing or bad options; after the program it belongs to the program.
TEST(LaunchArgs, HelpBeforeTheProgramOnly) {
  EXPECT_TRUE(parse_launch_args({"--help"}).help);
  EXPECT_TRUE(parse_launch_args({"-h"}).help);
  EXPECT_TRUE(parse_launch_args({"--nproc", "2", "--help", "--bogus"}).help);
  auto after_dashes = parse_launch_args({"--nproc", "2", "--", "prog", "--help"});
  EXPECT_FALSE(after_dashes.help);
  EXPECT_EQ(after_dashes.command, (std::vector<std::string>{"prog", "--help"}));
  auto after_program = parse_launch_args({"--nproc", "2", "prog", "-h"});
  EXPECT_FALSE(after_program.help);
  EXPECT_EQ(after_program.command, (std::vector<std::string>{"prog", "-h"}));
  // The help text names every option parse_launch_args accepts.
  const std::string usage = launch_usage();
  for (const char* flag : {"--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                           "--agent-port", "--grace", "--no-prefix", "--help"}) {
    EXPECT_NE(usage.find(flag), std::string::npos) << flag << " missing from:\n" << usage;
  }
}

// One launcher per node under Slurm: the node count and index come from
// SLURM_NNODES and SLURM_NODEID, the rendezvous address from MASTER_*.
TEST(LaunchArgs, ReadsSlurmAndMasterVariables) {
  setenv("SLURM_NNODES", "4", 1);
  setenv("SLURM_NODEID", "3", 1);
  setenv("MASTER_ADDR", "10.0.0.7", 1);
  setenv("MASTER_PORT", "29555", 1);
  auto o = parse_launch_args({"--nproc", "8", "--", "train"});
  unsetenv("SLURM_NNODES");
  unsetenv("SLURM_NODEID");
  unsetenv("MASTER_ADDR");
  unsetenv("MASTER_PORT");
  EXPECT_EQ(o.nnodes, 4);
  EXPECT_EQ(o.node_rank, 3);
  EXPECT_EQ(o.master_addr, "10.0.0.7");
  EXPECT_EQ(o.master_port, 29555);
  // Flags win over the environment.
  setenv("SLURM_NNODES", "4", 1);
  setenv("SLURM_NODEID", "3", 1);
  auto f = parse_launch_args({"--nproc", "1", "--nnodes", "1", "--node-rank", "0", "--", "p"});
  unsetenv("SLURM_NNODES");
  unsetenv("SLURM_NODEID");
  EXPECT_EQ(f.nnodes, 1);
  EXPECT_EQ(f.node_rank, 0);
}

}  // namespace
}  // namespace tessera::dist
