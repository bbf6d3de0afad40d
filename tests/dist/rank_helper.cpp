// A small program the launcher and rendezvous tests start as ranks.
//   rank_helper fail R CODE   every rank records its pid (and a child's) in
//                             $TESSERA_TEST_PIDDIR; rank R exits with CODE,
//                             the others sleep until killed
//   rank_helper sleep         record pids, sleep until killed
//   rank_helper rendezvous    join the world, all_reduce, print the sum
//   rank_helper peer-dies     rank 1 exits right after joining; rank 0's next
//                             collective must fail with a tessera::Error
#include <ATen/ATen.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/dist/rendezvous.h"

namespace {

int env_rank() {
  const char* r = std::getenv("RANK");
  return r ? std::atoi(r) : 0;
}

void record_pids() {
  const char* dir = std::getenv("TESSERA_TEST_PIDDIR");
  if (!dir) return;
  pid_t child = fork();
  if (child == 0) {  // a grandchild of the launcher: must not outlive the job
    for (;;) pause();
  }
  std::ofstream(std::string(dir) + "/" + std::to_string(env_rank()) + ".pids")
      << getpid() << " " << child << "\n";
}

void sleep_forever() {
  for (int i = 0; i < 600; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "";
  try {
    if (mode == "fail" && argc == 4) {
      record_pids();
      std::cout << "rank " << env_rank() << " started" << std::endl;
      if (env_rank() == std::atoi(argv[2])) {
        std::this_thread::sleep_for(std::chrono::milliseconds(300));
        std::cerr << "rank " << env_rank() << " failing on purpose" << std::endl;
        return std::atoi(argv[3]);
      }
      sleep_forever();
      return 0;
    }
    if (mode == "sleep") {
      record_pids();
      sleep_forever();
      return 0;
    }
    if (mode == "rendezvous") {
      auto world = tessera::dist::init_process_group();
      at::Tensor t = at::full({1}, world->rank() + 1.0);
      world->all_reduce(t).wait();
      std::cout << "sum=" << t.item<double>() << std::endl;
      world->barrier().wait();
      return 0;
    }
    if (mode == "peer-dies") {
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
  std::cerr << "usage: rank_helper fail R CODE | sleep | rendezvous | peer-dies" << std::endl;
  return 64;
}
