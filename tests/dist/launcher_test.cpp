// tessera-launch end to end: real processes, real signals.
#include "tessera/dist/launcher.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "tessera/core/error.h"

namespace fs = std::filesystem;

namespace tessera::dist {
namespace {

struct Result {
  int exit_code = -1;
  std::string output;
};

// Starts argv with extra environment, output to a file; returns the pid.
pid_t start(const std::vector<std::string>& argv, const std::vector<std::string>& env,
            const std::string& out_path) {
  pid_t pid = fork();
  if (pid == 0) {
    int fd = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    for (const auto& e : env) putenv(const_cast<char*>(e.c_str()));
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  return pid;
}

Result finish(pid_t pid, const std::string& out_path, int timeout_s = 60) {
  Result r;
  int status = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      r.output = "TIMED OUT";
      return r;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::ifstream in(out_path);
  std::stringstream ss;
  ss << in.rdbuf();
  r.output = ss.str();
  return r;
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
  pid_t pid = start({TESSERA_LAUNCH_BIN, "--nproc", "4", "--grace", "2", "--", TESSERA_HELPER_BIN,
                     "fail", "2", "3"},
                    {piddir_env()}, out);
  Result r = finish(pid, out);
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
  pid_t pid = start({TESSERA_LAUNCH_BIN, "--nproc", "3", "--grace", "1", "--", TESSERA_HELPER_BIN,
                     "sleep"},
                    {piddir_env()}, out);
  for (int i = 0; i < 200 && recorded_pids(dir_ / "pids").size() < 6; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  auto pids = recorded_pids(dir_ / "pids");
  ASSERT_EQ(pids.size(), 6u);
  kill(pid, SIGINT);
  Result r = finish(pid, out);
  EXPECT_EQ(r.exit_code, 130) << r.output;
  expect_all_gone(pids);
}

TEST_F(LauncherTest, RanksRendezvousAndReduce) {
  std::string out = (dir_ / "out.txt").string();
  Result r = finish(start({TESSERA_LAUNCH_BIN, "--nproc", "3", "--", TESSERA_HELPER_BIN,
                           "rendezvous"},
                          {}, out),
                    out);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  for (int rank = 0; rank < 3; ++rank) {
    EXPECT_NE(r.output.find("[rank " + std::to_string(rank) + "] sum=6"), std::string::npos)
        << r.output;
  }
}

TEST_F(LauncherTest, DeadPeerGivesClearError) {
  std::string out = (dir_ / "out.txt").string();
  Result r = finish(start({TESSERA_LAUNCH_BIN, "--nproc", "2", "--", TESSERA_HELPER_BIN,
                           "peer-dies"},
                          {}, out),
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
  Result r = finish(start({TESSERA_HELPER_BIN, "rendezvous"},
                          {"RANK=0", "WORLD_SIZE=2", "MASTER_ADDR=127.0.0.1",
                           "MASTER_PORT=" + std::to_string(20000 + getpid() % 20000),
                           "TESSERA_RDZV_TIMEOUT=2"},
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

TEST(LaunchArgs, ParsesAndRejects) {
  auto o = parse_launch_args({"--nproc", "4", "--master-port", "1234", "--", "prog", "--x"});
  EXPECT_EQ(o.nproc, 4);
  EXPECT_EQ(o.master_port, 1234);
  EXPECT_EQ(o.command, (std::vector<std::string>{"prog", "--x"}));
  EXPECT_THROW(parse_launch_args({"--nproc", "0", "--", "p"}), InvalidArgument);
  EXPECT_THROW(parse_launch_args({"--nproc", "2"}), InvalidArgument);
  EXPECT_THROW(parse_launch_args({"--bogus", "--", "p"}), InvalidArgument);
  EXPECT_THROW(parse_launch_args({"--", "p"}), InvalidArgument);
}

}  // namespace
}  // namespace tessera::dist
