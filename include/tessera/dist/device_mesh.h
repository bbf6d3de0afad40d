// tessera/dist/device_mesh.h — ranks arranged on named axes.
//
// A DeviceMesh lays the ranks of a group out on axes such as dp, tp, pp and
// ep, row-major (the last axis varies fastest: with shape {dp=2, tp=2},
// ranks 0,1 form a tp group and ranks 0,2 a dp group). It creates, once, the
// sub-group of every axis that contains this rank.
//
//   auto world = tessera::dist::init_process_group();
//   auto mesh = tessera::dist::DeviceMesh::create(world, {{"dp", 2}, {"tp", 2}});
//   mesh.group("tp")->all_reduce(partial_sum).wait();
//
// Creation is collective over the whole group. Thread-compatible.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tessera/dist/layout.h"
#include "tessera/dist/process_group.h"

namespace tessera::dist {

class DeviceMesh {
 public:
  // The product of axis sizes must equal group->size() (InvalidArgument).
  static DeviceMesh create(std::shared_ptr<ProcessGroup> group,
                           const std::vector<std::pair<std::string, int64_t>>& axes);

  const MeshShape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.sizes.size()); }
  int64_t size(const std::string& axis) const;
  // This rank's coordinate on each axis / on one axis.
  const std::vector<int64_t>& coords() const { return coords_; }
  int64_t coord(const std::string& axis) const;
  // Group ranks that share all coordinates but `axis` with `rank`, in order.
  std::vector<int> ranks_along(const std::string& axis, int rank) const;
  // The sub-group along `axis` containing this rank (NotFound for an
  // unknown axis).
  const std::shared_ptr<ProcessGroup>& group(const std::string& axis) const;
  const std::shared_ptr<ProcessGroup>& whole() const { return whole_; }

 private:
  MeshShape shape_;
  std::vector<int64_t> coords_;
  std::shared_ptr<ProcessGroup> whole_;
  std::vector<std::shared_ptr<ProcessGroup>> axis_groups_;
};

}  // namespace tessera::dist
