// tessera/dist/redistribute.h — moving a distributed tensor between layouts.
//
// redistribute() executes plan_redistribute(from, to) with one all_to_all:
// each rank packs the boxes it must send, in plan order, into one buffer,
// exchanges them, and unpacks what it receives into its new local tensor.
// Pieces a rank keeps are copied locally and never sent. Memory beyond the
// input and output is the send and receive buffers: at most the bytes that
// actually move, never a full copy of the global tensor.
//
//   Layout rows = Layout::sharded({4096, 4096}, mesh, {Placement::Shard(0)});
//   Layout cols = Layout::sharded({4096, 4096}, mesh, {Placement::Shard(1)});
//   at::Tensor mine = redistribute(*world, local_rows, rows, cols);
//
// Collective over `group`, whose size must equal both layouts' world size.
//
// Thread safety: collectives on one group must be issued in the same order
// by every rank; concurrent calls on different groups are safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "tessera/dist/layout.h"
#include "tessera/dist/process_group.h"

namespace tessera::dist {

// `local` is this rank's tensor in `from` (shape from.local_shape(rank), any
// dtype); returns its tensor in `to`. InvalidArgument on a shape or size
// mismatch, naming the rank.
at::Tensor redistribute(ProcessGroup& group, const at::Tensor& local, const Layout& from,
                        const Layout& to);

// Same, with a plan computed earlier (plans can be cached across steps).
at::Tensor redistribute(ProcessGroup& group, const at::Tensor& local, const Layout& from,
                        const Layout& to, const RedistributePlan& plan);

// The whole plan run inside one process: `locals[r]` is rank r's tensor in
// `from`; returns every rank's tensor in `to`. For offline resharding
// (checkpoint tools) and for testing plans without processes.
std::vector<at::Tensor> redistribute_offline(const std::vector<at::Tensor>& locals,
                                             const Layout& from, const Layout& to,
                                             const RedistributePlan& plan);

// The local tensor `rank` holds in `layout`, cut from the full tensor.
at::Tensor extract_local(const Layout& layout, int rank, const at::Tensor& full);

// Writes `local` (rank's tensor in `layout`) into its place in `full`.
void insert_local(const Layout& layout, int rank, const at::Tensor& local, at::Tensor& full);

}  // namespace tessera::dist
