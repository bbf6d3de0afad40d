#include "tessera/dist/launcher.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/subprocess.h"
#include "tessera/dist/rendezvous.h"

namespace tessera::dist {
namespace {

constexpr const char* kUsage =
    "usage: tessera-launch --nproc N [--nnodes N --node-rank I] [--master-addr A] "
    "[--master-port P] [--agent-port P] [--grace SECONDS] [--no-prefix] [--drain-on-signal] --\n"
    "PROGRAM [ARGS...]\n"
    "Under Slurm (one launcher per node), --nnodes and --node-rank default to SLURM_NNODES and\n"
    "SLURM_NODEID; --master-addr and --master-port to MASTER_ADDR and MASTER_PORT.";

// What --help adds to kUsage.
constexpr const char* kOptionsHelp =
    "\n"
    "Starts N local ranks of PROGRAM with the torchrun variables (RANK, LOCAL_RANK, WORLD_SIZE,\n"
    "LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, GROUP_RANK), forwards their output and, when\n"
    "one rank fails, stops the others. Everything after \"--\" (or from the first argument that\n"
    "is not an option) is the program and its arguments.\n"
    "\n"
    "Options:\n"
    "  --nproc N         ranks on this node (required; also --nproc-per-node)\n"
    "  --nnodes N        nodes in the job, one launcher each (default 1, or SLURM_NNODES)\n"
    "  --node-rank I     this node's index, 0 .. nnodes-1 (default 0, or SLURM_NODEID)\n"
    "  --master-addr A   address of rank 0's store (default 127.0.0.1, or MASTER_ADDR)\n"
    "  --master-port P   port of rank 0's store (default MASTER_PORT, else a free port;\n"
    "                    required with several nodes)\n"
    "  --agent-port P    port of the launchers' store with several nodes, on node 0\n"
    "                    (default master port + 1)\n"
    "  --grace SECONDS   delay between SIGTERM and SIGKILL when stopping ranks (default 5)\n"
    "  --no-prefix       do not prefix every output line with \"[rank N] \"\n"
    "  --drain-on-signal SIGINT/SIGTERM still go to the ranks, as a request to finish: the\n"
    "                    exit code is then theirs (0 when all exit 0), not 130 (for servers\n"
    "                    that drain, e.g. tessera-serve --tp)\n"
    "  -h, --help        print this help and exit\n"
    "\n"
    "Exit code: 0 when every rank exits 0; else the first failed rank's code (128 + signal for\n"
    "a signal); 2 for a bad command line or ranks that cannot be started.\n";

// Self-pipe written by the signal handler; the poll loop reads it.
int g_signal_pipe[2] = {-1, -1};

void on_signal(int sig) {
  unsigned char s = static_cast<unsigned char>(sig);
  [[maybe_unused]] ssize_t n = write(g_signal_pipe[1], &s, 1);
}

int parse_int(const std::string& flag, const std::string& value, int min, int max) {
  try {
    size_t used = 0;
    int v = std::stoi(value, &used);
    if (used == value.size() && v >= min && v <= max) return v;
  } catch (const std::exception&) {
  }
  TESSERA_THROW(InvalidArgument, flag, " expects an integer in [", min, ", ", max, "], got '",
                value, "'\n", kUsage);
}

double parse_seconds(const std::string& flag, const std::string& value) {
  try {
    size_t used = 0;
    const double v = std::stod(value, &used);
    if (used == value.size() && v >= 0 && v <= 3600) return v;
  } catch (const std::exception&) {
  }
  TESSERA_THROW(InvalidArgument, flag, " expects seconds in [0, 3600], got '", value, "'\n",
                kUsage);
}

int pick_free_port(const std::string& addr) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  TESSERA_CHECK(fd >= 0, Unavailable, "tessera-launch: socket(): ", std::strerror(errno));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = 0;
  if (inet_pton(AF_INET, addr.c_str(), &sa.sin_addr) != 1)
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(sa);
  if (bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len) != 0) {
    int err = errno;
    close(fd);
    TESSERA_THROW(Unavailable, "tessera-launch: cannot find a free port on ", addr, ": ",
                  std::strerror(err));
  }
  int port = ntohs(sa.sin_port);
  close(fd);
  return port;
}

struct Rank {
  int rank = 0;
  Subprocess process;
  std::string out_partial, err_partial;
  bool exited = false;
  ExitStatus status;
};

// Writes every complete line of `partial` to `fd` with the prefix.
void flush_lines(std::string& partial, int fd, const std::string& prefix, bool final) {
  size_t start = 0;
  std::string out;
  for (;;) {
    size_t nl = partial.find('\n', start);
    if (nl == std::string::npos) break;
    out += prefix;
    out.append(partial, start, nl - start + 1);
    start = nl + 1;
  }
  partial.erase(0, start);
  if (final && !partial.empty()) {
    out += prefix + partial + "\n";
    partial.clear();
  }
  size_t off = 0;
  while (off < out.size()) {
    ssize_t n = write(fd, out.data() + off, out.size() - off);
    if (n <= 0) {
      if (errno == EINTR) continue;
      break;
    }
    off += static_cast<size_t>(n);
  }
}

Subprocess spawn_rank(const LaunchOptions& o, int local_rank, int port) {
  SpawnOptions so;
  so.argv = o.command;
  so.env = {{"RANK", std::to_string(o.node_rank * o.nproc + local_rank)},
            {"LOCAL_RANK", std::to_string(local_rank)},
            {"WORLD_SIZE", std::to_string(o.nproc * o.nnodes)},
            {"LOCAL_WORLD_SIZE", std::to_string(o.nproc)},
            {"GROUP_RANK", std::to_string(o.node_rank)},
            {"MASTER_ADDR", o.master_addr},
            {"MASTER_PORT", std::to_string(port)},
            {"TESSERA_LAUNCHED", "1"}};
  so.stdout_mode = SpawnOptions::Stream::kPipe;
  so.stderr_mode = SpawnOptions::Stream::kPipe;
  so.inherit_stdin = true;
  return Subprocess::spawn(so);
}

// The launchers of a multi-node job share a store hosted by node 0's
// launcher: the first node whose rank fails records it under "failed", and
// every launcher polls that key, so one failing rank stops the whole job
// (as torchrun's agents do), not only its own node.
class NodeAgents {
 public:
  NodeAgents(const LaunchOptions& o, std::ostream& log) : o_(o), log_(log) {
    if (o.nnodes == 1) return;
    const int port = o.agent_port != 0 ? o.agent_port : o.master_port + 1;
    store_ =
        Store::tcp(o.master_addr, port, /*is_server=*/o.node_rank == 0, std::chrono::seconds(120));
  }

  // A failure another node recorded: (exit code, reason), or nothing.
  std::optional<std::pair<int, std::string>> remote_failure() {
    if (!store_) return std::nullopt;
    try {
      if (!store_->check({"failed"})) return std::nullopt;
      const std::string v = store_->get("failed");
      const size_t space = v.find(' ');
      return std::make_pair(std::atoi(v.substr(0, space).c_str()), v.substr(space + 1));
    } catch (const std::exception& e) {
      lost(e);
      return std::nullopt;
    }
  }

  void report_failure(int code, const std::string& reason) {
    if (!store_) return;
    try {
      if (store_->add("failures", 1) == 1) {
        store_->set("failed",
                    std::to_string(code) + " node " + std::to_string(o_.node_rank) + ": " + reason);
      }
    } catch (const std::exception& e) {
      lost(e);
    }
  }

  // Node 0 keeps the store up until every launcher has finished reading it.
  void finish(std::chrono::milliseconds wait) {
    if (!store_) return;
    try {
      store_->add("finished", 1);
      if (o_.node_rank != 0) return;
      const auto deadline = std::chrono::steady_clock::now() + wait;
      while (store_->add("finished", 0) < o_.nnodes &&
             std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    } catch (const std::exception& e) {
      lost(e);
    }
  }

 private:
  void lost(const std::exception& e) {
    log_ << "tessera-launch: node " << o_.node_rank << " lost the launchers' store (" << e.what()
         << "); carrying on without the other nodes" << std::endl;
    store_.reset();
  }

  const LaunchOptions& o_;
  std::ostream& log_;
  std::shared_ptr<Store> store_;
};

}  // namespace

LaunchOptions parse_launch_args(const std::vector<std::string>& args) {
  LaunchOptions o;
  // Defaults from the environment: torchrun's MASTER_ADDR / MASTER_PORT and,
  // with one launcher per node under Slurm, the node count and index.
  if (const char* v = std::getenv("MASTER_ADDR")) o.master_addr = v;
  if (const char* v = std::getenv("MASTER_PORT"))
    o.master_port = parse_int("MASTER_PORT", v, 1, 65535);
  if (const char* v = std::getenv("SLURM_NNODES"))
    o.nnodes = parse_int("SLURM_NNODES", v, 1, 1 << 20);
  if (const char* v = std::getenv("SLURM_NODEID"))
    o.node_rank = parse_int("SLURM_NODEID", v, 0, 1 << 20);
  size_t i = 0;
  auto value = [&](const std::string& flag) -> const std::string& {
    TESSERA_CHECK(i + 1 < args.size(), InvalidArgument, flag, " needs a value\n", kUsage);
    return args[++i];
  };
  bool nproc_set = false;
  for (; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--") {
      ++i;
      break;
    }
    if (a == "--nproc" || a == "--nproc-per-node" || a == "--nproc_per_node") {
      o.nproc = parse_int(a, value(a), 1, 4096);
      nproc_set = true;
    } else if (a == "--nnodes") {
      o.nnodes = parse_int(a, value(a), 1, 1 << 20);
    } else if (a == "--node-rank" || a == "--node_rank") {
      o.node_rank = parse_int(a, value(a), 0, 1 << 20);
    } else if (a == "--master-addr" || a == "--master_addr") {
      o.master_addr = value(a);
    } else if (a == "--master-port" || a == "--master_port") {
      o.master_port = parse_int(a, value(a), 1, 65535);
    } else if (a == "--agent-port") {
      o.agent_port = parse_int(a, value(a), 1, 65535);
    } else if (a == "--grace") {
      o.grace = std::chrono::milliseconds(std::llround(parse_seconds(a, value(a)) * 1000));
    } else if (a == "--no-prefix") {
      o.prefix_output = false;
    } else if (a == "--drain-on-signal") {
      o.signal_ends_successfully = true;
    } else if (a == "-h" || a == "--help") {
      o.help = true;
      return o;
    } else if (!a.empty() && a[0] == '-') {
      TESSERA_THROW(InvalidArgument, "unknown option '", a, "'\n", kUsage);
    } else {
      break;  // the program, without a "--"
    }
  }
  o.command.assign(args.begin() + static_cast<std::ptrdiff_t>(i), args.end());
  TESSERA_CHECK(nproc_set, InvalidArgument, "--nproc is required\n", kUsage);
  TESSERA_CHECK(!o.command.empty(), InvalidArgument, "no program given\n", kUsage);
  TESSERA_CHECK(o.node_rank < o.nnodes, InvalidArgument, "--node-rank ", o.node_rank,
                " must be below --nnodes ", o.nnodes);
  TESSERA_CHECK(o.nnodes == 1 || o.master_port != 0, InvalidArgument,
                "--master-port is required with several nodes");
  return o;
}

std::string launch_usage() { return std::string(kUsage) + "\n" + kOptionsHelp; }

namespace {

using Clock = std::chrono::steady_clock;

// The SIGINT and SIGTERM handlers launch() replaced, put back by
// restore_signals().
struct SavedSignals {
  struct sigaction old_int {};
  struct sigaction old_term {};
};

// Routes SIGINT and SIGTERM to g_signal_pipe (read by the poll loop).
// Unavailable when the pipe cannot be made.
SavedSignals route_signals() {
  TESSERA_CHECK(pipe2(g_signal_pipe, O_CLOEXEC | O_NONBLOCK) == 0, Unavailable,
                "tessera-launch: pipe(): ", std::strerror(errno));
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  SavedSignals saved;
  sigaction(SIGINT, &sa, &saved.old_int);
  sigaction(SIGTERM, &sa, &saved.old_term);
  return saved;
}

// Puts the previous handlers back and closes g_signal_pipe.
void restore_signals(const SavedSignals& saved) {
  sigaction(SIGINT, &saved.old_int, nullptr);
  sigaction(SIGTERM, &saved.old_term, nullptr);
  close(g_signal_pipe[0]);
  close(g_signal_pipe[1]);
  g_signal_pipe[0] = g_signal_pipe[1] = -1;
}

// Watches this node's running ranks: forwards their output line by line,
// reaps them, and stops them all (SIGTERM, then SIGKILL after o.grace) when
// one fails, a signal arrives or another node reports a failure. Used by
// launch()'s thread only.
class RankSupervisor {
 public:
  RankSupervisor(const LaunchOptions& o, std::ostream& log, NodeAgents& agents,
                 std::vector<Rank>& ranks)
      : o_(o), log_(log), agents_(agents), ranks_(ranks) {}

  // Runs until every rank has exited and its pipes are closed (or poll()
  // fails). Returns the exit code: 0 when every rank exited 0; else the
  // first failed rank's shell code, 130 after a signal, or the code another
  // node reported.
  int run() {
    while (!all_exited() || open_fds() > 0) {
      if (!forward_output()) break;
      reap();
      check_other_nodes();
      drain_when_all_exited();
      kill_after_grace();
    }
    return result_;
  }
  // Why the ranks were stopped (empty when they were not).
  const std::string& reason() const { return reason_; }

 private:
  void stop_all(int sig) {
    for (auto& r : ranks_) {
      if (!r.exited) r.process.signal(sig);
    }
  }
  void begin_stop(const std::string& why) {
    if (stopping_) return;
    stopping_ = true;
    reason_ = why;
    stop_all(SIGTERM);
    kill_at_ = Clock::now() + o_.grace;
  }
  int open_fds() const {
    int n = 0;
    for (auto& r : ranks_) n += (r.process.stdout_fd() >= 0) + (r.process.stderr_fd() >= 0);
    return n;
  }
  bool all_exited() const {
    for (auto& r : ranks_) {
      if (!r.exited) return false;
    }
    return true;
  }

  // Waits up to 50 ms for output or a signal and handles what arrived.
  // False when poll() failed.
  bool forward_output() {
    std::vector<pollfd> fds;
    std::vector<std::pair<int, bool>> owners;  // (rank index, is_stderr)
    fds.push_back({g_signal_pipe[0], POLLIN, 0});
    owners.push_back({-1, false});
    for (int i = 0; i < o_.nproc; ++i) {
      if (ranks_[i].process.stdout_fd() >= 0) {
        fds.push_back({ranks_[i].process.stdout_fd(), POLLIN, 0});
        owners.push_back({i, false});
      }
      if (ranks_[i].process.stderr_fd() >= 0) {
        fds.push_back({ranks_[i].process.stderr_fd(), POLLIN, 0});
        owners.push_back({i, true});
      }
    }
    int ready = poll(fds.data(), fds.size(), 50);
    if (ready < 0 && errno != EINTR) return false;
    for (size_t k = 0; ready > 0 && k < fds.size(); ++k) {
      if (!(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      if (owners[k].first < 0) {
        on_signal_pipe();
      } else {
        read_output(ranks_[owners[k].first], owners[k].second, fds[k].fd);
      }
    }
    return true;
  }

  // A signal arrived: stop the ranks, exit with 130 unless a rank failed
  // first.
  void on_signal_pipe() {
    unsigned char sig = 0;
    while (read(g_signal_pipe[0], &sig, 1) == 1) {
    }
    begin_stop(std::string("tessera-launch received signal ") + std::to_string(sig));
    if (o_.signal_ends_successfully) {
      stopped_by_signal_ = true;
    } else if (result_ == 0) {
      result_ = 130;
    }
  }

  // Reads what is ready on rank `r`'s stdout or stderr (`fd`) and writes
  // its complete lines; at end of file, the rest, and closes the pipe.
  void read_output(Rank& r, bool is_err, int fd) {
    char buf[65536];
    ssize_t n = read(fd, buf, sizeof(buf));
    std::string& partial = is_err ? r.err_partial : r.out_partial;
    std::string prefix = o_.prefix_output ? "[rank " + std::to_string(r.rank) + "] " : "";
    if (n > 0) {
      partial.append(buf, static_cast<size_t>(n));
      flush_lines(partial, is_err ? STDERR_FILENO : STDOUT_FILENO, prefix, false);
    } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
      flush_lines(partial, is_err ? STDERR_FILENO : STDOUT_FILENO, prefix, true);
      if (is_err) {
        r.process.close_stderr();
      } else {
        r.process.close_stdout();
      }
    }
  }

  // Collects the ranks that ended; the first failure (while not stopping
  // already) sets the exit code, is reported to the other nodes and stops
  // the rest.
  void reap() {
    for (auto& r : ranks_) {
      if (r.exited) continue;
      std::optional<ExitStatus> status = r.process.poll();
      if (!status) continue;
      r.exited = true;
      r.status = *status;
      // Whatever the rank left in its process group is orphaned now (and
      // may hold our pipes open): remove it.
      r.process.kill_group();
      if (!status->success() && !stopping_) {
        result_ = status->shell_code();
        const std::string what = "rank " + std::to_string(r.rank) + " " + status->describe();
        log_ << "tessera-launch: rank " << r.rank << " (pid " << r.process.pid() << ") "
             << status->describe() << "; stopping the other ranks" << std::endl;
        agents_.report_failure(result_, what);
        begin_stop(what);
      } else if (!status->success() && stopped_by_signal_ && result_ == 0) {
        // LaunchOptions::signal_ends_successfully: a rank that did not
        // finish cleanly after the forwarded signal decides the exit code.
        result_ = status->shell_code();
      }
    }
  }

  // Failures on other nodes, checked every 100 ms.
  void check_other_nodes() {
    if (stopping_ || Clock::now() < next_agent_check_) return;
    next_agent_check_ = Clock::now() + std::chrono::milliseconds(100);
    if (auto failure = agents_.remote_failure()) {
      result_ = failure->first != 0 ? failure->first : 1;
      log_ << "tessera-launch: " << failure->second << "; stopping the ranks of node "
           << o_.node_rank << std::endl;
      begin_stop(failure->second);
    }
  }

  // A process that escaped its group (setsid) could keep a pipe open
  // forever; once every rank is gone, stop reading after a short drain.
  void drain_when_all_exited() {
    if (!all_exited()) return;
    if (drain_until_ == Clock::time_point{}) drain_until_ = Clock::now() + std::chrono::seconds(2);
    if (Clock::now() >= drain_until_) {
      for (auto& r : ranks_) {
        r.process.close_stdout();
        r.process.close_stderr();
      }
    }
  }

  // SIGKILL once the grace period after SIGTERM has passed.
  void kill_after_grace() {
    if (stopping_ && Clock::now() >= kill_at_) {
      stop_all(SIGKILL);
      kill_at_ = Clock::now() + std::chrono::hours(1);
    }
  }

  const LaunchOptions& o_;
  std::ostream& log_;
  NodeAgents& agents_;
  bool stopped_by_signal_ = false;
  std::vector<Rank>& ranks_;
  int result_ = 0;
  bool stopping_ = false;
  Clock::time_point kill_at_{};
  Clock::time_point drain_until_{};
  Clock::time_point next_agent_check_{};
  std::string reason_;
};

}  // namespace

int launch(const LaunchOptions& o, std::ostream& log) {
  TESSERA_CHECK(o.nproc >= 1 && !o.command.empty(), InvalidArgument,
                "tessera-launch: nothing to launch");
  int port = o.master_port != 0 ? o.master_port : pick_free_port(o.master_addr);
  NodeAgents agents(o, log);
  const SavedSignals saved = route_signals();
  // Whatever happens from here (a rank that cannot start throws), the
  // previous handlers come back and the signal pipe is closed.
  struct Restore {
    const SavedSignals& saved;
    ~Restore() { restore_signals(saved); }
  } restore{saved};

  std::vector<Rank> ranks(o.nproc);
  for (int i = 0; i < o.nproc; ++i) {
    ranks[i].rank = o.node_rank * o.nproc + i;
    ranks[i].process = spawn_rank(o, i, port);
  }
  RankSupervisor supervisor(o, log, agents, ranks);
  const int result = supervisor.run();
  // Process groups of ranks that exited may still hold stray children.
  for (auto& r : ranks) r.process.kill_group();
  agents.finish(o.grace + std::chrono::seconds(5));

  if (result != 0) {
    int stopped = 0;
    for (auto& r : ranks) {
      if (!r.status.exited && (r.status.signal == SIGTERM || r.status.signal == SIGKILL)) ++stopped;
    }
    log << "tessera-launch: " << supervisor.reason() << "; " << stopped << " other rank"
        << (stopped == 1 ? " was" : "s were") << " stopped; exit code " << result << std::endl;
  }
  return result;
}

int free_port(const std::string& address) { return pick_free_port(address); }

}  // namespace tessera::dist
