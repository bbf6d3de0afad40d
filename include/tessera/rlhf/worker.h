// tessera/rlhf/worker.h — the worker side of HybridFlow's single-controller
// model: roles (actor, critic, reference, reward, ...) whose methods a
// driver calls over the control plane (tessera::rpc).
//
// A worker process hosts one or more roles (colocated roles time-share it).
// Every process of a pool runs the same roles, SPMD: a role's methods are
// collective over its group (all processes of the pool), so tensor and data
// parallel layouts live inside the role. Each method is registered with the
// transfer protocol the driver applies to its inputs and outputs
// (protocol.h) and the mesh that protocol splits over:
//
//   class Doubler : public tessera::rlhf::Role {
//    public:
//     void setup(tessera::rlhf::WorkerContext& ctx, tessera::rlhf::MethodTable& methods) override {
//       methods.add("double", tessera::rlhf::Protocol::kDpCompute, {ctx.size, 1, ctx.rank, 0},
//                   [](const tessera::rlhf::Batch& in, const tessera::ConfigObject& args) {
//                     return tessera::rlhf::MethodResult{{{"y", in.at("x") * 2}}, {}};
//                   });
//     }
//   };
//
//   int main(int argc, char** argv) {
//     tessera::rlhf::RoleRegistry roles = tessera::rlhf::RoleRegistry::builtin();
//     roles.add("doubler", [] { return std::make_unique<Doubler>(); });
//     if (auto code = tessera::rlhf::run_worker_if_spawned(roles)) return *code;
//     ... the driver program (driver.h) ...
//   }
//
// The same binary is driver and worker: the driver starts copies of itself
// with the worker's environment, and run_worker_if_spawned() turns those
// copies into workers before the driver code runs.
//
// Thread safety: a worker runs calls one at a time on one executor thread
// in the driver's sequence order; RoleRegistry is thread-compatible (fill
// it before run_worker_if_spawned).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/config.h"
#include "tessera/dist/process_group.h"
#include "tessera/rlhf/protocol.h"

namespace tessera::rlhf {

// Call arguments: a small JSON object the driver builds and the method
// reads with ConfigObject's getters. Keys the method does not read are
// rejected (INVALID_ARGUMENT naming them).
class Args {
 public:
  Args& set(const std::string& key, int64_t value);
  Args& set(const std::string& key, int value) { return set(key, static_cast<int64_t>(value)); }
  Args& set(const std::string& key, double value);
  Args& set(const std::string& key, bool value);
  Args& set(const std::string& key, const std::string& value);
  Args& set(const std::string& key, const char* value) { return set(key, std::string(value)); }
  std::string json() const;

 private:
  std::vector<std::pair<std::string, std::string>> fields_;  // key, JSON text of the value
};

struct MethodResult {
  Batch output;                           // the rows this worker produced (may be empty)
  std::map<std::string, double> metrics;  // small numbers for the driver
};

using Method = std::function<MethodResult(const Batch& inputs, const ConfigObject& args)>;

// The mesh a method's protocol splits over, and this worker's place in it.
struct MethodMesh {
  int dp_size = 1, tp_size = 1;
  int dp_rank = 0, tp_rank = 0;
};

class MethodTable {
 public:
  // InvalidArgument for a duplicate name or a rank outside the mesh.
  void add(const std::string& name, Protocol protocol, MethodMesh mesh, Method method);

  struct Entry {
    Protocol protocol;
    MethodMesh mesh;
    Method method;
  };
  const std::map<std::string, Entry>& entries() const { return entries_; }

 private:
  std::map<std::string, Entry> entries_;
};

// What a role sees of its process.
struct WorkerContext {
  std::string role;     // the role's name ("actor")
  ConfigObject config;  // its configuration (unknown keys rejected after setup)
  std::shared_ptr<dist::ProcessGroup> group;  // every process of the pool, SPMD
  int rank = 0, size = 1;                     // place in the group
  int process = 0;                            // global process index (driver numbering)
};

class Role {
 public:
  virtual ~Role() = default;
  // Builds the role's state and registers its methods. Collective over
  // ctx.group (every process of the pool runs it).
  virtual void setup(WorkerContext& ctx, MethodTable& methods) = 0;
};

class RoleRegistry {
 public:
  using Factory = std::function<std::unique_ptr<Role>()>;
  // The roles this library provides (roles.h): "actor", "critic",
  // "reference", "reward_rule", "reward_model".
  static RoleRegistry builtin();
  void add(const std::string& type, Factory factory);
  // NotFound naming the type and the known ones.
  std::unique_ptr<Role> create(const std::string& type) const;

 private:
  std::map<std::string, Factory> factories_;
};

// When this process was started by a Driver as one of its workers (the
// driver's variables are set), runs the worker — roles set up, gRPC server
// started, registered with the driver, calls served until the driver shuts
// it down — and returns the exit code; otherwise std::nullopt at once.
// Call after init_runtime() and before anything else in main().
//
// For fault tests, TESSERA_RLHF_FAULT="role.method:N:rank" makes the
// worker of that pool rank kill itself (SIGKILL) when its N-th call of
// role.method begins.
std::optional<int> run_worker_if_spawned(const RoleRegistry& registry);

}  // namespace tessera::rlhf
