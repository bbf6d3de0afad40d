// tessera/rlhf/driver.h — the single controller of HybridFlow: starts the
// worker processes of each resource pool, waits for them to register, and
// calls role methods over gRPC with the methods' transfer protocols.
//
//   tessera::rlhf::DriverOptions o;
//   o.pools = {{"all", 4}};
//   o.roles = {{"actor", "actor", "all", actor_json},
//              {"reference", "reference", "all", ref_json},
//              {"reward", "reward_rule", "all", "{}"}};
//   tessera::rlhf::Driver driver(o);               // workers running and registered
//   auto prompts = driver.put("it0/prompts", batch);
//   auto gen = driver.group("actor").call("generate", {prompts}, Args().set("iteration", 0));
//   auto scores = driver.group("reward").call("score", {gen.get().output});   // handles:
//   concurrent double mean = scores.wait(std::chrono::minutes(5)).metric("mean_score");
//   driver.release("it0/");
//
// Messages stay small: a call carries references (which rows of which batch,
// held by which process); workers read the rows from each other through the
// data plane (their own memory when colocated, shared memory files across
// processes). Only batches the driver put() travel inline.
//
// Failures never hang: every call has a deadline; a monitor thread reaps
// exited workers and checks health over gRPC. The first failure (a worker
// died, stopped answering, a call failed or timed out) is recorded with the
// role and rank it concerns, every pending and later call fails with it
// (tessera::Error), and all workers are stopped (SIGTERM, then SIGKILL).
// Workers also die with the driver (PR_SET_PDEATHSIG, which Linux ties to
// the thread that started them: construct the Driver on a thread that
// outlives it, such as main's). Thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tessera/rlhf/protocol.h"
#include "tessera/rlhf/worker.h"

namespace tessera::rlhf {

struct PoolSpec {
  std::string name;
  int processes = 1;
};

struct RoleSpec {
  std::string name;  // how the driver addresses it ("actor")
  std::string type;  // the RoleRegistry type to create ("actor", "reward_rule", ...)
  std::string pool;  // the pool whose processes host it
  std::string config_json = "{}";
};

struct DriverOptions {
  std::vector<PoolSpec> pools;
  std::vector<RoleSpec> roles;
  // Worker program and its arguments (argv[1...]); default: this program.
  std::string program;
  std::vector<std::string> program_args;
  std::chrono::milliseconds start_timeout{180000};  // spawn -> every worker registered
  std::chrono::milliseconds call_timeout{900000};   // default deadline of a call
  std::chrono::milliseconds health_interval{500};
  std::chrono::milliseconds health_timeout{
      10000};                       // unanswered health checks this long: worker declared dead
  int max_message_bytes = 4 << 20;  // control-plane message limit
  // Extra environment for the workers ("KEY=VALUE").
  std::vector<std::string> worker_env;
  // Give each pool its own CPUs (a share proportional to its processes,
  // each process pinned to one of them), as pools own their accelerators
  // on a cluster. Off: the kernel schedules every process on every CPU.
  bool pin_cpus = false;
};

// Rows [begin, end) of a batch, held by a process (-1: by the driver) as its
// rows [offset, offset + end - begin).
struct BatchPart {
  int process = -1;
  int64_t begin = 0, end = 0;
  int64_t offset = 0;
};

struct BatchRef {
  std::string name;
  int64_t rows = 0;
  std::vector<BatchPart> parts;  // in row order, covering [0, rows)
  bool empty() const { return name.empty(); }
};

// What a call collects, by protocol: DP_COMPUTE — the rows of the tp-rank-0
// workers in dp order (padding rows dropped: a method returns k rows per
// input row, in order) and their metrics; ALL_TO_ALL — every worker's rows
// and metrics in worker order; RANK_ZERO — worker 0's; ONE_TO_ALL — every
// worker's metrics and worker 0's rows.
struct CallResult {
  BatchRef output;  // empty when the method returns no rows
  // Metrics of the workers the protocol collects from, in worker order.
  std::vector<std::map<std::string, double>> metrics;
  double seconds = 0;  // slowest worker's time inside the method
  // Mean of a metric over the collected workers (NotFound when absent).
  double metric(const std::string& key) const;
};

struct ProcessInfo {
  int process = 0;  // global index
  std::string pool;
  int rank = 0;  // rank inside the pool
  long pid = 0;
  std::string address;  // its Worker service
  std::vector<std::string> roles;
};

struct CallOptions {
  std::chrono::milliseconds timeout{0};  // 0: DriverOptions::call_timeout
  std::string output;                    // output batch name; "": "<role>.<method>#<n>"
};

class Driver;

// A call in flight, as dist's Work handles: wait for it with a bound.
// Copies share the call. Thread-safe.
class PendingCall {
 public:
  // An empty handle (wait() and get() throw FailedPrecondition).
  PendingCall() = default;
  // Blocks until the call completes or `timeout` passes. Returns the result
  // or throws the call's error (tessera::Error: the driver's first failure,
  // or the call's own, e.g. INVALID_ARGUMENT). DeadlineExceeded naming the
  // call when `timeout` passes first; the call itself runs on until its own
  // deadline (CallOptions::timeout), so waiting again is allowed.
  CallResult wait(std::chrono::milliseconds timeout) const;
  // Waits without a bound of its own (the call's deadline still holds).
  CallResult get() const;
  // True once the call has completed (wait() then returns at once).
  bool ready() const;
  // "<role>.<method>".
  const std::string& what() const { return what_; }

 private:
  friend class Driver;
  PendingCall(std::shared_future<CallResult> result, std::string what)
      : result_(std::move(result)), what_(std::move(what)) {}
  std::shared_future<CallResult> result_;
  std::string what_;
};

// A role's worker group: the processes of its pool.
class WorkerGroup {
 public:
  // Calls `method` on every worker of the group with the registered
  // protocol applied to `inputs` (all with the same rows for DP_COMPUTE).
  // Never blocks on the workers; the handle's wait() throws the driver's
  // first failure (or the call's own error, e.g. INVALID_ARGUMENT).
  PendingCall call(const std::string& method, const std::vector<BatchRef>& inputs = {},
                   const Args& args = {}, const CallOptions& options = {});
  const std::string& role() const { return role_; }
  int size() const;

 private:
  friend class Driver;
  WorkerGroup(Driver* driver, std::string role) : driver_(driver), role_(std::move(role)) {}
  Driver* driver_;
  std::string role_;
};

class Driver {
 public:
  // Spawns and waits for every worker (DeadlineExceeded naming the
  // missing ones after start_timeout; the error of a worker that
  // failed during setup, by role and rank).
  explicit Driver(DriverOptions options);
  // Shuts the workers down (or kills them after a failure).
  ~Driver();
  Driver(const Driver&) = delete;
  Driver& operator=(const Driver&) = delete;

  WorkerGroup group(const std::string& role);  // NotFound for an unknown role

  // A batch held by the driver; its rows travel inline in the calls that
  // read them (keep it small: prompts, answers).
  BatchRef put(const std::string& name, const Batch& batch);
  // Reads a batch's rows back to the driver (through the workers' Fetch).
  Batch get(const BatchRef& ref);
  // Drops batches whose names start with `prefix` everywhere.
  void release(const std::string& prefix);
  // Stops the workers; idempotent. Throws the recorded failure, if any.
  void shutdown();

  std::vector<ProcessInfo> processes() const;
  // The first failure ("" while healthy).
  std::string failure() const;
  // Control-plane bytes sent in call requests so far (for the overhead benchmark).
  int64_t request_bytes() const;

  struct Impl;

 private:
  friend class WorkerGroup;
  static PendingCall pending(std::future<CallResult> result, std::string what);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera::rlhf
