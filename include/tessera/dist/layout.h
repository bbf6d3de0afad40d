// tessera/dist/layout.h — how a global tensor is spread over ranks, and the
// overlap planner that maps one layout onto another.
//
// A Layout says, for every rank, which pieces of the global tensor it holds.
// Each piece is a Chunk: an n-D box of the global tensor whose elements the
// rank stores contiguously, in row-major order of the box, starting at
// `local_offset` in its local (flattened) tensor. This one representation
// covers
//   * regular shardings: per mesh axis Shard(dim) or Replicate, as
//     Megatron/DTensor tensor-, expert- and data-parallel weights have (one
//     chunk per rank, local tensor shaped like the box);
//   * irregular flat ranges as ZeRO produces: rank r holds elements
//     [begin, end) of the row-major flattening (of the whole tensor, or of a
//     regular shard), stored as a 1-D local tensor. Such a range is
//     decomposed into a few boxes (partial leading row, full rows, partial
//     trailing row, recursively per dimension), with no data movement.
//
// Sharding a dimension of size n over k parts gives the first n % k parts
// one extra element (numpy's array_split); several mesh axes sharding the
// same dimension nest in mesh-axis order (the first axis is the outer one).
//
// plan_redistribute(from, to) lists, for every target chunk, which boxes it
// receives from which source rank. Boxes held by several ranks (replicas)
// are read once, from the target rank itself when it holds them, otherwise
// from the least-loaded holder, so sends are spread evenly. Checkpoint
// loading, the RLHF hybrid engine and tensor-parallel model loading all use
// this one planner.
//
// Layout and plans are plain values: thread-compatible, no communication.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace tessera::dist {

// An n-D box: offset[d] <= index[d] < offset[d] + length[d].
struct Box {
  std::vector<int64_t> offset;
  std::vector<int64_t> length;

  int64_t numel() const;
  bool empty() const { return numel() == 0; }
  bool operator==(const Box& other) const {
    return offset == other.offset && length == other.length;
  }
  bool operator<(const Box& other) const {
    return offset != other.offset ? offset < other.offset : length < other.length;
  }
  std::string to_string() const;  // "[0:4, 2:6]"
};

// The common part of two boxes of the same rank; empty box (numel 0) if none.
Box intersect(const Box& a, const Box& b);

// Decomposes elements [begin, end) of the row-major flattening of a box of
// shape `shape` into boxes that are each contiguous in that order, in order.
// Offsets are relative to the box; at most 2 * ndim - 1 boxes.
std::vector<Box> decompose_flat_range(const std::vector<int64_t>& shape, int64_t begin,
                                      int64_t end);

struct Chunk {
  Box box;               // in global coordinates
  int64_t local_offset;  // element offset in the rank's flattened local tensor
};

// Names and sizes of the axes of a device mesh; ranks are laid out
// row-major (the last axis varies fastest), as torch's DeviceMesh does.
struct MeshShape {
  std::vector<int64_t> sizes;
  std::vector<std::string> names;

  int64_t world_size() const;
  int axis(const std::string& name) const;  // NotFound naming the axis
  std::vector<int64_t> coords_of(int rank) const;
  int rank_of(const std::vector<int64_t>& coords) const;
};

struct Placement {
  enum class Kind { kReplicate, kShard };
  Kind kind = Kind::kReplicate;
  int dim = -1;  // tensor dimension, for kShard

  static Placement Replicate() { return {Kind::kReplicate, -1}; }
  static Placement Shard(int dim) { return {Kind::kShard, dim}; }
  bool operator==(const Placement& o) const { return kind == o.kind && dim == o.dim; }
};

class Layout {
 public:
  Layout() = default;

  // One Placement per mesh axis.
  static Layout sharded(std::vector<int64_t> global_shape, const MeshShape& mesh,
                        const std::vector<Placement>& placements);
  // Every one of `world_size` ranks holds the whole tensor.
  static Layout replicated(std::vector<int64_t> global_shape, int world_size);
  // Rank r holds flat elements [ranges[r].first, ranges[r].second) of the
  // whole tensor (ranges may be empty; ranks that hold the same range are
  // replicas), as a 1-D local tensor.
  static Layout flat(std::vector<int64_t> global_shape,
                     const std::vector<std::pair<int64_t, int64_t>>& ranges);
  // ZeRO over a regular layout: `placements` give each rank a box (they
  // must Replicate over `flat_axis`); that box's row-major flattening is
  // split evenly over the ranks along `flat_axis`, each keeping its part as
  // a 1-D local tensor. With a 1-axis mesh and Replicate, this is plain
  // ZeRO-1/2/3 partitioning of one tensor.
  static Layout sharded_flat(std::vector<int64_t> global_shape, const MeshShape& mesh,
                             const std::vector<Placement>& placements,
                             const std::string& flat_axis);
  // Anything else: chunks per rank, validated.
  static Layout from_chunks(std::vector<int64_t> global_shape,
                            std::vector<std::vector<Chunk>> chunks, bool flat);

  int world_size() const { return static_cast<int>(chunks_.size()); }
  const std::vector<int64_t>& global_shape() const { return global_shape_; }
  int64_t global_numel() const;
  const std::vector<Chunk>& chunks(int rank) const;
  // Local tensor shape on `rank`: the box's shape for a regular layout
  // (all zeros when the rank holds nothing), {n} for a flat one.
  std::vector<int64_t> local_shape(int rank) const;
  int64_t local_numel(int rank) const;
  bool is_flat() const { return flat_; }
  std::string to_string() const;

  // Every distinct box held by any rank tiles the global tensor exactly
  // (replicas hold identical boxes). Required of a redistribute source.
  bool covers_exactly() const;

 private:
  void validate() const;
  std::vector<int64_t> global_shape_;
  std::vector<std::vector<Chunk>> chunks_;
  bool flat_ = false;
};

// One box to move from a source rank's chunk to a target rank's chunk.
struct Transfer {
  int src_rank;
  int dst_rank;
  int src_chunk;  // index into from.chunks(src_rank)
  int dst_chunk;  // index into to.chunks(dst_rank)
  Box box;        // global coordinates
};

struct RedistributePlan {
  // Sorted by (src_rank, dst_rank, dst_chunk, box): the order in which
  // pieces are packed into send buffers and unpacked on arrival.
  std::vector<Transfer> transfers;

  // Elements each rank sends to other ranks / receives from them (self
  // copies excluded).
  std::vector<int64_t> send_elements(int world_size) const;
  std::vector<int64_t> recv_elements(int world_size) const;
  // Total elements crossing between ranks.
  int64_t moved_elements() const;
};

// InvalidArgument when the shapes or world sizes differ, or `from` does not
// tile the tensor (some element has no holder, or two holders' boxes
// partially overlap).
RedistributePlan plan_redistribute(const Layout& from, const Layout& to);

}  // namespace tessera::dist
