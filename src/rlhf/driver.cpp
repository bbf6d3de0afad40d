// The driver side of the rlhf runtime: spawning pools, registration,
// protocol-applied calls with futures, health monitoring and failure
// handling.
#include "tessera/rlhf/driver.h"

#include <ATen/ATen.h>
#include <signal.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "runtime_internal.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/subprocess.h"
#include "tessera/dist/launcher.h"
#include "tessera/rlhf/worker.grpc.pb.h"
#include "tessera/rpc/rpc.h"

namespace tessera::rlhf {

double CallResult::metric(const std::string& key) const {
  double sum = 0;
  int n = 0;
  for (const auto& m : metrics) {
    auto it = m.find(key);
    if (it != m.end()) {
      sum += it->second;
      ++n;
    }
  }
  TESSERA_CHECK(n > 0, NotFound, "no worker reported metric '", key, "'");
  return sum / n;
}

namespace {

using Clock = std::chrono::steady_clock;

std::exception_ptr error_ptr(ErrorCode code, const std::string& message) {
  try {
    throw_error(code, message);
  } catch (...) {
    return std::current_exception();
  }
}

Protocol parse_protocol(const std::string& name) {
  for (Protocol p :
       {Protocol::kOneToAll, Protocol::kAllToAll, Protocol::kRankZero, Protocol::kDpCompute}) {
    if (name == protocol_name(p)) return p;
  }
  throw InvalidArgument("unknown transfer protocol '" + name + "'");
}

}  // namespace

struct Driver::Impl final : public proto::Driver::Service {
  DriverOptions opt;
  std::string run_id, scratch;
  rpc::Server server;

  struct Process {
    ProcessInfo info;
    Subprocess process;
    pid_t pid = -1;
    bool exited = false;
    std::unique_ptr<proto::Worker::Stub> stub;
    Clock::time_point last_healthy = Clock::now();
  };
  std::vector<Process> procs;
  struct MethodEntry {
    Protocol protocol = Protocol::kOneToAll;
    std::vector<MethodMesh> mesh;  // by pool rank
  };
  std::map<std::string, std::vector<int>> role_processes;  // role -> global processes by pool rank
  std::map<std::string, std::map<std::string, MethodEntry>> methods;

  // One in-flight RPC of a call.
  struct Pending {
    grpc::ClientContext ctx;
    proto::CallRequest request;
    proto::CallReply reply;
    grpc::Status status;
    int worker = 0, process = 0;
  };
  struct Inflight {
    std::string role, method;
    Protocol protocol;
    std::vector<MethodMesh> mesh;
    std::vector<int64_t> repeat;  // padding rows per worker
    std::vector<std::unique_ptr<Pending>> calls;
    std::atomic<int> remaining{0};
    std::promise<CallResult> promise;
    std::string output;
  };

  mutable std::mutex mu;
  std::condition_variable cv;
  int registered = 0;
  std::string setup_error;
  std::string failure_message;
  ErrorCode failure_code = ErrorCode::kUnavailable;
  bool stopping = false, stopped = false;
  std::vector<uint64_t> next_seq;
  std::set<Inflight*> inflight;
  uint64_t call_counter = 0;
  std::map<std::string, Batch> driver_batches;
  std::atomic<int64_t> request_bytes{0};
  std::thread monitor;

  // --- Registration (Driver service) ---------------------------------------
  grpc::Status Register(grpc::ServerContext*, const proto::RegisterRequest* req,
                        proto::RegisterReply*) override {
    return rpc::guard([&] {
      std::lock_guard<std::mutex> lock(mu);
      TESSERA_CHECK(req->run_id() == run_id, InvalidArgument, "registration for run '",
                    req->run_id(), "', this driver runs '", run_id, "'");
      TESSERA_CHECK(req->process() >= 0 && req->process() < static_cast<int>(procs.size()),
                    InvalidArgument, "registration of unknown process ", req->process());
      Process& p = procs[req->process()];
      if (!req->error().empty()) {
        if (setup_error.empty())
          setup_error = describe(req->process(), "") + " failed to set up: " + req->error();
        cv.notify_all();
        return;
      }
      TESSERA_CHECK(p.info.address.empty(), InvalidArgument, "process ", req->process(),
                    " registered twice");
      p.info.address = req->address();
      p.stub = proto::Worker::NewStub(rpc::channel(req->address(), {opt.max_message_bytes}));
      p.last_healthy = Clock::now();
      for (const proto::MethodInfo& m : req->methods()) {
        MethodEntry& e = methods[m.role()][m.method()];
        const auto& ranks = role_processes.at(m.role());
        e.protocol = parse_protocol(m.protocol());
        e.mesh.resize(ranks.size());
        e.mesh[p.info.rank] = MethodMesh{m.dp_size(), m.tp_size(), m.dp_rank(), m.tp_rank()};
      }
      ++registered;
      cv.notify_all();
    });
  }

  // "actor rank 1 (pid 4242, pool 'all' rank 1; also hosts reference, reward)".
  std::string describe(int process, const std::string& role) const {
    const Process& p = procs[process];
    std::string name =
        role.empty() ? (p.info.roles.empty() ? "worker" : p.info.roles.front()) : role;
    std::string others;
    for (const std::string& r : p.info.roles) {
      if (r != name) others += (others.empty() ? "" : ", ") + r;
    }
    return detail::concat(name, " rank ", p.info.rank, " (pid ", p.pid, ", pool '", p.info.pool,
                          "' rank ", p.info.rank, others.empty() ? "" : "; also hosts " + others,
                          ")");
  }

  // The call in flight on a process (null when none), for messages. mu held.
  const Inflight* running_on(int process) const {
    for (const Inflight* f : inflight) {
      for (const auto& c : f->calls) {
        if (c->process == process) return f;
      }
    }
    return nullptr;
  }

  // Records the first failure, cancels every in-flight call and wakes the
  // monitor, which stops the workers. mu held.
  void fail_locked(ErrorCode code, const std::string& message) {
    if (!failure_message.empty()) return;
    failure_message = message;
    failure_code = code;
    TESSERA_LOG(Error, "rlhf") << message;
    for (Inflight* f : inflight) {
      for (auto& c : f->calls) c->ctx.TryCancel();
    }
    cv.notify_all();
  }

  [[noreturn]] void throw_failure_locked() const { throw_error(failure_code, failure_message); }

  // --- Processes -------------------------------------------------------------
  void spawn_all() {
    int index = 0;
    int total = 0;
    for (const PoolSpec& pool : opt.pools) total += pool.processes;
    const int cpus = std::max(1, static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)));
    int first_cpu = 0;
    for (const PoolSpec& pool : opt.pools) {
      TESSERA_CHECK(pool.processes >= 1, InvalidArgument, "pool '", pool.name,
                    "' needs at least one process");
      nlohmann::json roles = nlohmann::json::array();
      std::vector<std::string> role_names;
      for (const RoleSpec& r : opt.roles) {
        if (r.pool != pool.name) continue;
        roles.push_back({{"name", r.name}, {"type", r.type}, {"config", r.config_json}});
        role_names.push_back(r.name);
      }
      TESSERA_CHECK(!role_names.empty(), InvalidArgument, "pool '", pool.name, "' hosts no role");
      const int port = dist::free_port("127.0.0.1");
      const int pool_cpus = std::max(1, cpus * pool.processes / total);
      for (int rank = 0; rank < pool.processes; ++rank, ++index) {
        Process p;
        p.info.process = index;
        p.info.pool = pool.name;
        p.info.rank = rank;
        p.info.roles = role_names;
        for (const std::string& r : role_names) role_processes[r].push_back(index);
        std::vector<std::string> env = {
            std::string(internal::kEnvDriver) + "=" + server.address(),
            std::string(internal::kEnvRun) + "=" + run_id,
            std::string(internal::kEnvProcess) + "=" + std::to_string(index),
            std::string(internal::kEnvPool) + "=" + pool.name,
            std::string(internal::kEnvRoles) + "=" + roles.dump(),
            std::string(internal::kEnvScratch) + "=" + scratch,
            std::string(internal::kEnvMaxMessage) + "=" + std::to_string(opt.max_message_bytes),
            "RANK=" + std::to_string(rank),
            "LOCAL_RANK=" + std::to_string(rank),
            "WORLD_SIZE=" + std::to_string(pool.processes),
            "LOCAL_WORLD_SIZE=" + std::to_string(pool.processes),
            "MASTER_ADDR=127.0.0.1",
            "MASTER_PORT=" + std::to_string(port)};
        for (const std::string& e : opt.worker_env) env.push_back(e);
        p.process = spawn(env, opt.pin_cpus ? (first_cpu + rank % pool_cpus) % cpus : -1);
        p.pid = p.process.pid();
        p.info.pid = p.pid;
        procs.push_back(std::move(p));
      }
      first_cpu += pool_cpus;
    }
    next_seq.assign(procs.size(), 0);
  }

  // A worker process: this program again (or opt.program) with the
  // driver's variables, dying with this process, optionally pinned.
  Subprocess spawn(const std::vector<std::string>& extra_env, int cpu) {
    SpawnOptions so;
    so.argv = {opt.program};
    so.argv.insert(so.argv.end(), opt.program_args.begin(), opt.program_args.end());
    for (const std::string& e : extra_env)
      so.env[e.substr(0, e.find('='))] = e.substr(e.find('=') + 1);
    if (cpu >= 0) so.cpus = {cpu};
    so.new_process_group = false;
    so.inherit_stdin = true;
    return Subprocess::spawn(so);
  }

  // Reaps exited workers and checks health; on a failure, stops everyone.
  void monitor_loop() {
    const auto interval = opt.health_interval;
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait_for(lock, interval, [&] { return stopping || !failure_message.empty(); });
        if (stopping) return;
        if (!failure_message.empty()) break;
        for (Process& p : procs) {
          if (p.exited) continue;
          std::optional<ExitStatus> status = p.process.poll();
          if (!status) continue;
          p.exited = true;
          const Inflight* owner = running_on(p.info.process);
          fail_locked(
              ErrorCode::kUnavailable,
              detail::concat("worker ", describe(p.info.process, owner ? owner->role : ""), " ",
                             status->describe(),
                             owner ? " during " + owner->role + "." + owner->method : std::string(),
                             "; stopping the run"));
          break;
        }
        if (!failure_message.empty()) break;
      }
      // Health checks outside the lock (each with a short deadline).
      for (Process& p : procs) {
        if (!p.stub || p.exited) continue;
        grpc::ClientContext ctx;
        rpc::set_deadline(ctx, std::max<std::chrono::milliseconds>(std::chrono::seconds(1),
                                                                   opt.health_interval * 2));
        proto::HealthRequest req;
        proto::HealthReply reply;
        grpc::Status st = p.stub->Health(&ctx, req, &reply);
        std::lock_guard<std::mutex> lock(mu);
        if (st.ok()) {
          p.last_healthy = Clock::now();
        } else if (Clock::now() - p.last_healthy > opt.health_timeout) {
          fail_locked(ErrorCode::kUnavailable,
                      detail::concat("worker ", describe(p.info.process, ""),
                                     " stopped answering health checks for ",
                                     opt.health_timeout.count() / 1000.0, " s (",
                                     st.error_message(), "); stopping the run"));
        }
      }
    }
    kill_all();
  }

  void kill_all() {
    for (Process& p : procs) {
      if (!p.exited) p.process.signal(SIGTERM);
    }
    reap_all(2.0);
    for (Process& p : procs) {
      if (!p.exited) p.process.signal(SIGKILL);
    }
    reap_all(10.0);
  }

  void reap_all(double seconds) {
    const auto until =
        Clock::now() + std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6));
    while (true) {
      bool all = true;
      for (Process& p : procs) {
        if (p.exited) continue;
        if (p.process.poll()) {
          p.exited = true;
        } else {
          all = false;
        }
      }
      if (all || Clock::now() > until) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  // --- Calls -----------------------------------------------------------------
  // Parts of `ref` covering its rows [begin, end).
  void add_parts(const BatchRef& ref, int64_t begin, int64_t end, proto::InputRef* out) {
    for (const BatchPart& part : ref.parts) {
      const int64_t b = std::max(begin, part.begin), e = std::min(end, part.end);
      if (b >= e) continue;
      proto::BatchPart* bp = out->add_parts();
      bp->set_process(part.process);
      bp->set_offset(part.offset + (b - part.begin));
      bp->set_rows(e - b);
      if (part.process == -1) {
        std::lock_guard<std::mutex> lock(mu);
        auto it = driver_batches.find(ref.name);
        TESSERA_CHECK(it != driver_batches.end(), NotFound, "batch '", ref.name, "' was released");
        for (const auto& [k, t] : it->second) {
          rpc::to_proto(t.narrow(0, part.offset + (b - part.begin), e - b), k,
                        bp->add_inline_rows());
        }
      }
    }
  }

  std::future<CallResult> call(const std::string& role, const std::string& method,
                               const std::vector<BatchRef>& inputs, const Args& args,
                               const CallOptions& co) {
    auto f = std::make_shared<Inflight>();
    f->role = role;
    f->method = method;
    std::vector<int> workers;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!failure_message.empty()) throw_failure_locked();
      TESSERA_CHECK(!stopped, FailedPrecondition, "the driver has shut its workers down");
      auto r = methods.find(role);
      TESSERA_CHECK(r != methods.end(), NotFound, "no role '", role, "'");
      auto m = r->second.find(method);
      if (m == r->second.end()) {
        std::string known;
        for (const auto& [k, v] : r->second) known += (known.empty() ? "" : ", ") + k;
        throw InvalidArgument(
            detail::concat("role '", role, "' has no method '", method, "' (has: ", known, ")"));
      }
      f->protocol = m->second.protocol;
      f->mesh = m->second.mesh;
      workers = role_processes.at(role);
      f->output =
          co.output.empty() ? detail::concat(role, ".", method, "#", ++call_counter) : co.output;
    }
    int64_t rows = 0;
    for (size_t i = 0; i < inputs.size(); ++i) {
      TESSERA_CHECK(!inputs[i].empty(), InvalidArgument, role, ".", method, ": input ", i,
                    " is an empty reference");
      if (i == 0) rows = inputs[i].rows;
      TESSERA_CHECK(inputs[i].rows == rows || f->protocol == Protocol::kOneToAll ||
                        f->protocol == Protocol::kRankZero,
                    InvalidArgument, role, ".", method, ": inputs have ", rows, " and ",
                    inputs[i].rows, " rows; ", protocol_name(f->protocol), " splits them together");
    }
    const int n = static_cast<int>(workers.size());
    if (f->protocol == Protocol::kAllToAll) {
      TESSERA_CHECK(rows % n == 0, InvalidArgument, role, ".", method, ": ALL_TO_ALL needs rows (",
                    rows, ") divisible by the ", n, " workers");
    }
    const std::chrono::milliseconds timeout =
        co.timeout.count() > 0 ? co.timeout : opt.call_timeout;
    const std::string args_json = args.json();
    f->repeat.assign(n, 0);
    for (int w = 0; w < n; ++w) {
      auto p = std::make_unique<Pending>();
      p->worker = w;
      p->process = workers[w];
      proto::CallRequest& req = p->request;
      req.set_role(role);
      req.set_method(method);
      req.set_args_json(args_json);
      req.set_output(f->output);
      req.set_publish(
          true);  // consumers may sit on other processes (other dp layouts, other pools)
      // Rows [begin, end) of the inputs, then the last of them `repeat`
      // more times; `padding` of the chunk's rows are not real.
      int64_t begin = 0, end = rows, repeat = 0, padding = 0;
      const MethodMesh& mesh = f->mesh[w];
      if (f->protocol == Protocol::kDpCompute && rows > 0) {
        const DpChunk c = dp_compute_chunk(rows, mesh.dp_size, mesh.dp_rank);
        begin = c.begin;
        end = c.end;
        repeat = c.repeat;
        padding = c.padding;
      } else if (f->protocol == Protocol::kAllToAll) {
        begin = w * (rows / n);
        end = begin + rows / n;
      }
      f->repeat[w] = padding;
      for (const BatchRef& ref : inputs) {
        proto::InputRef* in = req.add_inputs();
        in->set_batch(ref.name);
        in->set_repeat_last(repeat);
        add_parts(ref, begin, end, in);
      }
      const size_t bytes = req.ByteSizeLong();
      TESSERA_CHECK(
          bytes <= static_cast<size_t>(opt.max_message_bytes), ResourceExhausted, role, ".", method,
          ": the request to worker ", w, " is ", bytes, " bytes, over the ", opt.max_message_bytes,
          "-byte message limit (put() is for small batches; larger data moves between workers)");
      request_bytes += static_cast<int64_t>(bytes);
      rpc::set_deadline(p->ctx, timeout);
      f->calls.push_back(std::move(p));
    }
    std::future<CallResult> future = f->promise.get_future();
    std::lock_guard<std::mutex> lock(mu);
    if (!failure_message.empty()) throw_failure_locked();
    // Sequence numbers for every worker at once, under the lock: all
    // processes see calls in the same relative order, so colocated roles'
    // collectives can never interleave differently on two processes.
    for (auto& p : f->calls) p->request.set_seq(++next_seq[p->process]);
    inflight.insert(f.get());
    f->remaining = static_cast<int>(f->calls.size());
    for (auto& p : f->calls) {
      Pending* raw = p.get();
      procs[raw->process].stub->async()->Call(&raw->ctx, &raw->request, &raw->reply,
                                              [this, f, raw](grpc::Status status) {
                                                raw->status = std::move(status);
                                                if (--f->remaining == 0) finish(f);
                                              });
    }
    return future;
  }

  void finish(const std::shared_ptr<Inflight>& f) {
    std::unique_lock<std::mutex> lock(mu);
    inflight.erase(f.get());
    // Errors: a rejected request (the same on every worker) fails only this
    // call; anything else (a worker gone, a deadline, an internal error)
    // fails the run.
    for (const auto& p : f->calls) {
      if (p->status.ok()) continue;
      const grpc::StatusCode code = p->status.error_code();
      const std::string what =
          detail::concat(f->role, ".", f->method, " on ", describe(p->process, f->role));
      if (!failure_message.empty()) {
        const std::string msg = failure_message;
        const ErrorCode c = failure_code;
        lock.unlock();
        f->promise.set_exception(error_ptr(c, msg));
        return;
      }
      if (code == grpc::StatusCode::INVALID_ARGUMENT || code == grpc::StatusCode::NOT_FOUND ||
          code == grpc::StatusCode::RESOURCE_EXHAUSTED ||
          code == grpc::StatusCode::FAILED_PRECONDITION) {
        lock.unlock();
        try {
          rpc::check(p->status, what, procs[p->process].info.address);
        } catch (...) {
          f->promise.set_exception(std::current_exception());
        }
        return;
      }
      const std::string msg =
          code == grpc::StatusCode::DEADLINE_EXCEEDED
              ? what + " exceeded its deadline; stopping the run"
              : detail::concat(what, " failed: ", p->status.error_message(), "; stopping the run");
      fail_locked(rpc::from_grpc_code(code), msg);
      lock.unlock();
      f->promise.set_exception(error_ptr(rpc::from_grpc_code(code), msg));
      return;
    }
    lock.unlock();
    CallResult result;
    result.output.name = f->output;
    std::vector<int> collected;
    const int n = static_cast<int>(f->calls.size());
    if (f->protocol == Protocol::kDpCompute) {
      std::map<int, int> by_dp;
      for (int w = 0; w < n; ++w) {
        if (f->mesh[w].tp_rank == 0 && !by_dp.count(f->mesh[w].dp_rank))
          by_dp[f->mesh[w].dp_rank] = w;
      }
      for (const auto& [dp, w] : by_dp) collected.push_back(w);
    } else if (f->protocol == Protocol::kRankZero) {
      collected.push_back(0);
    } else {
      for (int w = 0; w < n; ++w) collected.push_back(w);
    }
    const bool rows_from_all =
        f->protocol == Protocol::kDpCompute || f->protocol == Protocol::kAllToAll;
    int64_t row = 0;
    for (size_t i = 0; i < collected.size(); ++i) {
      const Pending& p = *f->calls[collected[i]];
      result.metrics.emplace_back(p.reply.metrics().begin(), p.reply.metrics().end());
      result.seconds = std::max(result.seconds, p.reply.seconds());
      if (!rows_from_all && i > 0) continue;
      int64_t out = p.reply.output_rows();
      // Drop the rows the padding produced: k output rows per input row.
      const int64_t in_rows = p.request.inputs_size() ? [&] {
        int64_t r = 0;
        for (const auto& part : p.request.inputs(0).parts()) r += part.rows();
        return r + p.request.inputs(0).repeat_last();
      }() : 0;
      const int64_t repeat = f->repeat[collected[i]];
      if (repeat > 0 && in_rows > 0 && out > 0) out -= repeat * (out / in_rows);
      if (out <= 0) continue;
      result.output.parts.push_back({p.process, row, row + out, 0});
      row += out;
    }
    for (const auto& p : f->calls) result.seconds = std::max(result.seconds, p->reply.seconds());
    result.output.rows = row;
    if (row == 0) result.output = BatchRef{};
    f->promise.set_value(std::move(result));
  }
};

int WorkerGroup::size() const {
  std::lock_guard<std::mutex> lock(driver_->impl_->mu);
  return static_cast<int>(driver_->impl_->role_processes.at(role_).size());
}

PendingCall WorkerGroup::call(const std::string& method, const std::vector<BatchRef>& inputs,
                              const Args& args, const CallOptions& options) {
  return driver_->pending(driver_->impl_->call(role_, method, inputs, args, options),
                          role_ + "." + method);
}

PendingCall Driver::pending(std::future<CallResult> result, std::string what) {
  return PendingCall(result.share(), std::move(what));
}

CallResult PendingCall::wait(std::chrono::milliseconds timeout) const {
  TESSERA_CHECK(result_.valid(), FailedPrecondition, "wait on an empty call handle");
  if (result_.wait_for(timeout) != std::future_status::ready) {
    TESSERA_THROW(DeadlineExceeded, what_, " did not complete within ", timeout.count() / 1000.0,
                  " s of waiting (the call keeps running until its own deadline)");
  }
  return result_.get();
}

CallResult PendingCall::get() const {
  TESSERA_CHECK(result_.valid(), FailedPrecondition, "get on an empty call handle");
  return result_.get();
}

bool PendingCall::ready() const {
  return result_.valid() && result_.wait_for(std::chrono::seconds(0)) == std::future_status::ready;
}

Driver::Driver(DriverOptions options) : impl_(std::make_unique<Impl>()) {
  Impl& d = *impl_;
  d.opt = std::move(options);
  TESSERA_CHECK(!d.opt.pools.empty() && !d.opt.roles.empty(), InvalidArgument,
                "driver: needs at least one pool and one role");
  std::set<std::string> pools, roles;
  for (const PoolSpec& p : d.opt.pools) {
    TESSERA_CHECK(pools.insert(p.name).second, InvalidArgument, "driver: pool '", p.name,
                  "' defined twice");
  }
  for (const RoleSpec& r : d.opt.roles) {
    TESSERA_CHECK(roles.insert(r.name).second, InvalidArgument, "driver: role '", r.name,
                  "' defined twice");
    TESSERA_CHECK(pools.count(r.pool), InvalidArgument, "driver: role '", r.name,
                  "' is placed on unknown pool '", r.pool, "'");
  }
  if (d.opt.program.empty()) {
    char self[PATH_MAX];
    const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    TESSERA_CHECK(n > 0, Internal, "driver: cannot resolve /proc/self/exe");
    d.opt.program = std::string(self, static_cast<size_t>(n));
  }
  std::random_device rd;
  d.run_id = detail::concat(getpid(), "-", std::hex, rd());
  const std::string base = std::filesystem::exists("/dev/shm")
                               ? "/dev/shm"
                               : std::filesystem::temp_directory_path().string();
  d.scratch = base + "/tessera-rlhf-" + d.run_id;
  std::filesystem::create_directories(d.scratch);
  d.server = rpc::Server::start({&d}, {"127.0.0.1", 0, d.opt.max_message_bytes});
  d.spawn_all();
  d.monitor = std::thread([&d] { d.monitor_loop(); });
  std::unique_lock<std::mutex> lock(d.mu);
  const bool ok = d.cv.wait_for(lock, d.opt.start_timeout, [&] {
    return d.registered == static_cast<int>(d.procs.size()) || !d.setup_error.empty() ||
           !d.failure_message.empty();
  });
  std::string error;
  ErrorCode code = ErrorCode::kDeadlineExceeded;
  if (!d.setup_error.empty()) {
    error = d.setup_error;
    code = ErrorCode::kFailedPrecondition;
    d.fail_locked(code, error);
  } else if (!d.failure_message.empty()) {
    error = d.failure_message;
    code = d.failure_code;
  } else if (!ok) {
    std::string missing;
    for (const auto& p : d.procs) {
      if (p.info.address.empty())
        missing += (missing.empty() ? "" : ", ") + d.describe(p.info.process, "");
    }
    error = detail::concat("driver: workers did not register within ",
                           d.opt.start_timeout.count() / 1000.0, " s: ", missing);
    d.fail_locked(code, error);
  }
  lock.unlock();
  if (!error.empty()) {
    d.monitor.join();  // kills the workers
    d.stopped = true;
    std::error_code ec;
    std::filesystem::remove_all(d.scratch, ec);
    throw_error(code, error);
  }
  TESSERA_LOG(Info, "rlhf") << "driver: " << d.procs.size() << " worker processes registered (run "
                            << d.run_id << ")";
}

Driver::~Driver() {
  try {
    shutdown();
  } catch (const std::exception&) {
    // The failure was logged when it happened.
  }
}

void Driver::shutdown() {
  Impl& d = *impl_;
  {
    std::lock_guard<std::mutex> lock(d.mu);
    if (d.stopped) {
      if (!d.failure_message.empty()) d.throw_failure_locked();
      return;
    }
    d.stopped = true;
  }
  bool failed;
  {
    std::lock_guard<std::mutex> lock(d.mu);
    failed = !d.failure_message.empty();
    if (!failed) {
      d.stopping = true;
      d.cv.notify_all();
    }
  }
  if (d.monitor.joinable()) d.monitor.join();  // after a failure it has killed the workers
  if (!failed) {
    for (auto& p : d.procs) {
      if (!p.stub || p.exited) continue;
      grpc::ClientContext ctx;
      rpc::set_deadline(ctx, std::chrono::seconds(5));
      proto::ShutdownRequest req;
      proto::ShutdownReply reply;
      p.stub->Shutdown(&ctx, req, &reply);
    }
    d.reap_all(15.0);
    d.kill_all();
  }
  d.server.shutdown(std::chrono::milliseconds(500));
  std::error_code ec;
  std::filesystem::remove_all(d.scratch, ec);
  std::lock_guard<std::mutex> lock(d.mu);
  if (!d.failure_message.empty()) d.throw_failure_locked();
}

WorkerGroup Driver::group(const std::string& role) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  TESSERA_CHECK(impl_->role_processes.count(role), NotFound, "driver: no role '", role, "'");
  return WorkerGroup(this, role);
}

BatchRef Driver::put(const std::string& name, const Batch& batch) {
  const int64_t rows = batch_rows(batch);
  Batch copy;
  for (const auto& [k, t] : batch) copy[k] = t.detach().to(at::kCPU).contiguous();
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->driver_batches[name] = std::move(copy);
  return BatchRef{name, rows, {{-1, 0, rows, 0}}};
}

Batch Driver::get(const BatchRef& ref) {
  std::vector<Batch> pieces;
  for (const BatchPart& part : ref.parts) {
    if (part.process == -1) {
      std::lock_guard<std::mutex> lock(impl_->mu);
      auto it = impl_->driver_batches.find(ref.name);
      TESSERA_CHECK(it != impl_->driver_batches.end(), NotFound, "batch '", ref.name,
                    "' was released");
      Batch b;
      for (const auto& [k, t] : it->second) b[k] = t.narrow(0, part.offset, part.end - part.begin);
      pieces.push_back(b);
      continue;
    }
    auto& p = impl_->procs.at(part.process);
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(60));
    proto::FetchRequest req;
    req.set_batch(ref.name);
    req.set_offset(part.offset);
    req.set_rows(part.end - part.begin);
    proto::FetchReply reply;
    rpc::check(p.stub->Fetch(&ctx, req, &reply), "Fetch " + ref.name, p.info.address);
    Batch b;
    for (const auto& t : reply.tensors()) b[t.name()] = rpc::from_proto(t);
    pieces.push_back(b);
  }
  Batch out;
  if (pieces.empty()) return out;
  for (const auto& [k, t] : pieces.front()) {
    std::vector<at::Tensor> parts;
    for (const Batch& b : pieces) {
      auto it = b.find(k);
      TESSERA_CHECK(it != b.end(), InvalidArgument, "batch '", ref.name, "': tensor '", k,
                    "' missing from some workers' rows");
      parts.push_back(it->second);
    }
    out[k] = translate_errors(
        "batch '" + ref.name + "', tensor '" + k + "'",
        [&] { return parts.size() == 1 ? parts[0] : at::cat(parts, 0); },
        ErrorCode::kInvalidArgument);
  }
  return out;
}

void Driver::release(const std::string& prefix) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    for (auto it = impl_->driver_batches.begin(); it != impl_->driver_batches.end();) {
      it = it->first.rfind(prefix, 0) == 0 ? impl_->driver_batches.erase(it) : std::next(it);
    }
    if (!impl_->failure_message.empty()) impl_->throw_failure_locked();
  }
  for (auto& p : impl_->procs) {
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(30));
    proto::ReleaseRequest req;
    req.set_prefix(prefix);
    proto::ReleaseReply reply;
    rpc::check(p.stub->Release(&ctx, req, &reply), "Release", p.info.address);
  }
}

std::vector<ProcessInfo> Driver::processes() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<ProcessInfo> infos;
  for (const auto& p : impl_->procs) infos.push_back(p.info);
  return infos;
}

std::string Driver::failure() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->failure_message;
}

int64_t Driver::request_bytes() const { return impl_->request_bytes.load(); }

}  // namespace tessera::rlhf
