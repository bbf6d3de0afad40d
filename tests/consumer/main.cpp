// Built against an installed Tessera by tests/consumer/run.sh.
#include <ATen/ATen.h>
#include <tessera/core/runtime.h>
#include <tessera/dist/layout.h>
#include <tessera/dist/redistribute.h>
#include <tessera/dist/rendezvous.h>

#include <iostream>

int main() {
  tessera::init_runtime();
  auto world = tessera::dist::init_process_group();  // one rank without launcher variables
  tessera::dist::MeshShape mesh{{1}, {"tp"}};
  auto rows = tessera::dist::Layout::sharded({4, 4}, mesh, {tessera::dist::Placement::Shard(0)});
  auto cols = tessera::dist::Layout::sharded({4, 4}, mesh, {tessera::dist::Placement::Shard(1)});
  at::Tensor x = at::arange(16, at::kFloat).view({4, 4});
  at::Tensor y = tessera::dist::redistribute(*world, x, rows, cols);
  at::Tensor sum = y.clone();
  world->all_reduce(sum).wait();
  bool ok = at::equal(x, y) && at::equal(sum, x);
  std::cout << "consumer: " << (ok ? "ok" : "MISMATCH") << std::endl;
  return ok ? 0 : 1;
}
