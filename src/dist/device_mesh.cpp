#include "tessera/dist/device_mesh.h"

#include "tessera/core/error.h"

namespace tessera::dist {

DeviceMesh DeviceMesh::create(std::shared_ptr<ProcessGroup> group,
                              const std::vector<std::pair<std::string, int64_t>>& axes) {
  TESSERA_CHECK(group != nullptr, InvalidArgument, "device mesh: no process group");
  DeviceMesh mesh;
  int64_t total = 1;
  std::string text;
  for (const auto& [name, size] : axes) {
    TESSERA_CHECK(size >= 1, InvalidArgument, "device mesh: axis '", name, "' has size ", size);
    for (const auto& existing : mesh.shape_.names) {
      TESSERA_CHECK(existing != name, InvalidArgument, "device mesh: axis '", name,
                    "' named twice");
    }
    mesh.shape_.names.push_back(name);
    mesh.shape_.sizes.push_back(size);
    total *= size;
    text += (text.empty() ? "" : " x ") + name + "=" + std::to_string(size);
  }
  TESSERA_CHECK(total == group->size(), InvalidArgument, "device mesh ", text, " has ", total,
                " ranks but group '", group->name(), "' has ", group->size());
  mesh.whole_ = group;
  mesh.coords_ = mesh.shape_.coords_of(group->rank());
  // Every rank creates every slice's group in the same order (creation is
  // collective over the parent group); each keeps the one it belongs to.
  for (int axis = 0; axis < mesh.ndim(); ++axis) {
    const std::string& name = mesh.shape_.names[axis];
    std::shared_ptr<ProcessGroup> mine;
    for (int r = 0; r < group->size(); ++r) {
      if (mesh.shape_.coords_of(r)[axis] != 0) continue;  // one slice per leader
      auto ranks = mesh.ranks_along(name, r);
      auto sub = group->new_subgroup(ranks, group->name() + "/" + name + std::to_string(r));
      if (sub) mine = sub;
    }
    mesh.axis_groups_.push_back(mine);
  }
  return mesh;
}

int64_t DeviceMesh::size(const std::string& axis) const { return shape_.sizes[shape_.axis(axis)]; }

int64_t DeviceMesh::coord(const std::string& axis) const { return coords_[shape_.axis(axis)]; }

std::vector<int> DeviceMesh::ranks_along(const std::string& axis, int rank) const {
  int a = shape_.axis(axis);
  auto coords = shape_.coords_of(rank);
  std::vector<int> ranks;
  for (int64_t i = 0; i < shape_.sizes[a]; ++i) {
    coords[a] = i;
    ranks.push_back(shape_.rank_of(coords));
  }
  return ranks;
}

const std::shared_ptr<ProcessGroup>& DeviceMesh::group(const std::string& axis) const {
  return axis_groups_[shape_.axis(axis)];
}

}  // namespace tessera::dist
