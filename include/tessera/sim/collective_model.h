// tessera/sim/collective_model.h — analytical cost of NCCL-style collectives,
// fitted to measurements.
//
// The execution time of a collective over a group of n ranks spread over k
// nodes (at most m ranks in one node) for a message of S bytes is
//
//   T = α + s_i·λ_i + s_x·λ_x + F·S / B + R·S / δ
//
// with the parameters of one regime (cluster.h: setup_us α, intra_hop_us λ_i,
// inter_hop_us λ_x, intra_gbps B_i, inter_gbps B_x, reduce_gbps δ; a zero δ
// drops the last term) and B = B_i when k = 1, min(B_i, B_x) when k > 1.
// Waiting for the last rank to arrive (synchronisation) is not part of T: the
// timeline composer starts a collective when its last member issues it.
// Step counts s and byte factors F, R (NCCL's ring, double-binary-tree and
// point-to-point schedules; bus-bandwidth convention of nccl-tests):
//
//   ring all_reduce       s = 2(n-1), s_x = min(2k, 2(n-1)) if k > 1 else 0,
//                         F = 2(n-1)/n, R = (n-1)/n
//   ring all_gather       s = n-1, s_x = min(k, n-1) if k > 1, F = (n-1)/n, R = 0
//   ring reduce_scatter   as all_gather with R = (n-1)/n
//   ring broadcast        s = n-1 (pipelined chain), s_x as all_gather, F = 1, R = 0
//   tree all_reduce       s_i = 2(m-1) (chain inside each node), s_x = 2·ceil(log2 k)
//                         (double binary tree across nodes), F = 2(n-1)/n, R = (n-1)/n
//   direct send_recv      one step (intra or inter), F = 1 at B_i or B_x
//   direct all_to_all     s_i = m-1, s_x = n-m; the bandwidth term is
//                         max((m-1)/n·S / B_i, (n-m)/n·S / (B_x·min(1, nics/m)))
//   local (n = 1)         T = α + S / B_i (an out-of-place device copy)
//
// s_i = s - s_x. In the ring, the k node boundaries each cut one ring edge; a
// chunk going once round the ring crosses about k of them (NCCL's tuning model
// charges 2k network steps for all_reduce, which we follow).
//
// Which regime applies is decided by size (its max_bytes); which algorithm
// applies is, by default, the fastest one the cluster has parameters for
// (all_reduce: ring or tree, as NCCL picks by size), or a fixed one.
//
// Fitting. fit_algorithm() fits the regimes of one algorithm to measurements
// by weighted linear least squares on relative error (each row scaled by
// 1/T, so 8 B and 1 GiB weigh alike), with every coefficient kept >= 0
// (exhaustive active sets, at most 6 unknowns). Message-size breakpoints
// between regimes (NCCL's LL / LL128 / Simple protocols: a latency regime for
// small messages, a bandwidth regime for large ones) are searched over all
// splits of the sorted sizes; a further regime is kept only when it lowers
// the root-mean-square relative error by at least FitOptions::min_improvement.
// Terms the data cannot identify are not fitted: in a regime without
// multi-node measurements λ_x and B_x come from the nominal topology (λ_x =
// λ_i + inter_node.latency_us, B_x = inter_node.bandwidth_gbps ×
// nics_per_node, or one NIC's bandwidth for direct);
// without both reducing and non-reducing collectives δ stays 0 (folded into
// the bandwidths).
//
//   ClusterSpec cluster = ClusterSpec::load_file("data/sim/a100_ib.json");
//   CollectiveModel model(cluster);
//   CollectiveEstimate e = model.estimate(CollectiveKind::kAllReduce,
//                                         GroupShape::packed(16, 8), 64 << 20);
//   std::cout << e.time.count() << " us via " << algorithm_name(e.algorithm);
//
// CollectiveModel is immutable after construction: thread-safe. The free
// functions are pure.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tessera/sim/cluster.h"
#include "tessera/sim/types.h"

namespace tessera::sim {

// How a group sits on the cluster.
struct GroupShape {
  int ranks = 1;               // n >= 1
  int nodes = 1;               // k, 1 <= k <= n
  int max_ranks_per_node = 1;  // m, ceil(n/k) <= m <= n

  // The shape of `members` (global ranks) when nodes hold devices_per_node
  // consecutive ranks. InvalidArgument for an empty group.
  static GroupShape of(const std::vector<int>& members, int devices_per_node);
  // Ranks 0..n-1 (how nccl-tests and most benchmarks place them).
  static GroupShape packed(int ranks, int devices_per_node);
};

// The coefficients of one evaluation of the formula above.
struct CostTerms {
  double intra_steps = 0;         // s_i
  double inter_steps = 0;         // s_x
  double bytes_factor = 0;        // F (for direct all_to_all: the intra-node part)
  double inter_bytes_factor = 0;  // direct all_to_all only: (n-m)/n
  double reduce_factor = 0;       // R
  bool direct = false;            // point-to-point: max of the intra and inter byte terms
};

// The step counts and byte factors of `op` run with `algorithm` on `shape`
// (table above). InvalidArgument when the algorithm cannot run the op (tree
// for anything but all_reduce, ring for send_recv / all_to_all, local for
// n > 1, send_recv for n != 2).
CostTerms cost_terms(CollectiveKind op, Algorithm algorithm, const GroupShape& shape);

// The regime of `regimes` that applies to `bytes`.
const RegimeParams& select_regime(const AlgorithmParams& regimes, int64_t bytes);

// The formula above for one regime. `nics_per_node` only matters for
// direct all_to_all.
Microseconds regime_time(const RegimeParams& regime, const CostTerms& terms,
                         const GroupShape& shape, int64_t bytes, int nics_per_node);

// The algorithms NCCL can use for `op` on `shape`: all_reduce {ring, tree},
// all_gather / reduce_scatter / broadcast {ring}, all_to_all / send_recv
// {direct}; {local} when shape.ranks == 1.
std::vector<Algorithm> candidate_algorithms(CollectiveKind op, const GroupShape& shape);

struct CollectiveEstimate {
  Microseconds time{0};
  Algorithm algorithm = Algorithm::kRing;
  std::string protocol;  // the regime's label
};

struct CollectiveModelOptions {
  // Use this algorithm instead of the fastest one. Ignored for one-rank
  // groups (always local).
  std::optional<Algorithm> algorithm;
};

class CollectiveModel {
 public:
  // Validates the cluster (InvalidArgument).
  explicit CollectiveModel(ClusterSpec cluster, CollectiveModelOptions options = {});

  const ClusterSpec& cluster() const { return cluster_; }

  // The execution time of `op` over a group of `shape` for `bytes` bytes
  // (nccl-tests convention). Picks the algorithm as described above.
  // InvalidArgument for bytes < 0, a bad shape, or a fixed algorithm that
  // cannot run the op; NotFound when the cluster has parameters for none of
  // the candidate algorithms (a one-rank group without "local" parameters
  // costs nothing instead).
  CollectiveEstimate estimate(CollectiveKind op, const GroupShape& shape, int64_t bytes) const;
  // Same with a given algorithm (NotFound when the cluster lacks it).
  CollectiveEstimate estimate_with(CollectiveKind op, Algorithm algorithm, const GroupShape& shape,
                                   int64_t bytes) const;
  // The shape of a group of global ranks on this cluster.
  GroupShape shape_of(const std::vector<int>& members) const {
    return GroupShape::of(members, cluster_.topology.devices_per_node);
  }

 private:
  ClusterSpec cluster_;
  CollectiveModelOptions options_;
};

// ---------------------------------------------------------------------------
// Measurements and their sources.

struct Measurement {
  CollectiveKind op = CollectiveKind::kAllReduce;
  GroupShape shape;
  int64_t bytes = 0;
  Microseconds time{0};  // mean time of one call, > 0
  std::string origin;    // "nccl_8.log:23" — where the number came from
};

struct NcclTestsOptions {
  // The table does not name its collective; all_reduce_perf logs are
  // all_reduce.
  CollectiveKind op = CollectiveKind::kAllReduce;
  // Read the in-place time column instead of the out-of-place one.
  bool in_place = false;
};

// Parses the output of an nccl-tests binary (all_reduce_perf & co., with or
// without mpirun's "[1,0]<stdout>:" prefixes). The group shape comes from the
// "#  Rank  r Pid p on HOST device d" lines (ranks, distinct hosts, most
// ranks on one host); the columns from the "# size count type redop [root]
// time algbw busbw ..." header. One Measurement per table row. DataLoss
// naming `source` and the line for a malformed row, a missing header or
// missing Rank lines.
std::vector<Measurement> parse_nccl_tests(std::string_view text, const std::string& source,
                                          const NcclTestsOptions& options = {});
// Reads a file (NotFound when it cannot be opened) and parses it.
std::vector<Measurement> load_nccl_tests(const std::string& path,
                                         const NcclTestsOptions& options = {});

// Tessera's own collective benchmark results, as JSON:
//
//   {"schema": "tessera.sim.collective_bench/1",
//    "devices_per_node": 8,
//    "results": [
//      {"op": "all_reduce", "ranks": 16, "bytes": 1048576, "seconds": 1.0e-4},
//      {"op": "all_gather", "ranks": 8, "nodes": 2, "bytes": 4096, "seconds": 3.2e-5}]}
//
// "nodes" is optional: by default the ranks fill nodes of devices_per_node in
// order; with "nodes" they are spread evenly (m = ceil(ranks / nodes)).
// "seconds" is the mean time of one call. InvalidArgument naming the source,
// result index and field for anything malformed (unknown keys included).
std::vector<Measurement> parse_collective_bench(std::string_view text,
                                                const std::string& source = "<bench>");
std::vector<Measurement> load_collective_bench(const std::string& path);
// The inverse of parse_collective_bench (nodes always written).
std::string collective_bench_to_json(const std::vector<Measurement>& measurements,
                                     int devices_per_node);

// ---------------------------------------------------------------------------
// Fitting.

struct FitOptions {
  // The algorithm whose formula the measurements followed. Measurements it
  // cannot run (e.g. one-rank groups for ring) are left out; kLocal uses
  // exactly the one-rank measurements.
  Algorithm algorithm = Algorithm::kRing;
  // At most this many size regimes (1 to 4).
  int max_regimes = 3;
  // A further regime must lower the RMS relative error by this fraction.
  double min_improvement = 0.15;
  // Fewest measurements in a regime.
  int min_points_per_regime = 4;
  // Nominal values for the terms the data cannot identify (see above).
  Topology topology;
  // Fitted values are rounded to this many significant digits, so that a
  // file regenerated elsewhere compares equal to the shipped one.
  int significant_digits = 5;
  // When > 0, ring fits of all_reduce also yield tree regimes: the ring's
  // with both bandwidths times this factor and the same latencies (NCCL's
  // own tuning model charges its tree 0.92 of the ring's bus bandwidth); the
  // tree differs by its step counts. Each all_reduce measurement is then
  // explained by whichever algorithm the model finds faster, refitted until
  // that choice settles (at most 20 rounds). 0 = ring only. Off by default:
  // on the A100 logs (one multi-node size) the derived tree lowered the
  // in-sample error but doubled the held-out 32-GPU error.
  double tree_bandwidth_factor = 0;
};

struct FitReport {
  AlgorithmParams regimes;
  AlgorithmParams tree_regimes;       // ring fits with a tree (see FitOptions); else empty
  size_t points = 0;                  // measurements used
  bool inter_node_from_data = false;  // else nominal (see above)
  bool reduction_from_data = false;   // else δ = 0
  double rms_rel_error = 0;           // on the measurements used
  double mean_abs_rel_error = 0;
  double max_abs_rel_error = 0;
};

// Fits the regimes of options.algorithm to `measurements` as described at
// the top. InvalidArgument when fewer than min_points_per_regime
// measurements remain, or options are out of range.
FitReport fit_algorithm(const std::vector<Measurement>& measurements, const FitOptions& options);

// Ring regimes with both bandwidths multiplied by `bandwidth_factor` (in
// (0, 1]; InvalidArgument otherwise): the tree regimes a ring fit implies.
AlgorithmParams derive_tree_regimes(const AlgorithmParams& ring, double bandwidth_factor);

// Parameters shared with fit_cluster below.
struct ClusterFitOptions {
  std::string name = "fitted";
  std::string description;
  std::string provenance;
  Topology topology;  // also the nominal values for FitOptions
  FitOptions fit;     // algorithm/topology fields are set per fit
};

// Builds a cluster file from measurements:
//   * all_reduce measurements with n >= 2 -> shared "ring" regimes, and
//     "tree" regimes derived from them (FitOptions::tree_bandwidth_factor);
//   * one-rank measurements (any op) -> shared "local" regimes;
//   * "direct" (send/recv, all_to_all) derived from the ring's largest
//     regime: same α and λ, B_i = ring B_i, B_x = ring B_x / nics_per_node
//     (one NIC per GPU) — a derivation, not a measurement;
//   * measurements of other collectives -> per-collective overrides of their
//     algorithm (ring, or direct for all_to_all / send_recv).
// InvalidArgument when there are no all_reduce measurements with n >= 2.
ClusterSpec fit_cluster(const std::vector<Measurement>& measurements,
                        const ClusterFitOptions& options);

// A recipe for regenerating a shipped cluster file from its logs:
//
//   {"schema": "tessera.sim.cluster_fit/1", "name": ..., "description": ...,
//    "topology": {...as in a cluster file...},
//    "fit": {"max_regimes": 3, "min_improvement": 0.15,      // optional, FitOptions
//            "min_points_per_regime": 4, "significant_digits": 5,
//            "tree_bandwidth_factor": 0},
//    "nccl_tests": [
//      {"file": "nccl_tests_a100/nccl_8.log", "op": "all_reduce", "in_place": false},
//      {"file": "nccl_tests_a100/nccl_32.log", "held_out": true}],  // validation only
//    "collective_bench": ["bench.json", ...],      // optional
//    "host_sharing": "np4_host.json"}              // optional
//
// Paths are relative to the recipe's directory; "op" defaults to all_reduce.
// "host_sharing" names a `tessera-sim calibrate host` measurement whose
// figures replace the topology's host_* fields (apply_host_sharing).
struct ClusterRecipe {
  ClusterFitOptions options;
  std::vector<Measurement> fit_measurements;
  std::vector<Measurement> held_out_measurements;
};
// Reads a recipe and every file it names. InvalidArgument / NotFound /
// DataLoss as the parsers above.
ClusterRecipe load_cluster_recipe(const std::string& path);
// fit_cluster on the recipe's fit measurements.
ClusterSpec fit_cluster_from_recipe(const std::string& path);

// ---------------------------------------------------------------------------
// Prediction reports.

struct PredictionRow {
  Measurement measured;
  CollectiveEstimate predicted;
  double rel_error = 0;  // (predicted - measured) / measured
};

struct PredictionReport {
  std::vector<PredictionRow> rows;
  double mean_abs_rel_error = 0;
  double median_abs_rel_error = 0;
  double max_abs_rel_error = 0;

  // A table, one line per measurement: op, ranks, nodes, size, measured us,
  // predicted us, error %, algorithm/regime; then the summary.
  std::string to_text() const;
};

// Predicts every measurement with `model` and compares.
PredictionReport evaluate_predictions(const CollectiveModel& model,
                                      const std::vector<Measurement>& measurements);

}  // namespace tessera::sim
