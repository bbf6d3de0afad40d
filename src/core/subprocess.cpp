#include "tessera/core/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

#include "tessera/core/error.h"

extern char** environ;

namespace tessera {
namespace {

using Clock = std::chrono::steady_clock;

// Runs closures on one long-lived thread. Children that must die with this
// process are forked here: PR_SET_PDEATHSIG fires when the forking thread
// exits, and this thread lives until the process does.
class SpawnerThread {
 public:
  static SpawnerThread& instance() {
    static SpawnerThread spawner;  // process-wide by design (see above)
    return spawner;
  }

  template <typename Fn>
  auto run(Fn&& fn) -> decltype(fn()) {
    if (std::this_thread::get_id() == thread_.get_id()) return fn();
    std::packaged_task<decltype(fn())()> task(std::forward<Fn>(fn));
    auto result = task.get_future();
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.emplace_back([&task] { task(); });
    }
    cv_.notify_one();
    return result.get();
  }

 private:
  SpawnerThread() : thread_([this] { loop(); }) {}
  ~SpawnerThread() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }

  void loop() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return done_ || !tasks_.empty(); });
        if (tasks_.empty()) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  std::mutex mu_;  // guards tasks_ and done_
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool done_ = false;
  std::thread thread_;  // last: starts after the members above exist
};

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

// Writes errno to the exec-error pipe and ends the child (async-signal-safe).
[[noreturn]] void child_fail(int fd) {
  int err = errno;
  [[maybe_unused]] ssize_t n = ::write(fd, &err, sizeof(err));
  _exit(127);
}

struct Spawned {
  pid_t pid = -1;
  int out = -1, err = -1;
};

// Everything the child needs, prepared before fork(): after fork() the child
// may make async-signal-safe calls only (no allocation). The pointers point
// into this object and into `o`, so it is neither copied nor moved.
struct ExecArgs {
  explicit ExecArgs(const SpawnOptions& o) {
    std::map<std::string, std::string> env;
    for (char** e = environ; *e; ++e) {
      const char* eq = std::strchr(*e, '=');
      if (eq) env[std::string(*e, static_cast<size_t>(eq - *e))] = std::string(eq + 1);
    }
    for (const auto& name : o.unset_env) env.erase(name);
    for (const auto& [k, v] : o.env) env[k] = v;
    for (const auto& [k, v] : env) env_strings.push_back(k + "=" + v);
    for (const auto& a : o.argv) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    for (auto& s : env_strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    out_file = o.stdout_file.c_str();
    err_file = o.stderr_file.c_str();
    cwd = o.working_directory.empty() ? nullptr : o.working_directory.c_str();
    CPU_ZERO(&cpu_set);
    for (int cpu : o.cpus) CPU_SET(cpu, &cpu_set);
  }
  ExecArgs(const ExecArgs&) = delete;
  ExecArgs& operator=(const ExecArgs&) = delete;

  std::vector<std::string> env_strings;  // "NAME=value"
  std::vector<char*> argv, envp;         // null-terminated
  const char* out_file = nullptr;
  const char* err_file = nullptr;
  const char* cwd = nullptr;  // null: stay in the parent's directory
  cpu_set_t cpu_set;
};

// The pipes of one spawn, all close-on-exec: the exec-error pipe (the child
// writes errno there when it fails before or in exec; the parent reads EOF
// once exec succeeded) and, for Stream::kPipe, stdout and stderr. -1: none.
struct SpawnPipes {
  int exec_err[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};

  void close_all() {
    for (int* q : {exec_err, out, err}) {
      close_fd(q[0]);
      close_fd(q[1]);
    }
  }
};

// Unavailable naming the program when a pipe cannot be made (closing the
// pipes made so far).
void open_pipes(const SpawnOptions& o, SpawnPipes& p) {
  using Stream = SpawnOptions::Stream;
  TESSERA_CHECK(pipe2(p.exec_err, O_CLOEXEC) == 0, Unavailable, "spawning '", o.argv[0],
                "': pipe(): ", std::strerror(errno));
  auto make_pipe = [&](int fds[2]) {
    if (pipe2(fds, O_CLOEXEC) != 0) {
      const int e = errno;
      p.close_all();
      TESSERA_THROW(Unavailable, "spawning '", o.argv[0], "': pipe(): ", std::strerror(e));
    }
  };
  if (o.stdout_mode == Stream::kPipe) make_pipe(p.out);
  if (o.stderr_mode == Stream::kPipe) make_pipe(p.err);
}

// In the child: points `target` (stdout or stderr) where `mode` says
// (async-signal-safe; ends the child through `fail` on error).
void route_stream(SpawnOptions::Stream mode, int target, int pipe_end, const char* file, int fail) {
  using Stream = SpawnOptions::Stream;
  int fd = -1;
  switch (mode) {
    case Stream::kInherit:
      return;
    case Stream::kPipe:
      fd = pipe_end;
      break;
    case Stream::kNull:
      fd = open("/dev/null", O_WRONLY);
      break;
    case Stream::kFile:
      fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
      break;
    case Stream::kStdout:
      fd = STDOUT_FILENO;
      break;
  }
  if (fd < 0 || dup2(fd, target) < 0) child_fail(fail);
}

// The child after fork(): async-signal-safe calls only. Sets up the process
// group, parent-death signal, CPU affinity, signal dispositions, stdin,
// stdout, stderr and working directory, then execs; any failure goes to the
// exec-error pipe.
[[noreturn]] void exec_child(const SpawnOptions& o, const ExecArgs& a, const SpawnPipes& p,
                             pid_t parent) {
  const int fail = p.exec_err[1];
  if (o.new_process_group) setpgid(0, 0);
  if (o.die_with_parent) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);  // the parent died before prctl
  }
  if (!o.cpus.empty() && sched_setaffinity(0, sizeof(a.cpu_set), &a.cpu_set) != 0) {
    child_fail(fail);
  }
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  for (int sig = 1; sig < NSIG; ++sig) {
    if (sig != SIGKILL && sig != SIGSTOP) signal(sig, SIG_DFL);
  }
  if (!o.inherit_stdin) {
    const int null_in = open("/dev/null", O_RDONLY);
    if (null_in < 0 || dup2(null_in, STDIN_FILENO) < 0) child_fail(fail);
  }
  route_stream(o.stdout_mode, STDOUT_FILENO, p.out[1], a.out_file, fail);
  route_stream(o.stderr_mode, STDERR_FILENO, p.err[1], a.err_file, fail);
  if (a.cwd && chdir(a.cwd) != 0) child_fail(fail);
  execvpe(a.argv[0], a.argv.data(), a.envp.data());
  child_fail(fail);
}

// The parent after fork(): closes the child's pipe ends and waits until the
// child has exec'd (EOF on the exec-error pipe) or failed (its errno there:
// then reaps it and throws NotFound for a program that cannot be executed,
// Unavailable otherwise).
Spawned await_exec(const SpawnOptions& o, pid_t pid, SpawnPipes& p) {
  if (o.new_process_group) setpgid(pid, pid);  // also here, so the group exists before any kill
  close_fd(p.exec_err[1]);
  close_fd(p.out[1]);
  close_fd(p.err[1]);
  int child_errno = 0;
  ssize_t n;
  do {
    n = ::read(p.exec_err[0], &child_errno, sizeof(child_errno));
  } while (n < 0 && errno == EINTR);
  close_fd(p.exec_err[0]);
  if (n == static_cast<ssize_t>(sizeof(child_errno))) {
    waitpid(pid, nullptr, 0);
    close_fd(p.out[0]);
    close_fd(p.err[0]);
    if (child_errno == ENOENT || child_errno == EACCES || child_errno == ENOEXEC) {
      TESSERA_THROW(NotFound, "cannot execute '", o.argv[0], "': ", std::strerror(child_errno));
    }
    TESSERA_THROW(Unavailable, "starting '", o.argv[0],
                  "' failed in the child: ", std::strerror(child_errno));
  }
  return {pid, p.out[0], p.err[0]};
}

Spawned fork_exec(const SpawnOptions& o) {
  const ExecArgs args(o);
  SpawnPipes pipes;
  open_pipes(o, pipes);
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    const int e = errno;
    pipes.close_all();
    TESSERA_THROW(Unavailable, "spawning '", o.argv[0], "': fork(): ", std::strerror(e));
  }
  if (pid == 0) exec_child(o, args, pipes, parent);
  return await_exec(o, pid, pipes);
}
}  // namespace

std::string ExitStatus::describe() const {
  if (exited) return "exited with code " + std::to_string(code);
  return "was killed by signal " + std::to_string(signal) + " (" + strsignal(signal) + ")";
}

ExitStatus ExitStatus::from_wait_status(int status) {
  ExitStatus s;
  if (WIFEXITED(status)) {
    s.exited = true;
    s.code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    s.signal = WTERMSIG(status);
  }
  return s;
}

Subprocess Subprocess::spawn(const SpawnOptions& options) {
  using Stream = SpawnOptions::Stream;
  TESSERA_CHECK(!options.argv.empty() && !options.argv[0].empty(), InvalidArgument,
                "spawn: no program given");
  TESSERA_CHECK(options.stdout_mode != Stream::kStdout, InvalidArgument, "spawn '", options.argv[0],
                "': kStdout is for stderr only");
  TESSERA_CHECK(options.stdout_mode != Stream::kFile || !options.stdout_file.empty(),
                InvalidArgument, "spawn '", options.argv[0],
                "': stdout to a file needs stdout_file");
  TESSERA_CHECK(options.stderr_mode != Stream::kFile || !options.stderr_file.empty(),
                InvalidArgument, "spawn '", options.argv[0],
                "': stderr to a file needs stderr_file");
  Spawned s = options.die_with_parent
                  ? SpawnerThread::instance().run([&] { return fork_exec(options); })
                  : fork_exec(options);
  Subprocess p;
  p.pid_ = s.pid;
  p.group_ = options.new_process_group;
  p.name_ = options.argv[0];
  p.stdout_fd_ = s.out;
  p.stderr_fd_ = s.err;
  return p;
}

Subprocess::Subprocess(Subprocess&& other) noexcept { *this = std::move(other); }

Subprocess& Subprocess::operator=(Subprocess&& other) noexcept {
  if (this != &other) {
    release();
    pid_ = other.pid_;
    group_ = other.group_;
    name_ = std::move(other.name_);
    stdout_fd_ = other.stdout_fd_;
    stderr_fd_ = other.stderr_fd_;
    status_ = other.status_;
    other.pid_ = -1;
    other.stdout_fd_ = other.stderr_fd_ = -1;
    other.status_.reset();
  }
  return *this;
}

Subprocess::~Subprocess() { release(); }

void Subprocess::release() {
  if (pid_ > 0 && !status_) {
    signal(SIGKILL);
    int status = 0;
    while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }
  if (pid_ > 0 && group_) ::kill(-pid_, SIGKILL);
  close_fd(stdout_fd_);
  close_fd(stderr_fd_);
  pid_ = -1;
  status_.reset();
}

void Subprocess::close_stdout() { close_fd(stdout_fd_); }
void Subprocess::close_stderr() { close_fd(stderr_fd_); }

std::optional<ExitStatus> Subprocess::poll() {
  if (status_ || pid_ <= 0) return status_;
  int status = 0;
  pid_t got;
  do {
    got = waitpid(pid_, &status, WNOHANG);
  } while (got < 0 && errno == EINTR);
  if (got == pid_) status_ = ExitStatus::from_wait_status(status);
  return status_;
}

std::optional<ExitStatus> Subprocess::wait_for(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  auto pause = std::chrono::milliseconds(1);
  for (;;) {
    if (auto s = poll()) return s;
    if (Clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(20));
  }
}

ExitStatus Subprocess::wait() {
  TESSERA_CHECK(pid_ > 0, FailedPrecondition, "wait: no process");
  if (status_) return *status_;
  int status = 0;
  while (waitpid(pid_, &status, 0) < 0) {
    if (errno != EINTR) TESSERA_THROW(Internal, "waitpid(", pid_, "): ", std::strerror(errno));
  }
  status_ = ExitStatus::from_wait_status(status);
  return *status_;
}

void Subprocess::signal(int sig) {
  if (pid_ <= 0 || status_) return;
  ::kill(group_ ? -pid_ : pid_, sig);
}

void Subprocess::kill_group() {
  if (pid_ > 0 && group_) ::kill(-pid_, SIGKILL);
}

ExitStatus Subprocess::stop(std::chrono::milliseconds grace) {
  TESSERA_CHECK(pid_ > 0, FailedPrecondition, "stop: no process");
  signal(SIGTERM);
  std::optional<ExitStatus> s = wait_for(grace);
  if (!s) {
    signal(SIGKILL);
    s = wait();
  }
  kill_group();
  return *s;
}

CommandResult run_command(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                          bool merge_stderr, const std::map<std::string, std::string>& env) {
  SpawnOptions o;
  o.argv = argv;
  o.env = env;
  o.stdout_mode = SpawnOptions::Stream::kPipe;
  o.stderr_mode = merge_stderr ? SpawnOptions::Stream::kStdout : SpawnOptions::Stream::kInherit;
  Subprocess p = Subprocess::spawn(o);
  CommandResult r;
  const auto deadline = Clock::now() + timeout;
  Clock::time_point drain_until{};
  while (p.stdout_fd() >= 0) {
    const auto now = Clock::now();
    if (now >= deadline) {
      p.stop(std::chrono::milliseconds(0));
      TESSERA_THROW(DeadlineExceeded, "'", argv[0], "' ran longer than ",
                    std::chrono::duration<double>(timeout).count(), " s and was killed");
    }
    // A process the command left behind may hold the pipe open after the
    // command itself ended: read what is there for a moment, then stop.
    if (drain_until == Clock::time_point{} && !p.running())
      drain_until = now + std::chrono::milliseconds(200);
    if (drain_until != Clock::time_point{} && now >= drain_until) break;
    pollfd fd{p.stdout_fd(), POLLIN, 0};
    const int ready = ::poll(&fd, 1, 20);
    if (ready <= 0) continue;
    char buffer[65536];
    const ssize_t n = ::read(p.stdout_fd(), buffer, sizeof(buffer));
    if (n > 0) {
      r.output.append(buffer, static_cast<size_t>(n));
    } else if (n == 0 || errno != EINTR) {
      p.close_stdout();
    }
  }
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  std::optional<ExitStatus> s = p.wait_for(std::max(left, std::chrono::milliseconds(0)));
  if (!s) {
    p.stop(std::chrono::milliseconds(0));
    TESSERA_THROW(DeadlineExceeded, "'", argv[0], "' ran longer than ",
                  std::chrono::duration<double>(timeout).count(), " s and was killed");
  }
  p.kill_group();
  r.status = *s;
  return r;
}

CommandResult run_shell(const std::string& command, std::chrono::milliseconds timeout,
                        bool merge_stderr) {
  return run_command({"/bin/sh", "-c", command}, timeout, merge_stderr);
}

}  // namespace tessera
