#include "tessera/dist/redistribute.h"

#include <ATen/ATen.h>

#include "tessera/core/error.h"
#include "tessera/core/tensor.h"

namespace tessera::dist {
namespace {

// View of `chunk` inside the flattened local tensor, shaped like its box.
at::Tensor chunk_view(const at::Tensor& flat_local, const Chunk& chunk) {
  return flat_local.narrow(0, chunk.local_offset, chunk.box.numel()).view(chunk.box.length);
}

// The part of a chunk's view that `piece` (global coordinates) covers.
at::Tensor piece_view(at::Tensor view, const Chunk& chunk, const Box& piece) {
  for (size_t d = 0; d < piece.offset.size(); ++d) {
    view = view.narrow(static_cast<int64_t>(d), piece.offset[d] - chunk.box.offset[d],
                       piece.length[d]);
  }
  return view;
}

void check_local(const Layout& layout, int rank, const at::Tensor& local, const char* what) {
  auto expected = layout.local_shape(rank);
  TESSERA_CHECK(local.sizes() == at::IntArrayRef(expected), InvalidArgument, what, " on rank ",
                rank, ": local tensor ", shape_string(local.sizes()), " but the layout gives ",
                shape_string(expected), " (", layout.to_string(), ")");
}

// When `from` gives each rank one box, the boxes split the whole tensor
// along one dimension in rank order with equal extents, and `to` gives every
// rank the whole tensor, the redistribution is an all_gather: returns that
// dimension, else -1. (Collective libraries implement all_gather with
// algorithms a general all_to_all cannot use, e.g. NCCL's ring.)
int all_gather_dim(const Layout& from, const Layout& to) {
  const int world = from.world_size();
  const auto& shape = from.global_shape();
  if (world < 2 || from.is_flat() || to.is_flat() || shape.empty()) return -1;
  for (int r = 0; r < world; ++r) {
    const auto& tc = to.chunks(r);
    if (tc.size() != 1 || tc[0].local_offset != 0 || tc[0].box.length != shape) return -1;
    for (int64_t o : tc[0].box.offset) {
      if (o != 0) return -1;
    }
    if (from.chunks(r).size() != 1 || from.chunks(r)[0].local_offset != 0) return -1;
  }
  const Box& first = from.chunks(0)[0].box;
  int dim = -1;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (first.length[d] != shape[d]) {
      if (dim >= 0) return -1;
      dim = static_cast<int>(d);
    }
  }
  if (dim < 0 || first.length[dim] * world != shape[dim]) return -1;
  for (int r = 0; r < world; ++r) {
    const Box& b = from.chunks(r)[0].box;
    if (b.length != first.length) return -1;
    for (size_t d = 0; d < shape.size(); ++d) {
      const int64_t want = static_cast<int>(d) == dim ? r * first.length[dim] : 0;
      if (b.offset[d] != want) return -1;
    }
  }
  return dim;
}

// The all_gather fast path: blocks arrive in rank order along dimension 0
// of a [world * local rows, ...] buffer and are moved to `dim`.
at::Tensor gather_along(ProcessGroup& group, const at::Tensor& local, int dim) {
  const int world = group.size();
  at::Tensor in = local.contiguous();
  std::vector<int64_t> shape(in.sizes().begin(), in.sizes().end());
  std::vector<int64_t> stacked = shape;
  stacked[0] *= world;
  at::Tensor out = at::empty(stacked, in.options());
  group.all_gather(out, in).wait();
  if (dim == 0) return out;
  std::vector<int64_t> blocks{world};
  blocks.insert(blocks.end(), shape.begin(), shape.end());
  std::vector<int64_t> full = shape;
  full[dim] *= world;
  return out.view(blocks).movedim(0, dim).reshape(full);
}

}  // namespace

at::Tensor redistribute(ProcessGroup& group, const at::Tensor& local, const Layout& from,
                        const Layout& to) {
  // The all_gather pattern needs no plan.
  if (all_gather_dim(from, to) >= 0 && from.world_size() == group.size()) {
    check_local(from, group.rank(), local, "redistribute source");
    return gather_along(group, local, all_gather_dim(from, to));
  }
  return redistribute(group, local, from, to, plan_redistribute(from, to));
}

at::Tensor redistribute(ProcessGroup& group, const at::Tensor& local, const Layout& from,
                        const Layout& to, const RedistributePlan& plan) {
  const int me = group.rank();
  const int world = group.size();
  TESSERA_CHECK(from.world_size() == world && to.world_size() == world, InvalidArgument,
                "redistribute on group '", group.name(), "' of ", world, " ranks: layouts are for ",
                from.world_size(), " and ", to.world_size(), " ranks");
  check_local(from, me, local, "redistribute source");
  const int gather_dim = all_gather_dim(from, to);
  if (gather_dim >= 0) return gather_along(group, local, gather_dim);

  at::Tensor src = local.contiguous().view({-1});
  at::Tensor out = at::empty(to.local_shape(me), local.options());
  at::Tensor dst = out.view({-1});
  const auto& src_chunks = from.chunks(me);
  const auto& dst_chunks = to.chunks(me);

  auto send_counts = std::vector<int64_t>(world, 0);
  auto recv_counts = std::vector<int64_t>(world, 0);
  for (const Transfer& t : plan.transfers) {
    if (t.src_rank == me && t.dst_rank != me) send_counts[t.dst_rank] += t.box.numel();
    if (t.dst_rank == me && t.src_rank != me) recv_counts[t.src_rank] += t.box.numel();
  }
  int64_t send_total = 0, recv_total = 0;
  for (int r = 0; r < world; ++r) {
    send_total += send_counts[r];
    recv_total += recv_counts[r];
  }

  // Pack in plan order (sorted by destination), copying kept pieces directly.
  at::Tensor send_buf = at::empty({send_total}, local.options());
  int64_t pos = 0;
  for (const Transfer& t : plan.transfers) {
    if (t.src_rank != me) continue;
    at::Tensor from_view =
        piece_view(chunk_view(src, src_chunks[t.src_chunk]), src_chunks[t.src_chunk], t.box);
    if (t.dst_rank == me) {
      piece_view(chunk_view(dst, dst_chunks[t.dst_chunk]), dst_chunks[t.dst_chunk], t.box)
          .copy_(from_view);
      continue;
    }
    send_buf.narrow(0, pos, t.box.numel()).view(t.box.length).copy_(from_view);
    pos += t.box.numel();
  }

  if (world > 1) {
    // Every rank must join the collective, even one with nothing to move.
    at::Tensor recv_buf = at::empty({recv_total}, local.options());
    group.all_to_all(recv_buf, send_buf, recv_counts, send_counts).wait();
    // Arrivals are ordered by source rank, then as the source packed them.
    pos = 0;
    for (const Transfer& t : plan.transfers) {
      if (t.dst_rank != me || t.src_rank == me) continue;
      piece_view(chunk_view(dst, dst_chunks[t.dst_chunk]), dst_chunks[t.dst_chunk], t.box)
          .copy_(recv_buf.narrow(0, pos, t.box.numel()).view(t.box.length));
      pos += t.box.numel();
    }
  }
  return out;
}

std::vector<at::Tensor> redistribute_offline(const std::vector<at::Tensor>& locals,
                                             const Layout& from, const Layout& to,
                                             const RedistributePlan& plan) {
  const int world = from.world_size();
  TESSERA_CHECK(static_cast<int>(locals.size()) == world && to.world_size() == world,
                InvalidArgument, "redistribute_offline: ", locals.size(),
                " local tensors for layouts of ", from.world_size(), " and ", to.world_size(),
                " ranks");
  std::vector<at::Tensor> src(world), out(world), dst(world);
  for (int r = 0; r < world; ++r) {
    check_local(from, r, locals[r], "redistribute_offline source");
    src[r] = locals[r].contiguous().view({-1});
    out[r] = at::empty(to.local_shape(r), locals[r].options());
    dst[r] = out[r].view({-1});
  }
  for (const Transfer& t : plan.transfers) {
    const Chunk& sc = from.chunks(t.src_rank)[t.src_chunk];
    const Chunk& dc = to.chunks(t.dst_rank)[t.dst_chunk];
    piece_view(chunk_view(dst[t.dst_rank], dc), dc, t.box)
        .copy_(piece_view(chunk_view(src[t.src_rank], sc), sc, t.box));
  }
  return out;
}

at::Tensor extract_local(const Layout& layout, int rank, const at::Tensor& full) {
  TESSERA_CHECK(full.sizes() == at::IntArrayRef(layout.global_shape()), InvalidArgument,
                "extract_local: tensor ", shape_string(full.sizes()), " but the layout is for ",
                shape_string(layout.global_shape()));
  at::Tensor out = at::empty(layout.local_shape(rank), full.options());
  at::Tensor flat = out.view({-1});
  for (const Chunk& c : layout.chunks(rank)) {
    at::Tensor piece = full;
    for (size_t d = 0; d < c.box.offset.size(); ++d) {
      piece = piece.narrow(static_cast<int64_t>(d), c.box.offset[d], c.box.length[d]);
    }
    chunk_view(flat, c).copy_(piece);
  }
  return out;
}

void insert_local(const Layout& layout, int rank, const at::Tensor& local, at::Tensor& full) {
  check_local(layout, rank, local, "insert_local");
  TESSERA_CHECK(full.sizes() == at::IntArrayRef(layout.global_shape()), InvalidArgument,
                "insert_local: tensor ", shape_string(full.sizes()), " but the layout is for ",
                shape_string(layout.global_shape()));
  at::Tensor flat = local.contiguous().view({-1});
  for (const Chunk& c : layout.chunks(rank)) {
    at::Tensor piece = full;
    for (size_t d = 0; d < c.box.offset.size(); ++d) {
      piece = piece.narrow(static_cast<int64_t>(d), c.box.offset[d], c.box.length[d]);
    }
    piece.copy_(chunk_view(flat, c));
  }
}

}  // namespace tessera::dist
