// Built against an installed Tessera by tests/consumer/run.sh.
#include <ATen/ATen.h>
#include <tessera/core/runtime.h>
#include <tessera/dist/layout.h>
#include <tessera/dist/redistribute.h>
#include <tessera/dist/rendezvous.h>
#include <tessera/quant/quant.h>
#include <tessera/specdec/qspec.h>
#ifdef CONSUMER_WITH_GRPC
#include <tessera/moe/deploy.h>
#include <tessera/rlhf/driver.h>
#include <tessera/rlhf/hybrid_engine.h>
#include <tessera/rpc/rpc.h>
#endif

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
  // The quant, specdec, rlhf, rpc and moe headers and libraries (with the
  // generated protobuf headers) are installed too.
  auto q = tessera::quant::quantize(at::randn({8, 64}), {64, true});
  at::Tensor out = tessera::quant::linear(at::randn({2, 64}), q, tessera::quant::Mode::kW4A16);
  bool ok = at::equal(x, y) && at::equal(sum, x) && out.size(1) == 8 &&
            tessera::specdec::decoding_name({}) == "qspec";
#ifdef CONSUMER_WITH_GRPC
  auto groups = tessera::rlhf::hybrid_engine_groups(8, 4, 2);
  const auto prices = tessera::moe::PriceSheet::aws_lambda();
  tessera::rpc::TensorProto proto;
  tessera::rpc::to_proto(x, "x", &proto);
  ok = ok && prices.memory_sizes_mb.size() == 14 && at::equal(tessera::rpc::from_proto(proto), x) &&
       tessera::rlhf::Args().set("k", 1.0).json() == "{\"k\":1.0}" &&
       groups.micro_dp_groups.size() == 4;
#endif
  std::cout << "consumer: " << (ok ? "ok" : "MISMATCH") << std::endl;
  return ok ? 0 : 1;
}
