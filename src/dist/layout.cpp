#include "tessera/dist/layout.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <sstream>

#include "tessera/core/error.h"

namespace tessera::dist {
namespace {

int64_t product(const std::vector<int64_t>& v) {
  return std::accumulate(v.begin(), v.end(), int64_t{1}, std::multiplies<int64_t>());
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

// Part `index` of `n` elements split into `parts` (array_split): returns
// {offset, length}.
std::pair<int64_t, int64_t> split_part(int64_t n, int64_t parts, int64_t index) {
  int64_t base = n / parts, extra = n % parts;
  int64_t offset = index * base + std::min(index, extra);
  return {offset, base + (index < extra ? 1 : 0)};
}

void decompose_into(const std::vector<int64_t>& shape, size_t dim, std::vector<int64_t>& prefix,
                    int64_t begin, int64_t end, std::vector<Box>& out) {
  if (begin >= end) return;
  const size_t ndim = shape.size();
  auto emit = [&](int64_t row_offset, int64_t rows) {
    Box box;
    box.offset = prefix;
    box.length.assign(prefix.size(), 1);
    box.offset.push_back(row_offset);
    box.length.push_back(rows);
    for (size_t d = dim + 1; d < ndim; ++d) {
      box.offset.push_back(0);
      box.length.push_back(shape[d]);
    }
    out.push_back(std::move(box));
  };
  int64_t inner = 1;
  for (size_t d = dim + 1; d < ndim; ++d) inner *= shape[d];
  if (dim + 1 == ndim) {
    emit(begin, end - begin);
    return;
  }
  int64_t first_row = begin / inner,
          last_row = end / inner;  // last_row: first row not fully inside
  auto recurse_row = [&](int64_t row, int64_t b, int64_t e) {
    prefix.push_back(row);
    decompose_into(shape, dim + 1, prefix, b, e, out);
    prefix.pop_back();
  };
  if (first_row == last_row) {  // inside one row
    recurse_row(first_row, begin - first_row * inner, end - first_row * inner);
    return;
  }
  int64_t full_begin = first_row;
  if (begin % inner != 0) {
    recurse_row(first_row, begin % inner, inner);
    full_begin = first_row + 1;
  }
  if (last_row > full_begin) emit(full_begin, last_row - full_begin);
  if (end % inner != 0) recurse_row(last_row, 0, end % inner);
}

// Boxes of `range` of a box's flattening, shifted into global coordinates.
std::vector<Chunk> flat_chunks(const Box& outer, int64_t begin, int64_t end) {
  std::vector<Chunk> chunks;
  int64_t local = 0;
  for (Box& b : decompose_flat_range(outer.length, begin, end)) {
    for (size_t d = 0; d < b.offset.size(); ++d) b.offset[d] += outer.offset[d];
    int64_t n = b.numel();
    chunks.push_back({std::move(b), local});
    local += n;
  }
  return chunks;
}

Box whole_box(const std::vector<int64_t>& shape) {
  return Box{std::vector<int64_t>(shape.size(), 0), shape};
}

// The box a rank holds under regular placements.
Box regular_box(const std::vector<int64_t>& shape, const MeshShape& mesh,
                const std::vector<Placement>& placements, int rank) {
  Box box = whole_box(shape);
  auto coords = mesh.coords_of(rank);
  for (size_t axis = 0; axis < placements.size(); ++axis) {
    const Placement& p = placements[axis];
    if (p.kind != Placement::Kind::kShard) continue;
    auto [off, len] = split_part(box.length[p.dim], mesh.sizes[axis], coords[axis]);
    box.offset[p.dim] += off;
    box.length[p.dim] = len;
  }
  return box;
}

void check_placements(const std::vector<int64_t>& shape, const MeshShape& mesh,
                      const std::vector<Placement>& placements) {
  TESSERA_CHECK(placements.size() == mesh.sizes.size(), InvalidArgument,
                "layout: ", placements.size(), " placements for a mesh of ", mesh.sizes.size(),
                " axes");
  for (size_t axis = 0; axis < placements.size(); ++axis) {
    const Placement& p = placements[axis];
    if (p.kind == Placement::Kind::kShard) {
      TESSERA_CHECK(p.dim >= 0 && p.dim < static_cast<int>(shape.size()), InvalidArgument,
                    "layout: Shard(", p.dim, ") on mesh axis ", axis, " but the tensor ",
                    shape_text(shape), " has ", shape.size(), " dimensions");
    }
  }
}

}  // namespace

int64_t Box::numel() const { return product(length); }

std::string Box::to_string() const {
  std::ostringstream out;
  out << "[";
  for (size_t d = 0; d < offset.size(); ++d) {
    out << (d ? ", " : "") << offset[d] << ":" << offset[d] + length[d];
  }
  out << "]";
  return out.str();
}

Box intersect(const Box& a, const Box& b) {
  TESSERA_CHECK(a.offset.size() == b.offset.size(), InvalidArgument,
                "intersect: boxes of different rank ", a.to_string(), " and ", b.to_string());
  Box out;
  out.offset.resize(a.offset.size());
  out.length.resize(a.offset.size());
  for (size_t d = 0; d < a.offset.size(); ++d) {
    int64_t lo = std::max(a.offset[d], b.offset[d]);
    int64_t hi = std::min(a.offset[d] + a.length[d], b.offset[d] + b.length[d]);
    out.offset[d] = lo;
    out.length[d] = std::max<int64_t>(0, hi - lo);
  }
  return out;
}

std::vector<Box> decompose_flat_range(const std::vector<int64_t>& shape, int64_t begin,
                                      int64_t end) {
  int64_t n = product(shape);
  TESSERA_CHECK(0 <= begin && begin <= end && end <= n, InvalidArgument, "flat range [", begin,
                ", ", end, ") outside a tensor of ", n, " elements");
  std::vector<Box> out;
  if (begin == end) return out;
  if (shape.empty()) {
    out.push_back(Box{});
    return out;
  }
  std::vector<int64_t> prefix;
  decompose_into(shape, 0, prefix, begin, end, out);
  return out;
}

int64_t MeshShape::world_size() const { return product(sizes); }

int MeshShape::axis(const std::string& name) const {
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) return static_cast<int>(i);
  }
  std::string known;
  for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
  TESSERA_THROW(NotFound, "mesh has no axis '", name, "' (axes: ", known, ")");
}

std::vector<int64_t> MeshShape::coords_of(int rank) const {
  TESSERA_CHECK(rank >= 0 && rank < world_size(), InvalidArgument, "rank ", rank,
                " outside a mesh of ", world_size(), " ranks");
  std::vector<int64_t> coords(sizes.size());
  int64_t rest = rank;
  for (size_t i = sizes.size(); i-- > 0;) {
    coords[i] = rest % sizes[i];
    rest /= sizes[i];
  }
  return coords;
}

int MeshShape::rank_of(const std::vector<int64_t>& coords) const {
  int64_t rank = 0;
  for (size_t i = 0; i < sizes.size(); ++i) rank = rank * sizes[i] + coords[i];
  return static_cast<int>(rank);
}

Layout Layout::sharded(std::vector<int64_t> global_shape, const MeshShape& mesh,
                       const std::vector<Placement>& placements) {
  check_placements(global_shape, mesh, placements);
  std::vector<std::vector<Chunk>> chunks(mesh.world_size());
  for (int r = 0; r < mesh.world_size(); ++r) {
    chunks[r].push_back({regular_box(global_shape, mesh, placements, r), 0});
  }
  return from_chunks(std::move(global_shape), std::move(chunks), /*flat=*/false);
}

Layout Layout::replicated(std::vector<int64_t> global_shape, int world_size) {
  TESSERA_CHECK(world_size >= 1, InvalidArgument, "layout: world size must be positive");
  MeshShape mesh{{world_size}, {"world"}};
  return sharded(std::move(global_shape), mesh, {Placement::Replicate()});
}

Layout Layout::flat(std::vector<int64_t> global_shape,
                    const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  Box all = whole_box(global_shape);
  std::vector<std::vector<Chunk>> chunks;
  for (const auto& [begin, end] : ranges) chunks.push_back(flat_chunks(all, begin, end));
  return from_chunks(std::move(global_shape), std::move(chunks), /*flat=*/true);
}

Layout Layout::sharded_flat(std::vector<int64_t> global_shape, const MeshShape& mesh,
                            const std::vector<Placement>& placements,
                            const std::string& flat_axis) {
  check_placements(global_shape, mesh, placements);
  int axis = mesh.axis(flat_axis);
  TESSERA_CHECK(placements[axis].kind == Placement::Kind::kReplicate, InvalidArgument,
                "layout: the flat axis '", flat_axis, "' must Replicate in the placements");
  std::vector<std::vector<Chunk>> chunks(mesh.world_size());
  for (int r = 0; r < mesh.world_size(); ++r) {
    Box box = regular_box(global_shape, mesh, placements, r);
    auto [begin, len] = split_part(box.numel(), mesh.sizes[axis], mesh.coords_of(r)[axis]);
    chunks[r] = flat_chunks(box, begin, begin + len);
  }
  return from_chunks(std::move(global_shape), std::move(chunks), /*flat=*/true);
}

Layout Layout::from_chunks(std::vector<int64_t> global_shape,
                           std::vector<std::vector<Chunk>> chunks, bool flat) {
  Layout layout;
  layout.global_shape_ = std::move(global_shape);
  layout.chunks_ = std::move(chunks);
  layout.flat_ = flat;
  layout.validate();
  return layout;
}

void Layout::validate() const {
  TESSERA_CHECK(!chunks_.empty(), InvalidArgument, "layout: no ranks");
  for (int64_t s : global_shape_) {
    TESSERA_CHECK(s >= 0, InvalidArgument, "layout: negative size in shape ",
                  shape_text(global_shape_));
  }
  Box all = whole_box(global_shape_);
  for (size_t r = 0; r < chunks_.size(); ++r) {
    TESSERA_CHECK(flat_ || chunks_[r].size() <= 1, InvalidArgument,
                  "layout: a regular layout holds at most one box per rank (rank ", r, ")");
    int64_t expected_offset = 0;
    for (const Chunk& c : chunks_[r]) {
      TESSERA_CHECK(c.box.offset.size() == global_shape_.size() &&
                        c.box.length.size() == global_shape_.size(),
                    InvalidArgument, "layout: box ", c.box.to_string(), " of rank ", r,
                    " does not match the tensor's ", global_shape_.size(), " dimensions");
      TESSERA_CHECK(intersect(c.box, all) == c.box, InvalidArgument, "layout: box ",
                    c.box.to_string(), " of rank ", r, " lies outside the tensor ",
                    shape_text(global_shape_));
      TESSERA_CHECK(c.local_offset == expected_offset, InvalidArgument, "layout: chunks of rank ",
                    r, " must be stored back to back");
      expected_offset += c.box.numel();
    }
  }
}

int64_t Layout::global_numel() const { return product(global_shape_); }

const std::vector<Chunk>& Layout::chunks(int rank) const {
  TESSERA_CHECK(rank >= 0 && rank < world_size(), InvalidArgument, "layout: rank ", rank,
                " outside a world of ", world_size());
  return chunks_[rank];
}

std::vector<int64_t> Layout::local_shape(int rank) const {
  const auto& c = chunks(rank);
  if (flat_) return {local_numel(rank)};
  // A rank holding nothing (an expert another rank owns) has an empty
  // tensor of the same rank.
  if (c.empty()) return std::vector<int64_t>(std::max<size_t>(global_shape_.size(), 1), 0);
  return c.front().box.length;
}

int64_t Layout::local_numel(int rank) const {
  int64_t n = 0;
  for (const Chunk& c : chunks(rank)) n += c.box.numel();
  return n;
}

std::string Layout::to_string() const {
  std::ostringstream out;
  out << (flat_ ? "flat " : "regular ") << shape_text(global_shape_) << " over " << world_size()
      << " ranks:";
  for (int r = 0; r < world_size(); ++r) {
    out << " r" << r << "=";
    for (size_t i = 0; i < chunks_[r].size(); ++i) {
      out << (i ? "+" : "") << chunks_[r][i].box.to_string();
    }
  }
  return out.str();
}

namespace {

// Distinct boxes of a layout, each with its holders (rank, chunk index).
using Holders = std::vector<std::pair<int, int>>;
std::map<Box, Holders> distinct_boxes(const Layout& layout) {
  std::map<Box, Holders> boxes;
  for (int r = 0; r < layout.world_size(); ++r) {
    const auto& chunks = layout.chunks(r);
    for (size_t i = 0; i < chunks.size(); ++i) {
      if (chunks[i].box.empty()) continue;
      boxes[chunks[i].box].push_back({r, static_cast<int>(i)});
    }
  }
  return boxes;
}

// Empty string when the distinct boxes tile the tensor, else why not.
std::string tiling_problem(const Layout& layout, const std::map<Box, Holders>& boxes) {
  int64_t total = 0;
  for (const auto& [box, holders] : boxes) total += box.numel();
  // Pairwise disjointness; the number of distinct boxes is small (ranks x
  // chunks per rank), so the quadratic check is cheap next to any transfer.
  for (auto a = boxes.begin(); a != boxes.end(); ++a) {
    for (auto b = std::next(a); b != boxes.end(); ++b) {
      if (!intersect(a->first, b->first).empty()) {
        return "boxes " + a->first.to_string() + " (rank " +
               std::to_string(a->second.front().first) + ") and " + b->first.to_string() +
               " (rank " + std::to_string(b->second.front().first) + ") partially overlap";
      }
    }
  }
  if (total != layout.global_numel()) {
    return "the ranks hold " + std::to_string(total) + " distinct elements of " +
           std::to_string(layout.global_numel());
  }
  return "";
}

}  // namespace

bool Layout::covers_exactly() const { return tiling_problem(*this, distinct_boxes(*this)).empty(); }

std::vector<int64_t> RedistributePlan::send_elements(int world_size) const {
  std::vector<int64_t> out(world_size, 0);
  for (const auto& t : transfers) {
    if (t.src_rank != t.dst_rank) out[t.src_rank] += t.box.numel();
  }
  return out;
}

std::vector<int64_t> RedistributePlan::recv_elements(int world_size) const {
  std::vector<int64_t> out(world_size, 0);
  for (const auto& t : transfers) {
    if (t.src_rank != t.dst_rank) out[t.dst_rank] += t.box.numel();
  }
  return out;
}

int64_t RedistributePlan::moved_elements() const {
  int64_t n = 0;
  for (const auto& t : transfers) {
    if (t.src_rank != t.dst_rank) n += t.box.numel();
  }
  return n;
}

RedistributePlan plan_redistribute(const Layout& from, const Layout& to) {
  TESSERA_CHECK(from.global_shape() == to.global_shape(), InvalidArgument,
                "redistribute: source shape ", shape_text(from.global_shape()),
                " differs from target shape ", shape_text(to.global_shape()));
  TESSERA_CHECK(from.world_size() == to.world_size(), InvalidArgument,
                "redistribute: source layout has ", from.world_size(), " ranks, target layout has ",
                to.world_size());
  auto sources = distinct_boxes(from);
  std::string problem = tiling_problem(from, sources);
  TESSERA_CHECK(problem.empty(), InvalidArgument,
                "redistribute: the source layout does not tile the tensor: ", problem);

  RedistributePlan plan;
  std::vector<int64_t> load(from.world_size(), 0);  // elements each source sends
  for (int dst = 0; dst < to.world_size(); ++dst) {
    const auto& dst_chunks = to.chunks(dst);
    for (size_t dc = 0; dc < dst_chunks.size(); ++dc) {
      const Box& want = dst_chunks[dc].box;
      if (want.empty()) continue;
      for (const auto& [have, holders] : sources) {
        Box piece = intersect(want, have);
        if (piece.empty()) continue;
        // Prefer the destination itself (a local copy); otherwise the holder
        // that has sent the least so far, lowest rank on ties. Every rank
        // computes the same plan, so the choice needs no agreement.
        const std::pair<int, int>* pick = nullptr;
        for (const auto& h : holders) {
          if (h.first == dst) {
            pick = &h;
            break;
          }
          if (!pick || load[h.first] < load[pick->first]) pick = &h;
        }
        if (pick->first != dst) load[pick->first] += piece.numel();
        plan.transfers.push_back({pick->first, dst, pick->second, static_cast<int>(dc), piece});
      }
    }
  }
  std::sort(plan.transfers.begin(), plan.transfers.end(), [](const Transfer& a, const Transfer& b) {
    if (a.src_rank != b.src_rank) return a.src_rank < b.src_rank;
    if (a.dst_rank != b.dst_rank) return a.dst_rank < b.dst_rank;
    if (a.dst_chunk != b.dst_chunk) return a.dst_chunk < b.dst_chunk;
    return a.box < b.box;
  });
  return plan;
}

}  // namespace tessera::dist
