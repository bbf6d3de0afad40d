// A small program the launcher and rendezvous tests start as ranks.
//   rank_helper fail R CODE   every rank records its pid (and a child's) in
//                             $TESSERA_TEST_PIDDIR; rank R exits with CODE,
//                             the others sleep until killed
//   rank_helper sleep         record pids, sleep until killed
//   rank_helper drain CODE    record pids, sleep; on SIGTERM exit with CODE
//   rank_helper rendezvous    join the world, all_reduce, print the sum
//   rank_helper peer-dies     rank 1 exits right after joining; rank 0's next
//                             collective must fail with a tessera::Error
//   rank_helper --help        the modes (a bad command line exits 64)
#include <ATen/ATen.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include "command_line.h"
#include "tessera/core/error.h"
#include "tessera/core/subprocess.h"
#include "tessera/dist/rendezvous.h"

namespace {

int env_rank() {
  const char* r = std::getenv("RANK");
  return r ? std::atoi(r) : 0;
}

// A grandchild of the launcher that must not outlive the job: it stays in
// the rank's process group and is not tied to the rank's life, so only the
// launcher's group kill can remove it.
tessera::Subprocess g_child;

void record_pids() {
  const char* dir = std::getenv("TESSERA_TEST_PIDDIR");
  if (!dir) return;
  tessera::SpawnOptions o;
  o.argv = {"sleep", "600"};
  o.new_process_group = false;
  o.die_with_parent = false;
  g_child = tessera::Subprocess::spawn(o);
  std::ofstream(std::string(dir) + "/" + std::to_string(env_rank()) + ".pids")
      << getpid() << " " << g_child.pid() << "\n";
}

void sleep_forever() {
  for (int i = 0; i < 600; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

}  // namespace

int main(int argc, char** argv) {
  int fail_rank = 0, fail_code = 0;
  CLI::App app{"A program the launcher and rendezvous tests start as ranks.", "rank_helper"};
  app.require_subcommand(1);
  CLI::App* fail_cmd = app.add_subcommand(
      "fail",
      "every rank records its pid (and a child's) in $TESSERA_TEST_PIDDIR; rank R exits "
      "with CODE, the others sleep until killed");
  fail_cmd->add_option("R", fail_rank, "the rank that fails")->required();
  fail_cmd->add_option("CODE", fail_code, "its exit code")->required();
  CLI::App* sleep_cmd = app.add_subcommand("sleep", "record pids, sleep until killed");
  int drain_code = 0;
  CLI::App* drain_cmd =
      app.add_subcommand("drain", "record pids, sleep; on SIGTERM exit with CODE");
  drain_cmd->add_option("CODE", drain_code, "the exit code after SIGTERM")->required();
  CLI::App* rendezvous_cmd =
      app.add_subcommand("rendezvous", "join the world, all_reduce, print the sum");
  CLI::App* peer_dies_cmd = app.add_subcommand(
      "peer-dies",
      "rank 1 exits right after joining; rank 0's next collective must fail with a "
      "tessera::Error");
  if (auto code = tessera::examples::parse_command_line(app, argc, argv, /*usage_error_code=*/64)) {
    return *code;
  }
  try {
    if (fail_cmd->parsed()) {
      record_pids();
      std::cout << "rank " << env_rank() << " started" << std::endl;
      if (env_rank() == fail_rank) {
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        std::cerr << "rank " << env_rank() << " failing on purpose" << std::endl;
        // _exit: no destructors, so the child stays for the launcher to remove.
        std::cerr.flush();
        _exit(fail_code);
      }
      sleep_forever();
      return 0;
    }
    if (sleep_cmd->parsed()) {
      record_pids();
      sleep_forever();
      return 0;
    }
    if (drain_cmd->parsed()) {
      sigset_t term;
      sigemptyset(&term);
      sigaddset(&term, SIGTERM);
      pthread_sigmask(SIG_BLOCK, &term, nullptr);
      record_pids();
      int sig = 0;
      sigwait(&term, &sig);
      std::cout << "rank " << env_rank() << " drained" << std::endl;
      return drain_code;
    }
    if (rendezvous_cmd->parsed()) {
      auto world = tessera::dist::init_process_group();
      at::Tensor t = at::full({1}, world->rank() + 1.0);
      world->all_reduce(t).wait();
      std::cout << "sum=" << t.item<double>() << std::endl;
      world->barrier().wait();
      return 0;
    }
    if (peer_dies_cmd->parsed()) {
      tessera::dist::InitOptions opts;
      opts.group.timeout = std::chrono::seconds(10);
      auto world = tessera::dist::init_process_group(opts);
      world->barrier().wait();
      if (world->rank() == 1) _exit(0);  // vanish without a goodbye
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      at::Tensor t = at::ones({1024});
      try {
        world->all_reduce(t).wait();
      } catch (const tessera::Error& e) {
        std::cout << "caught: " << e.what() << std::endl;
        _exit(0);  // the store's peer is gone too: skip orderly teardown
      }
      std::cout << "all_reduce with a dead peer did not fail" << std::endl;
      _exit(4);
    }
  } catch (const tessera::Error& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 2;
  }
  return 64;  // unreachable: require_subcommand(1) holds one of the modes
}
