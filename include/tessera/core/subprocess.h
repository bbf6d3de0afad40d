// tessera/core/subprocess.h — child processes: spawn, watch, stop.
//
// The one place Tessera forks. The launcher's ranks, the RLHF driver's
// workers, the serverless-MoE platform's function instances and tools run
// by tests and benchmarks all start here, so the hard parts are solved once:
//   * everything the child needs is prepared before fork(); after it the
//     child makes only async-signal-safe calls;
//   * an exec failure ("no such file") is reported to the caller as a
//     tessera::Error, not as a child that exits 127;
//   * with `new_process_group`, the child leads its own process group, so
//     stop() reaches everything it started (its own children included);
//   * with `die_with_parent`, the child gets SIGKILL when this process dies
//     (PR_SET_PDEATHSIG). Linux ties that signal to the *thread* that
//     forked, so such children are forked from one long-lived spawner
//     thread, and a child started from a short-lived thread still lives as
//     long as the process that started it, not the thread.
//
//   tessera::SpawnOptions o;
//   o.argv = {"/usr/bin/redis-server", "--port", "6380"};
//   o.stdout_mode = tessera::SpawnOptions::Stream::kNull;
//   tessera::Subprocess redis = tessera::Subprocess::spawn(o);
//   ...
//   tessera::ExitStatus s = redis.stop(std::chrono::seconds(2));  // SIGTERM, then SIGKILL
//
//   auto r = tessera::run_command({"python3", "-c", "print(1 + 1)"}, std::chrono::seconds(30));
//   // r.status.success(), r.output == "2\n"
//
// Thread safety: a Subprocess is thread-compatible (one owner at a time);
// spawn() and run_command() may be called from any thread.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace tessera {

// How a child process ended.
struct ExitStatus {
  bool exited = false;  // true: it returned or called exit(); `code` holds the code
  int code = 0;
  int signal = 0;  // the signal that killed it, when !exited

  bool success() const { return exited && code == 0; }
  // The shell's convention: the code, or 128 + signal.
  int shell_code() const { return exited ? code : 128 + signal; }
  // "exited with code 3", "was killed by signal 9 (Killed)".
  std::string describe() const;
  // From a waitpid() status word.
  static ExitStatus from_wait_status(int status);
};

struct SpawnOptions {
  // Program and arguments. argv[0] is looked up in PATH unless it holds a '/'.
  std::vector<std::string> argv;
  // Variables set (or replaced) on top of this process's environment.
  std::map<std::string, std::string> env;
  // Variables removed from the inherited environment.
  std::vector<std::string> unset_env;
  // Working directory of the child; empty: this process's.
  std::string working_directory;

  enum class Stream {
    kInherit,  // the parent's descriptor
    kPipe,     // a pipe the parent reads (stdout_fd() / stderr_fd())
    kNull,     // /dev/null
    kFile,     // the file named by stdout_file / stderr_file (created or truncated)
    kStdout,   // stderr only: the same place as stdout
  };
  Stream stdout_mode = Stream::kInherit;
  Stream stderr_mode = Stream::kInherit;
  std::string stdout_file, stderr_file;
  // stdin is /dev/null unless this is true.
  bool inherit_stdin = false;

  // The child leads a new process group: stop() and signal() then reach
  // every process it starts, unless one leaves the group on purpose.
  bool new_process_group = true;
  // SIGKILL the child when this process dies (PR_SET_PDEATHSIG).
  bool die_with_parent = true;
  // CPUs the child may run on (sched_setaffinity); empty: this process's.
  std::vector<int> cpus;
  // Signal dispositions are reset to the default in the child (a parent
  // that ignores SIGINT or handles SIGTERM does not pass that on).
};

// A started child process. Destroying a Subprocess whose process still runs
// kills it (and its group) with SIGKILL and reaps it: no zombies, no
// orphans. Move-only.
class Subprocess {
 public:
  // Starts the process. NotFound naming the program when it cannot be
  // executed (missing, not executable), Unavailable when fork or pipe
  // creation fails, InvalidArgument for an empty argv or a kFile stream
  // without a file name.
  static Subprocess spawn(const SpawnOptions& options);

  Subprocess() = default;
  Subprocess(Subprocess&& other) noexcept;
  Subprocess& operator=(Subprocess&& other) noexcept;
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;
  ~Subprocess();

  pid_t pid() const { return pid_; }
  bool valid() const { return pid_ > 0; }
  // The program, for messages.
  const std::string& name() const { return name_; }
  // Read ends of the pipes (kPipe), owned by this object; -1 otherwise or
  // after close_stdout()/close_stderr().
  int stdout_fd() const { return stdout_fd_; }
  int stderr_fd() const { return stderr_fd_; }
  void close_stdout();
  void close_stderr();

  // The exit status once the process has ended (reaping it), without
  // blocking; nullopt while it runs. After it has been reaped, returns the
  // same status again.
  std::optional<ExitStatus> poll();
  // Blocks until the process ends, or for at most `timeout` (nullopt then).
  std::optional<ExitStatus> wait_for(std::chrono::milliseconds timeout);
  ExitStatus wait();
  bool running() { return !poll().has_value(); }

  // Sends `sig` to the process group (new_process_group) or the process.
  // No-op once the process has been reaped.
  void signal(int sig);
  // SIGTERM, then SIGKILL if it has not ended after `grace`; waits for it
  // and returns how it ended. Leftover members of its process group are
  // killed too.
  ExitStatus stop(std::chrono::milliseconds grace);
  // SIGKILL to whatever is left of the process group of a child that has
  // exited (processes it started and did not wait for).
  void kill_group();

 private:
  // Kills and reaps a running process, closes the pipes, empties the object.
  void release();

  pid_t pid_ = -1;
  bool group_ = false;
  std::string name_;
  int stdout_fd_ = -1, stderr_fd_ = -1;
  std::optional<ExitStatus> status_;
};

struct CommandResult {
  ExitStatus status;
  std::string output;  // stdout (and stderr when merged)
};

// Runs a program to completion and returns its output. When it runs past
// `timeout` it is killed (with its process group) and DeadlineExceeded names
// the command. Errors of spawn() propagate.
CommandResult run_command(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                          bool merge_stderr = true,
                          const std::map<std::string, std::string>& env = {});

// run_command of {"/bin/sh", "-c", command}.
CommandResult run_shell(const std::string& command, std::chrono::milliseconds timeout,
                        bool merge_stderr = true);

}  // namespace tessera
