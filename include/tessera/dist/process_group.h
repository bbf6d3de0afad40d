// tessera/dist/process_group.h — collectives over c10d (Gloo on CPU, NCCL on CUDA).
//
// A ProcessGroup is a set of ranks that run collectives together. The world
// group comes from init_process_group() (rendezvous from the torchrun
// variables, see rendezvous.h); sub-groups from new_subgroup() or from a
// DeviceMesh axis.
//
// Every collective is asynchronous and returns a Work handle; nothing may
// touch the tensors involved until wait() returns. Differences between the
// transports are hidden here: Gloo (as shipped with LibTorch 1.13) has no
// reduce_scatter, no average and no bfloat16; this wrapper provides them
// (reduce_scatter as one all_to_all plus a local reduction, average as sum
// then scale, bf16/fp16 reductions in fp32, data movement as raw bytes), so
// every dtype works with every collective on every backend.
//
//   auto world = tessera::dist::init_process_group();
//   at::Tensor grad = ...;
//   world->all_reduce(grad, tessera::dist::ReduceOp::kAvg).wait();
//
// Failures (a peer that died, a timeout) surface from wait() as
// tessera::Unavailable / DeadlineExceeded naming the operation, the group and
// the rank. A ProcessGroup may be used from one thread at a time per group;
// collectives must be issued in the same order on every member.
//
// Observing and placeholders (the training simulator's tracer, tests): a
// CollectiveObserver in ProcessGroupOptions sees every operation a group and
// its sub-groups issue, and when it completes; create_placeholder() makes a
// group with no peers and no transport, for running one rank of a job this
// process does not have (its operations finish at once with placeholder
// results, as if every member held this rank's data).
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace tessera::dist {

class Store;

enum class ReduceOp { kSum, kAvg, kMax, kMin, kProduct };
enum class Backend { kGloo, kNccl };

const char* backend_name(Backend backend);

// Handle to an asynchronous collective. Copyable; all copies refer to the
// same operation. A default-constructed Work is already complete.
class Work {
 public:
  Work();
  // Blocks until the operation finished and its results are in place.
  // DeadlineExceeded when `timeout` passes first (the operation may still be
  // running: the group is then unusable); Unavailable when it failed.
  // A zero timeout means the group's own timeout.
  void wait(std::chrono::milliseconds timeout = std::chrono::milliseconds(0));
  bool is_completed() const;

  struct Impl;
  explicit Work(std::shared_ptr<Impl> impl);

 private:
  friend class ProcessGroup;  // attaches observer notifications
  std::shared_ptr<Impl> impl_;
};

// One operation as an observer sees it.
struct CollectiveCall {
  // 1, 2, ... in issue order over a root group (create / create_placeholder)
  // and every sub-group made from it; on_complete gets the same value.
  uint64_t id = 0;
  std::string op;          // "all_reduce", "broadcast", "all_gather", "reduce_scatter",
                           // "all_to_all", "send", "recv", "barrier"
  std::string group;       // the group's name
  std::vector<int> ranks;  // the group's members as world ranks, in group-rank order
  int rank = 0;            // the issuing rank's position in the group
  // Size in the nccl-tests convention: all_reduce and broadcast the tensor,
  // all_gather its output, reduce_scatter its input, all_to_all this rank's
  // whole send buffer, send/recv the message; 0 for barrier.
  int64_t bytes = 0;
  at::ScalarType dtype = at::kByte;
  ReduceOp reduce = ReduceOp::kSum;  // all_reduce, reduce_scatter
  int peer = -1;                     // broadcast: root; send: destination; recv: source
                                     // (group ranks)
  int tag = 0;                       // send/recv
  // all_to_all only: bytes this rank sends to / receives from each group
  // rank (the splits times the row size).
  std::vector<int64_t> send_bytes;
  std::vector<int64_t> recv_bytes;
};

// Receives every operation of the groups it is attached to (through
// ProcessGroupOptions::observer; sub-groups inherit it). Both calls come on
// the thread that issued or waited; an observer shared by groups used from
// several threads must synchronise itself. Exceptions thrown by an observer
// propagate out of the collective call or wait().
class CollectiveObserver {
 public:
  virtual ~CollectiveObserver() = default;
  // After the arguments were checked, before the transport starts.
  virtual void on_issue(const CollectiveCall& call) = 0;
  // When the first Work::wait() of the operation returns successfully
  // (results in place). Operations never waited are never reported here.
  virtual void on_complete(const CollectiveCall& call) = 0;
};

struct ProcessGroupOptions {
  // Name shown in messages and used as the store prefix of sub-groups.
  std::string name = "world";
  // How long a collective may wait for its peers.
  std::chrono::milliseconds timeout = std::chrono::seconds(300);
  // kNccl requires a LibTorch built with CUDA (see nccl_available()).
  Backend backend = Backend::kGloo;
  // Gloo transport: the network interface to use (GLOO_SOCKET_IFNAME), or
  // the address to bind. Both empty: 127.0.0.1 when every rank is on this
  // host, the host name's address otherwise.
  std::string gloo_interface;
  std::string gloo_address;
  // Sees every operation of this group and of its sub-groups (may be null).
  std::shared_ptr<CollectiveObserver> observer;
};

// True when this build can create NCCL groups (LibTorch with CUDA and c10d
// NCCL); the NCCL version linked, 0 when none.
bool nccl_available();
int nccl_version();

class ProcessGroup {
 public:
  // Collective over all `size` ranks sharing `store`; blocks until every
  // rank has connected (DeadlineExceeded after options.timeout).
  static std::shared_ptr<ProcessGroup> create(std::shared_ptr<Store> store, int rank, int size,
                                              const ProcessGroupOptions& options = {});
  // A group of `size` ranks of which only `rank` exists: no store, no
  // transport. Every operation checks its arguments as a real group does,
  // completes at once and leaves placeholder results, computed as if every
  // member held this rank's data: all_reduce sums multiply by size (average,
  // max and min leave the tensor, product raises it to the size-th power);
  // broadcast leaves the tensor; all_gather repeats the input; reduce_scatter
  // takes this rank's slice of the input (times size for sums);
  // all_to_all fills the rows from each source with the rows this rank sends
  // to itself, as far as they go, and zeros beyond; recv leaves the tensor.
  // Sub-groups are placeholders too. options.backend is only reported.
  // InvalidArgument for a rank outside [0, size).
  static std::shared_ptr<ProcessGroup> create_placeholder(int rank, int size,
                                                          const ProcessGroupOptions& options = {});
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const;
  int size() const;
  const std::string& name() const;
  Backend backend() const;
  std::chrono::milliseconds timeout() const;
  // This group's members as ranks of the world group, in group-rank order.
  const std::vector<int>& world_ranks() const;
  // True for groups made by create_placeholder() (and their sub-groups).
  bool is_placeholder() const;

  // In place on every rank.
  Work all_reduce(at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  // `tensor` on `root` is copied into `tensor` on every other rank.
  Work broadcast(at::Tensor& tensor, int root);
  // output = cat([input of rank 0, ..., input of rank size-1], dim 0).
  // output: [size * input.size(0), ...input.shape[1:]].
  Work all_gather(at::Tensor& output, const at::Tensor& input);
  // input: [size * output.size(0), ...]; rank r receives the reduction over
  // ranks of input rows [r * n, (r + 1) * n), n = output.size(0).
  Work reduce_scatter(at::Tensor& output, const at::Tensor& input, ReduceOp op = ReduceOp::kSum);
  // Splits are row counts along dim 0, one per rank; empty means equal
  // splits. input rows [sum(in_splits[:j]), +in_splits[j]) go to rank j;
  // output rows from rank j land at [sum(out_splits[:j]), +out_splits[j]).
  // Every rank's out_splits[j] must equal rank j's in_splits[this rank].
  Work all_to_all(at::Tensor& output, const at::Tensor& input,
                  std::vector<int64_t> output_splits = {}, std::vector<int64_t> input_splits = {});
  Work send(const at::Tensor& tensor, int dst, int tag = 0);
  Work recv(at::Tensor& tensor, int src, int tag = 0);
  Work barrier();

  // Collective over this group: every member calls it with the same `ranks`
  // (group ranks, ascending, unique) in the same order. Returns the new
  // group on members, nullptr elsewhere.
  std::shared_ptr<ProcessGroup> new_subgroup(const std::vector<int>& ranks,
                                             const std::string& name = "");

  struct Impl;

 private:
  explicit ProcessGroup(std::unique_ptr<Impl> impl);
  // Reports `call` to the observer now and `work`'s completion later.
  static Work observed(Impl& group, CollectiveCall call, const std::function<Work()>& run);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera::dist
