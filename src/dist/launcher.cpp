#include "tessera/dist/launcher.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <ostream>
#include <string>
#include <thread>

#include "tessera/core/error.h"

extern char** environ;

namespace tessera::dist {
namespace {

constexpr const char* kUsage =
    "usage: tessera-launch --nproc N [--nnodes N --node-rank I] [--master-addr A] "
    "[--master-port P] [--grace SECONDS] [--no-prefix] -- PROGRAM [ARGS...]";

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

int pick_free_port(const std::string& addr) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  TESSERA_CHECK(fd >= 0, Unavailable, "tessera-launch: socket(): ", std::strerror(errno));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = 0;
  if (inet_pton(AF_INET, addr.c_str(), &sa.sin_addr) != 1) sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
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
  pid_t pid = -1;
  int out_fd = -1;
  int err_fd = -1;
  std::string out_partial, err_partial;
  bool exited = false;
  int status = 0;
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

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    return "was killed by signal " + std::to_string(sig) + " (" + strsignal(sig) + ")";
  }
  return "stopped";
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

pid_t spawn(const LaunchOptions& o, int local_rank, int port, int out_pipe[2], int err_pipe[2]) {
  const int world = o.nproc * o.nnodes;
  const int rank = o.node_rank * o.nproc + local_rank;
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) env_strings.emplace_back(*e);
  auto set_env = [&](const std::string& key, const std::string& value) {
    std::string prefix = key + "=";
    for (auto& s : env_strings) {
      if (s.rfind(prefix, 0) == 0) {
        s = prefix + value;
        return;
      }
    }
    env_strings.push_back(prefix + value);
  };
  set_env("RANK", std::to_string(rank));
  set_env("LOCAL_RANK", std::to_string(local_rank));
  set_env("WORLD_SIZE", std::to_string(world));
  set_env("LOCAL_WORLD_SIZE", std::to_string(o.nproc));
  set_env("GROUP_RANK", std::to_string(o.node_rank));
  set_env("MASTER_ADDR", o.master_addr);
  set_env("MASTER_PORT", std::to_string(port));
  set_env("TESSERA_LAUNCHED", "1");

  // Everything the child needs is prepared before fork(): after it, only
  // async-signal-safe calls.
  std::vector<char*> argv, envp;
  for (const auto& a : o.command) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  pid_t parent = getpid();

  pid_t pid = fork();
  TESSERA_CHECK(pid >= 0, Unavailable, "tessera-launch: fork(): ", std::strerror(errno));
  if (pid == 0) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // the launcher died before prctl
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    dup2(out_pipe[1], STDOUT_FILENO);
    dup2(err_pipe[1], STDERR_FILENO);
    close(out_pipe[0]);
    close(err_pipe[0]);
    close(out_pipe[1]);
    close(err_pipe[1]);
    execvpe(argv[0], argv.data(), envp.data());
    const char msg[] = "tessera-launch: cannot execute the program\n";
    [[maybe_unused]] ssize_t n = write(STDERR_FILENO, msg, sizeof(msg) - 1);
    _exit(127);
  }
  setpgid(pid, pid);  // also from the parent, so the group exists before any kill
  return pid;
}

}  // namespace

LaunchOptions parse_launch_args(const std::vector<std::string>& args) {
  LaunchOptions o;
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
    } else if (a == "--grace") {
      o.grace_seconds = std::stod(value(a));
    } else if (a == "--no-prefix") {
      o.prefix_output = false;
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

int launch(const LaunchOptions& o, std::ostream& log) {
  TESSERA_CHECK(o.nproc >= 1 && !o.command.empty(), InvalidArgument,
                "tessera-launch: nothing to launch");
  int port = o.master_port != 0 ? o.master_port : pick_free_port(o.master_addr);

  TESSERA_CHECK(pipe2(g_signal_pipe, O_CLOEXEC | O_NONBLOCK) == 0, Unavailable,
                "tessera-launch: pipe(): ", std::strerror(errno));
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  struct sigaction old_int {}, old_term {};
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);

  std::vector<Rank> ranks(o.nproc);
  for (int i = 0; i < o.nproc; ++i) {
    int out_pipe[2], err_pipe[2];
    TESSERA_CHECK(pipe2(out_pipe, O_CLOEXEC) == 0 && pipe2(err_pipe, O_CLOEXEC) == 0, Unavailable,
                  "tessera-launch: pipe(): ", std::strerror(errno));
    ranks[i].rank = o.node_rank * o.nproc + i;
    ranks[i].pid = spawn(o, i, port, out_pipe, err_pipe);
    close(out_pipe[1]);
    close(err_pipe[1]);
    ranks[i].out_fd = out_pipe[0];
    ranks[i].err_fd = err_pipe[0];
  }

  using Clock = std::chrono::steady_clock;
  int result = 0;
  bool stopping = false;
  Clock::time_point kill_at{};
  Clock::time_point drain_until{};
  std::string reason;
  auto stop_all = [&](int sig) {
    for (auto& r : ranks) {
      if (!r.exited) kill(-r.pid, sig);
    }
  };
  auto begin_stop = [&](const std::string& why) {
    if (stopping) return;
    stopping = true;
    reason = why;
    stop_all(SIGTERM);
    kill_at = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(o.grace_seconds * 1000));
  };

  auto open_fds = [&] {
    int n = 0;
    for (auto& r : ranks) n += (r.out_fd >= 0) + (r.err_fd >= 0);
    return n;
  };
  auto all_exited = [&] {
    for (auto& r : ranks) {
      if (!r.exited) return false;
    }
    return true;
  };

  while (!all_exited() || open_fds() > 0) {
    std::vector<pollfd> fds;
    std::vector<std::pair<int, bool>> owners;  // (rank index, is_stderr)
    fds.push_back({g_signal_pipe[0], POLLIN, 0});
    owners.push_back({-1, false});
    for (int i = 0; i < o.nproc; ++i) {
      if (ranks[i].out_fd >= 0) {
        fds.push_back({ranks[i].out_fd, POLLIN, 0});
        owners.push_back({i, false});
      }
      if (ranks[i].err_fd >= 0) {
        fds.push_back({ranks[i].err_fd, POLLIN, 0});
        owners.push_back({i, true});
      }
    }
    int ready = poll(fds.data(), fds.size(), 50);
    if (ready < 0 && errno != EINTR) break;
    for (size_t k = 0; ready > 0 && k < fds.size(); ++k) {
      if (!(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      if (owners[k].first < 0) {
        unsigned char sig = 0;
        while (read(g_signal_pipe[0], &sig, 1) == 1) {
        }
        begin_stop(std::string("tessera-launch received signal ") + std::to_string(sig));
        if (result == 0) result = 130;
        continue;
      }
      Rank& r = ranks[owners[k].first];
      bool is_err = owners[k].second;
      char buf[65536];
      ssize_t n = read(fds[k].fd, buf, sizeof(buf));
      std::string& partial = is_err ? r.err_partial : r.out_partial;
      std::string prefix = o.prefix_output ? "[rank " + std::to_string(r.rank) + "] " : "";
      if (n > 0) {
        partial.append(buf, static_cast<size_t>(n));
        flush_lines(partial, is_err ? STDERR_FILENO : STDOUT_FILENO, prefix, false);
      } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
        flush_lines(partial, is_err ? STDERR_FILENO : STDOUT_FILENO, prefix, true);
        close(fds[k].fd);
        (is_err ? r.err_fd : r.out_fd) = -1;
      }
    }
    // Reap.
    for (auto& r : ranks) {
      if (r.exited) continue;
      int status = 0;
      pid_t got = waitpid(r.pid, &status, WNOHANG);
      if (got != r.pid) continue;
      r.exited = true;
      r.status = status;
      // Whatever the rank left in its process group is orphaned now (and
      // may hold our pipes open): remove it.
      kill(-r.pid, SIGKILL);
      bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
      if (failed && !stopping) {
        result = exit_code_of(status);
        log << "tessera-launch: rank " << r.rank << " (pid " << r.pid << ") "
            << describe_status(status) << "; stopping the other ranks" << std::endl;
        begin_stop("rank " + std::to_string(r.rank) + " " + describe_status(status));
      }
    }
    // A process that escaped its group (setsid) could keep a pipe open
    // forever; once every rank is gone, stop reading after a short drain.
    if (all_exited()) {
      if (drain_until == Clock::time_point{}) drain_until = Clock::now() + std::chrono::seconds(2);
      if (Clock::now() >= drain_until) {
        for (auto& r : ranks) {
          for (int* fd : {&r.out_fd, &r.err_fd}) {
            if (*fd >= 0) close(*fd);
            *fd = -1;
          }
        }
      }
    }
    if (stopping && Clock::now() >= kill_at) {
      stop_all(SIGKILL);
      kill_at = Clock::now() + std::chrono::hours(1);
    }
  }
  // Process groups of ranks that exited may still hold stray children.
  for (auto& r : ranks) kill(-r.pid, SIGKILL);

  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  close(g_signal_pipe[0]);
  close(g_signal_pipe[1]);
  g_signal_pipe[0] = g_signal_pipe[1] = -1;

  if (result != 0) {
    int stopped = 0;
    for (auto& r : ranks) {
      if (WIFSIGNALED(r.status) && (WTERMSIG(r.status) == SIGTERM || WTERMSIG(r.status) == SIGKILL))
        ++stopped;
    }
    log << "tessera-launch: " << reason << "; " << stopped << " other rank"
        << (stopped == 1 ? " was" : "s were") << " stopped; exit code " << result << std::endl;
  }
  return result;
}

int free_port(const std::string& address) { return pick_free_port(address); }

}  // namespace tessera::dist
