// tessera/dist/launcher.h — start N local ranks of a program (tessera-launch).
//
// launch() starts `nproc` copies of a command with the torchrun variables
// (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
// GROUP_RANK), forwards their stdout and stderr line by line with a
// "[rank N] " prefix, and waits. When one rank fails (non-zero exit or a
// signal) the others get SIGTERM, then SIGKILL after a grace period, and
// launch() returns the failed rank's exit code after printing which rank
// failed and how. SIGINT/SIGTERM to the launcher are forwarded the same way.
// Each rank runs in its own process group, which is killed as a whole, and
// dies with the launcher (PR_SET_PDEATHSIG): no orphans are left behind.
//
// Not thread-safe (installs signal handlers while running).
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

namespace tessera::dist {

struct LaunchOptions {
  int nproc = 1;                          // ranks on this node
  int nnodes = 1;                         // nodes in the job
  int node_rank = 0;                      // this node's index
  std::string master_addr = "127.0.0.1";  // where rank 0's store listens
  int master_port = 0;                    // 0: pick a free port (single node only)
  double grace_seconds = 5.0;             // SIGTERM -> SIGKILL delay
  bool prefix_output = true;              // "[rank N] " before every line
  std::vector<std::string> command;       // program and arguments
};

// Parses tessera-launch's command line (argv[0] excluded):
//   --nproc N [--nnodes N --node-rank I] [--master-addr A] [--master-port P]
//   [--grace S] [--no-prefix] -- PROGRAM ARGS...
// InvalidArgument with a usage hint on bad input.
LaunchOptions parse_launch_args(const std::vector<std::string>& args);

// Runs the ranks to completion. Returns 0 when all exit 0; otherwise the
// exit code of the first rank that failed (128 + signal for a signal).
// Status lines go to `log` (stderr in tessera-launch).
int launch(const LaunchOptions& options, std::ostream& log);

// A TCP port that is free on `address` right now (the kernel's choice for
// port 0), for a rendezvous store started shortly after.
int free_port(const std::string& address = "127.0.0.1");

}  // namespace tessera::dist
