// tessera/sim/host_sharing.h — what `tessera-sim calibrate host` measures
// about ranks sharing one host's cores (measure_host_sharing in
// calibration.h), its file format, and how it enters a cluster's topology
// (Topology::host_*). Torch-free: cluster recipes and the validation read
// these files back.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/sim/cluster.h"

namespace tessera::sim {

struct HostSharing {
  // Entry k-1: the mean over the k running ranks of their time, over the
  // time alone (median over repeats); entry 0 is 1.
  std::vector<double> compute_slowdown;
  // Entry k-1: how much later than the mean of the k running ranks the
  // slowest finished, as a share of that mean (median over repeats); entry 0
  // is 0. Topology::host_sync_skew.
  std::vector<double> sync_skew;
  // Entry k-1: the lock-step layout's step run by k ranks in step (see
  // measure_host_sharing), over the same step run by one rank alone.
  // Topology::host_lockstep_slowdown.
  std::vector<double> lockstep_slowdown;
  // Entry k-1: in step over out of step, both with k ranks.
  std::vector<double> lockstep_ratio;
  // Entry k-1 (microseconds; entry 0 is 0): the fixed part of the wait for
  // the group's last member at a synchronisation of k ranks, every rank of
  // the world computing the job in step and synchronising at each of its
  // collectives with an all_reduce of the call's size: how much later than
  // the members' mean the last member issued (fitted as a + b x the
  // members' mean compute since their previous synchronisation, over every
  // synchronisation of every group of k, taken at sync_compute_ms) less
  // sync_skew's part for that segment (sync_skew[k-1] x sync_compute_ms);
  // at least 0. So the simulator's straggler wait, host_sync_us +
  // host_sync_skew x segment, equals the measured lateness at that segment
  // length; the collective calibration's times hold the transfer after the
  // last member's issue (CollectiveSweepOptions::compute_ms). Measured for
  // the world and, in a larger even world, for pairs of neighbouring ranks;
  // a size in between takes the next larger measured one.
  // Topology::host_sync_us.
  std::vector<double> sync_us;
  // Topology::host_comm_load, measured in an even world of 4 or more ranks
  // (empty otherwise): ranks 0 .. c-1 (c = 2 x floor(world / 4)) time a GEMM
  // segment while the others wait in a barrier (idle), compute the same
  // (busy), or run all_reduces of one size back to back in pairs of
  // neighbouring ranks (comm). The comm slowdown's share of the busy one,
  // (comm / idle - 1) / (busy / idle - 1), is placed on compute_slowdown
  // between c and world computing ranks: load = (k - c) / (world - c) for
  // the k at which compute_slowdown covers that share of the way from
  // entry c to entry world. 0 where busy is within 2 % of idle (no shared
  // cores to measure).
  std::vector<CommLoadPoint> comm_load;
  // The medians behind comm_load: comm / idle per size, busy / idle.
  std::vector<double> comm_load_slowdown;
  double busy_slowdown = 0;
  // Per repeat of the slowdown measurements: the share of the host's CPU
  // time other processes used; and how many repeats the medians kept.
  std::vector<double> foreign_cpu;
  int repeats_kept = 0;
};

// HostSharing::comm_load's derivation, given the measured slowdowns:
// `computing` ranks of a world of compute_slowdown.size() ranks computed
// beside the others being busy (busy_slowdown, over idle) or
// communicating (comm_slowdown, over idle). The communication's share of
// the busy slowdown is placed on compute_slowdown between `computing` and
// all ranks computing; the load is how far along that span it lands, as a
// share of the ranks that were not computing, clamped to [0, 4]. 0 where
// busy_slowdown is within 2 % of 1 (the host has cores to spare: nothing
// to measure). InvalidArgument unless 1 <= computing < world size.
double comm_load_from_slowdowns(const std::vector<double>& compute_slowdown, int computing,
                                double busy_slowdown, double comm_slowdown);

// The measurement as `tessera-sim calibrate host` writes it (schema
// tessera.sim.host_sharing/1; `job` names the work's config file).
std::string host_sharing_to_json(const HostSharing& sharing, const std::string& job);

// Reads what host_sharing_to_json wrote; InvalidArgument naming `source`
// and the field for malformed text, a wrong schema, unknown keys, or lists
// that do not have one entry per count of ranks.
HostSharing parse_host_sharing(std::string_view text, const std::string& source);

// Several measurements of the same host and world size combined: every
// figure the median over them, entry by entry (foreign_cpu concatenated,
// repeats_kept summed). InvalidArgument when they are empty or differ in
// world size or comm_load sizes.
HostSharing median_host_sharing(const std::vector<HostSharing>& measurements);

// The time of calls to one collective after its group's last member issued
// it, from every rank's issue and end times on a clock all ranks share (one
// host's steady clock): issue[r * calls + i] and end[r * calls + i] are rank
// r's i-th call, the world's ranks form consecutive groups of group_size
// that each ran the collective once per call index. Entry i is the mean
// over ranks of end - (the latest issue of the rank's group for call i),
// or of end - issue for a rank that finished before that latest issue (a
// broadcast's root): the transfer as the members see it once all have
// arrived, wake-up included, without the wait for a late member. InvalidArgument unless the
// lists have the same size, a multiple of `ranks`, and group_size divides
// ranks.
std::vector<double> after_last_arrival(const std::vector<double>& issue,
                                       const std::vector<double>& end, int ranks, int group_size);

// How late the last member of a group arrives at calls to one collective,
// from every rank's issue times (a clock all ranks share) and the compute
// each did before the call, laid out as for after_last_arrival. One entry
// per group and call: (the members' mean compute, the last member's issue
// less the members' mean issue). HostSharing::sync_us is fitted to these.
// InvalidArgument as after_last_arrival.
std::vector<std::pair<double, double>> arrival_lateness(const std::vector<double>& issue,
                                                        const std::vector<double>& compute,
                                                        int ranks, int group_size);

// Writes the measured figures into a cluster's topology: host_compute_slowdown,
// host_sync_skew, host_lockstep_slowdown, host_sync_us, and host_comm_load
// when measured (the others are kept). Used by cluster recipes that name
// a measurement ("host_sharing", see collective_model.h) and by
// `tessera-sim validate --host-job` to predict each round with the host as
// it was then.
void apply_host_sharing(const HostSharing& sharing, Topology& topology);

}  // namespace tessera::sim
