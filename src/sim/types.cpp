#include "tessera/sim/types.h"

#include "tessera/core/error.h"

namespace tessera::sim {

namespace {
constexpr CollectiveKind kAllKinds[] = {CollectiveKind::kAllReduce,     CollectiveKind::kAllGather,
                                        CollectiveKind::kReduceScatter, CollectiveKind::kAllToAll,
                                        CollectiveKind::kBroadcast,     CollectiveKind::kSendRecv};
constexpr Algorithm kAllAlgorithms[] = {Algorithm::kRing, Algorithm::kTree, Algorithm::kDirect,
                                        Algorithm::kLocal};
}  // namespace

const char* collective_kind_name(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kAllReduce:
      return "all_reduce";
    case CollectiveKind::kAllGather:
      return "all_gather";
    case CollectiveKind::kReduceScatter:
      return "reduce_scatter";
    case CollectiveKind::kAllToAll:
      return "all_to_all";
    case CollectiveKind::kBroadcast:
      return "broadcast";
    case CollectiveKind::kSendRecv:
      return "send_recv";
  }
  return "?";
}

CollectiveKind parse_collective_kind(std::string_view name) {
  for (CollectiveKind kind : kAllKinds) {
    if (name == collective_kind_name(kind)) return kind;
  }
  TESSERA_THROW(InvalidArgument, "unknown collective '", name,
                "' (expected all_reduce, all_gather, reduce_scatter, all_to_all, broadcast or "
                "send_recv)");
}

bool collective_reduces(CollectiveKind kind) {
  return kind == CollectiveKind::kAllReduce || kind == CollectiveKind::kReduceScatter;
}

const char* algorithm_name(Algorithm algorithm) {
  switch (algorithm) {
    case Algorithm::kRing:
      return "ring";
    case Algorithm::kTree:
      return "tree";
    case Algorithm::kDirect:
      return "direct";
    case Algorithm::kLocal:
      return "local";
  }
  return "?";
}

Algorithm parse_algorithm(std::string_view name) {
  for (Algorithm algorithm : kAllAlgorithms) {
    if (name == algorithm_name(algorithm)) return algorithm;
  }
  TESSERA_THROW(InvalidArgument, "unknown algorithm '", name,
                "' (expected ring, tree, direct or local)");
}

}  // namespace tessera::sim
