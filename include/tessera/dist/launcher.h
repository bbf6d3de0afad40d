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
// Several nodes: one launcher per node with the same --nnodes, --master-addr
// and --master-port and its own --node-rank (torchrun's names). Node 0's
// launcher also hosts a small store on --agent-port (default master port
// + 1) through which the launchers tell each other about failures: a rank
// failing on any node stops the ranks of every node, and every launcher
// exits with the failed rank's code. Under Slurm (srun with one task per
// node), --nnodes and --node-rank default to SLURM_NNODES and SLURM_NODEID,
// --master-addr and --master-port to MASTER_ADDR and MASTER_PORT.
//
// Not thread-safe (installs signal handlers while running).
#pragma once

#include <chrono>
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
  int agent_port = 0;                     // launchers' store (several nodes); 0: master_port + 1
  std::chrono::milliseconds grace{5000};  // SIGTERM -> SIGKILL delay
  bool prefix_output = true;              // "[rank N] " before every line
  // SIGINT/SIGTERM to the launcher are still forwarded to the ranks, but
  // the launcher then returns what they return (0 when all exit 0) rather
  // than 130: for ranks that take the signal as a request to finish (a
  // server draining its requests).
  bool signal_ends_successfully = false;
  std::vector<std::string> command;  // program and arguments
  // -h/--help came before the program: tessera-launch prints launch_usage()
  // and starts nothing (the other fields are then not checked).
  bool help = false;
};

// Parses tessera-launch's command line (argv[0] excluded):
//   --nproc N [--nnodes N --node-rank I] [--master-addr A] [--master-port P]
//   [--agent-port P] [--grace S] [--no-prefix] -- PROGRAM ARGS...
// -h or --help before the program returns at once with `help` set.
// InvalidArgument with a usage hint on bad input.
LaunchOptions parse_launch_args(const std::vector<std::string>& args);

// tessera-launch's help text: the synopsis, then every option with its
// meaning and default (ends with a newline).
std::string launch_usage();

// Runs the ranks to completion. Returns 0 when all exit 0; otherwise the
// exit code of the first rank that failed (128 + signal for a signal).
// Status lines go to `log` (stderr in tessera-launch).
int launch(const LaunchOptions& options, std::ostream& log);

// A TCP port that is free on `address` right now (the kernel's choice for
// port 0), for a rendezvous store started shortly after.
int free_port(const std::string& address = "127.0.0.1");

}  // namespace tessera::dist
