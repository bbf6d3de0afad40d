// tessera/sim/types.h — vocabulary shared by the training simulator's parts.
//
// The simulator (module `sim`) predicts the step time of a distributed
// training job from per-rank traces, a cluster description, a model of
// collective communication and a model of compute slowdown under overlapping
// communication. This header holds the small enums and the time unit the
// other sim headers share.
//
//   using tessera::sim::CollectiveKind;
//   CollectiveKind op = tessera::sim::parse_collective_kind("all_reduce");
//   std::cout << tessera::sim::collective_kind_name(op);   // "all_reduce"
//
// Plain values and pure functions: thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

namespace tessera::sim {

// All simulated times are microseconds held as double: collective times and
// kernel durations are fractional microseconds, and sums of hand-picked
// durations stay exact in binary floating point when they are integers.
using Microseconds = std::chrono::duration<double, std::micro>;

// The communication operations the simulator knows. Byte counts follow the
// nccl-tests convention (see collective_model.h): all_gather counts its
// output buffer, reduce_scatter its input buffer, all_to_all the whole send
// buffer of one rank, send_recv the message.
enum class CollectiveKind {
  kAllReduce,
  kAllGather,
  kReduceScatter,
  kAllToAll,
  kBroadcast,
  kSendRecv,
};

// "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast",
// "send_recv".
const char* collective_kind_name(CollectiveKind kind);
// Inverse of collective_kind_name; InvalidArgument listing the accepted names.
CollectiveKind parse_collective_kind(std::string_view name);
// True for the operations that reduce (sum) data: all_reduce, reduce_scatter.
bool collective_reduces(CollectiveKind kind);

// How a collective is executed. kLocal is the one-rank case (a device-local
// copy); kDirect is point-to-point traffic (send/recv, all_to_all).
enum class Algorithm { kRing, kTree, kDirect, kLocal };

// "ring", "tree", "direct", "local".
const char* algorithm_name(Algorithm algorithm);
// Inverse of algorithm_name; InvalidArgument listing the accepted names.
Algorithm parse_algorithm(std::string_view name);

}  // namespace tessera::sim
