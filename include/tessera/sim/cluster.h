// tessera/sim/cluster.h — a cluster's topology and its collective-cost
// parameters, as a strict JSON file.
//
// The file (see data/sim/a100_ib.json for a fitted one):
//
//   {
//     "schema": "tessera.sim.cluster/1",
//     "name": "a100-ib",
//     "description": "8x A100-SXM4-40GB per node, NVSwitch, 8x HDR 200 Gb/s IB",
//     "provenance": "how the parameters were obtained (free text, optional)",
//     "topology": {
//       "devices_per_node": 8,
//       "num_nodes": 4,                  // 0 = as many as a job needs
//       "nics_per_node": 8,
//       "intra_node": {"bandwidth_gbps": 300, "latency_us": 1.0},   // nominal, per device
//       "inter_node": {"bandwidth_gbps": 25, "latency_us": 5.0},    // nominal, per NIC
//       "host_compute_slowdown": [1.0, 1.1, 1.6, 2.1],  // optional, see below
//       "host_sync_skew": [0, 0.03, 0.06, 0.1],         // optional, see below
//       "host_lockstep_slowdown": [1.05, 1.12],          // optional, see below
//       "host_sync_us": [0, 900],                        // optional, see below
//       "host_comm_load": [{"bytes": 4096, "load": 0.35}, ...]  // optional, see below
//     },
//     "algorithms": {                    // shared by every collective
//       "ring":   [ {regime}, ... ],
//       "tree":   [ ... ],                // optional
//       "direct": [ ... ],                // send/recv and all_to_all
//       "local":  [ ... ]                 // one-rank "collectives" (a device copy)
//     },
//     "collectives": {                   // optional per-collective overrides
//       "all_gather": {"ring": [ {regime}, ... ]}
//     }
//   }
//
// A regime is one protocol / message-size range of one algorithm:
//
//   {"protocol": "simple", "max_bytes": 0, "setup_us": 55.9, "intra_hop_us": 0.99,
//    "inter_hop_us": 3.1, "intra_gbps": 216.7, "inter_gbps": 126.1, "reduce_gbps": 0}
//
// host_compute_slowdown is for CPU training, where the "devices" of a node
// are processes sharing the host's cores: entry k-1 is how much a rank's
// compute slows while k ranks of its node compute at the same time
// (measured by `tessera-sim calibrate host`; every entry > 0, the first
// normally 1). Beyond the list, the last entry grows in proportion to k.
// Absent or empty (accelerators): ranks never slow each other.
// host_sync_skew goes with it: entry k-1 is how much later than their mean
// the slowest of k ranks finishes the same compute when they run it at once
// on the host (0.05: 5 % of the compute), measured by the same calibration.
// A collective (or p2p pair) of k ranks then starts that share of its
// members' compute since their previous communication later than the last
// member issues it: the wait for a straggler that identical traced ranks do
// not show. Beyond the list, the last entry; absent: 0. host_sync_us adds a
// fixed part to that wait: entry k-1 microseconds for a collective (or p2p
// pair) of k ranks whose members computed since their previous
// communication op (beyond the list, the last entry; absent: 0). Measured
// by `calibrate host` as how much later than their mean the last of k
// ranks computing the job in step arrives, beyond host_sync_skew's part
// (HostSharing::sync_us); the collective times are the transfer after
// the last member's issue (`calibrate collectives --compute-ms`).
// host_lockstep_slowdown replaces host_compute_slowdown for compute that
// starts when a communication op it waited for completes: ranks that leave
// a collective together run the same kernels at the same moment, and on a
// shared host that costs more than ranks computing out of step (measured
// here: 1.03 out of step, 1.09-1.14 in step for 2 ranks on 2 cores).
// Entry k-1 with k ranks of the node computing, measured by `calibrate
// host`; beyond the list it grows in proportion to k like
// host_compute_slowdown; absent: host_compute_slowdown applies to all
// compute.
// host_comm_load is the host's cores that communication takes: a rank of
// the node running a communication op (after its straggler wait) and no
// compute counts as `load` of a computing rank in the k above, so ranks
// computing while others of the node communicate slow down more than with
// those ranks blocked (Gloo's transfers over loopback copy through the
// kernel; see data/sim/gloo_local/np4_host.json for this machine's
// figures).
// Points by strictly increasing message size, the load interpolated in
// log(bytes) between them and held beyond the ends; a fractional k
// interpolates host_compute_slowdown linearly. Measured by `calibrate host`
// on 4 or more ranks; absent: communicating ranks take no cores.
//
// A regime applies to messages of at most max_bytes (0 = no bound; regimes are
// listed by increasing max_bytes and only the last is unbounded). What the
// terms mean, and the formulas that combine them, are in collective_model.h.
// Bandwidths are GB/s (1e9 bytes per second, as nccl-tests reports them),
// latencies microseconds.
//
// Every key is checked: unknown keys, missing required keys, wrong types,
// non-positive bandwidths, negative latencies and badly ordered regimes are
// InvalidArgument naming the file and the key path
// ("a100.json: algorithms.ring[1]: field 'intra_gbps': must be > 0").
//
//   tessera::sim::ClusterSpec cluster = tessera::sim::ClusterSpec::load_file("a100_ib.json");
//   const auto* ring = cluster.params(CollectiveKind::kAllReduce, Algorithm::kRing);
//
// ClusterSpec is a plain value: thread-compatible.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/sim/types.h"

namespace tessera::sim {

// The α-β parameters of one protocol regime (see collective_model.h for the
// formulas). Bandwidths are bus bandwidths in GB/s.
struct RegimeParams {
  std::string protocol;     // a label: "ll", "simple", "regime1", ...
  int64_t max_bytes = 0;    // applies to bytes <= max_bytes; 0 = unbounded (last regime)
  double setup_us = 0;      // α: fixed cost of one call
  double intra_hop_us = 0;  // latency of one step whose traffic stays inside a node
  double inter_hop_us = 0;  // latency of one step that crosses nodes
  double intra_gbps = 0;    // bandwidth when the group sits in one node (> 0)
  double inter_gbps = 0;    // bandwidth across nodes (> 0); ring/tree: per node, all NICs;
                            // direct: per NIC
  double reduce_gbps = 0;   // reduction throughput δ; 0 = folded into the bandwidths

  bool operator==(const RegimeParams& other) const;
};

// The regimes of one algorithm, by increasing max_bytes.
using AlgorithmParams = std::vector<RegimeParams>;

struct CollectiveParams {
  std::map<Algorithm, AlgorithmParams> algorithms;
};

// A nominal link: what the hardware sheet says, not what was measured.
struct LinkSpec {
  double bandwidth_gbps = 0;  // > 0
  double latency_us = 0;      // >= 0
};

// One point of Topology::host_comm_load.
struct CommLoadPoint {
  int64_t bytes = 0;  // > 0
  double load = 0;    // in [0, 4]
  bool operator==(const CommLoadPoint& o) const { return bytes == o.bytes && load == o.load; }
};

struct Topology {
  int devices_per_node = 8;  // >= 1
  int num_nodes = 0;         // 0 = unbounded
  int nics_per_node = 1;     // >= 1
  LinkSpec intra_node{300, 1.0};
  LinkSpec inter_node{25, 5.0};
  // CPU hosts: compute slowdown with k ranks of a node computing, k = 1, 2,
  // ... (see above); empty: none.
  std::vector<double> host_compute_slowdown;
  // CPU hosts: the slowest of k ranks' compute beyond their mean, k = 1, 2,
  // ... (see above); empty: 0.
  std::vector<double> host_sync_skew;
  // CPU hosts: compute slowdown after a communication wait with k ranks of a
  // node computing (see above); empty: host_compute_slowdown.
  std::vector<double> host_lockstep_slowdown;
  // CPU hosts: the straggler wait's fixed part for k ranks, microseconds
  // (see above); empty: 0.
  std::vector<double> host_sync_us;
  // CPU hosts: the share of a computing rank that a rank communicating a
  // message of `bytes` takes (see above); empty: 0.
  std::vector<CommLoadPoint> host_comm_load;

  // The node of a global rank (ranks fill nodes in order).
  int node_of(int rank) const { return rank / devices_per_node; }
  // The compute slowdown with `computing` (>= 1) ranks of a node computing
  // at once: 1 without host_compute_slowdown. A fractional count (ranks
  // communicating, host_comm_load) interpolates between the integer ones.
  // With `lockstep`, for compute that started when a communication op it
  // waited for completed (host_lockstep_slowdown when given).
  double host_slowdown(double computing, bool lockstep = false) const {
    const std::vector<double>& table = lockstep && !host_lockstep_slowdown.empty()
                                           ? host_lockstep_slowdown
                                           : host_compute_slowdown;
    if (table.empty()) return 1.0;
    const double lower = std::floor(computing);
    const double a = slowdown_at(table, static_cast<int>(lower));
    if (computing <= lower) return a;
    return a + (computing - lower) * (slowdown_at(table, static_cast<int>(lower) + 1) - a);
  }
  // The load of a rank communicating a message of `bytes` (see above): 0
  // without host_comm_load.
  double comm_load(int64_t bytes) const;
  // The straggler share for a group of `ranks` (see above): 0 without
  // host_sync_skew.
  double sync_skew(int ranks) const { return by_ranks(host_sync_skew, ranks); }
  // The straggler wait's fixed part for a group of `ranks` (see above): 0
  // without host_sync_us.
  double sync_fixed_us(int ranks) const { return by_ranks(host_sync_us, ranks); }

 private:
  static double slowdown_at(const std::vector<double>& table, int computing) {
    if (computing <= 1) return table.front();
    const int n = static_cast<int>(table.size());
    if (computing <= n) return table[computing - 1];
    return table.back() * computing / n;
  }
  static double by_ranks(const std::vector<double>& table, int ranks) {
    if (table.empty() || ranks < 1) return 0.0;
    return table[std::min(table.size(), static_cast<size_t>(ranks)) - 1];
  }
};

class ClusterSpec {
 public:
  std::string name;
  std::string description;
  std::string provenance;
  Topology topology;
  CollectiveParams defaults;                             // "algorithms"
  std::map<CollectiveKind, CollectiveParams> overrides;  // "collectives"

  // Parses and validates; InvalidArgument as described above.
  static ClusterSpec parse(std::string_view text, std::string source = "<cluster>");
  // NotFound when the file cannot be opened.
  static ClusterSpec load_file(const std::string& path);
  // Deterministic JSON text in the format above; parse(to_json()) == *this.
  std::string to_json() const;
  // Checks the rules above; `source` names the cluster in messages.
  void validate(const std::string& source = "<cluster>") const;

  // The regimes of `algorithm` for `op`: the override when there is one,
  // else the shared entry; nullptr when neither exists.
  const AlgorithmParams* params(CollectiveKind op, Algorithm algorithm) const;

  bool operator==(const ClusterSpec& other) const;
};

// "" when `a` and `b` agree (numbers within relative tolerance `rel_tol`),
// otherwise a description of the first difference, naming the key path
// ("algorithms.ring[2].intra_gbps: 216.7 vs 216.9"). Used to check a shipped
// file against its regeneration.
std::string cluster_difference(const ClusterSpec& a, const ClusterSpec& b, double rel_tol);

}  // namespace tessera::sim
