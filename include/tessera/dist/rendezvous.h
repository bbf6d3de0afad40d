// tessera/dist/rendezvous.h — finding the other ranks.
//
// Ranks learn who they are from the variables torchrun, tessera-launch and
// (through SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) Slurm set:
// RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
// Rank 0 hosts a c10d TCPStore at MASTER_ADDR:MASTER_PORT; every rank checks
// in, and init_process_group() returns once all have arrived, or throws
// DeadlineExceeded naming the ranks that never came.
//
//   int main() {
//     auto world = tessera::dist::init_process_group();   // 1 rank if no env
//     ...
//     world->barrier().wait();   // before rank 0's store goes away
//   }
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tessera/dist/process_group.h"

namespace tessera::dist {

struct EnvInfo {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  // True when RANK/WORLD_SIZE (or Slurm's equivalents) were set.
  bool distributed = false;

  // Reads the environment. InvalidArgument naming the variable when one is
  // malformed or inconsistent (RANK >= WORLD_SIZE, ...).
  static EnvInfo from_env();
};

// Key-value store shared by the ranks of a job (wraps c10d stores).
// Thread-safe.
class Store {
 public:
  // rank 0 (is_server) listens on host:port; the others connect, retrying
  // until `timeout` (DeadlineExceeded naming host:port).
  static std::shared_ptr<Store> tcp(const std::string& host, int port, bool is_server,
                                    std::chrono::milliseconds timeout);
  // In-process store, for ranks that are threads of one process.
  static std::shared_ptr<Store> in_memory();
  // A view of `base` whose keys all start with `prefix`/.
  static std::shared_ptr<Store> prefixed(std::shared_ptr<Store> base, const std::string& prefix);

  void set(const std::string& key, const std::string& value);
  // Waits for the key up to the store's timeout.
  std::string get(const std::string& key);
  int64_t add(const std::string& key, int64_t delta);
  bool check(const std::vector<std::string>& keys);
  std::chrono::milliseconds timeout() const;

  struct Impl;
  explicit Store(std::unique_ptr<Impl> impl);
  ~Store();
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

struct InitOptions {
  // How long rendezvous may take before DeadlineExceeded. The variable
  // TESSERA_RDZV_TIMEOUT (seconds) overrides.
  std::chrono::milliseconds rendezvous_timeout = std::chrono::seconds(120);
  ProcessGroupOptions group;
};

// Rendezvous from the environment and the world process group. Without the
// variables, a world of one rank. Also sets the log rank prefix.
// TESSERA_DIST_BACKEND=gloo|nccl overrides options.group.backend.
std::shared_ptr<ProcessGroup> init_process_group(const InitOptions& options = {});

// Runs fn(group) on `world` threads of this process, each a rank of one
// group over an in-memory store, ending with a barrier (world 1: fn(nullptr)
// on the calling thread). After every thread finished, rethrows the lowest
// failing rank's error. For offline tools (checkpoint resharding) and tests.
void run_thread_ranks(int world, const std::function<void(std::shared_ptr<ProcessGroup>)>& fn,
                      const ProcessGroupOptions& options = {});

// Waits until `world_size` ranks have checked in on `store` under `tag`
// (each calling this once with its rank). DeadlineExceeded lists the missing
// ranks; InvalidArgument when a rank checks in twice.
void rendezvous_barrier(Store& store, const std::string& tag, int rank, int world_size,
                        std::chrono::milliseconds timeout);

}  // namespace tessera::dist
