#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <vector>

#include "tessera/core/error.h"
#include "tessera/core/metrics.h"
#include "tessera/moe/deploy.h"

namespace tessera::moe {

PlatformProfile profile_platform(int64_t hidden, int64_t intermediate, const PriceSheet& prices,
                                 const std::string& scratch_dir, PlatformProfile p) {
  TESSERA_CHECK(hidden > 0 && intermediate > 0, InvalidArgument,
                "profile_platform: bad expert sizes");
  // One expert on one thread.
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  at::Tensor w1 = at::randn({intermediate, hidden}) * 0.02,
             w3 = at::randn({intermediate, hidden}) * 0.02;
  at::Tensor w2 = at::randn({hidden, intermediate}) * 0.02;
  at::Tensor x = at::randn({256, hidden});
  auto expert = [&] {
    at::Tensor h = at::silu(at::matmul(x, w1.t())) * at::matmul(x, w3.t());
    return at::matmul(h, w2.t());
  };
  expert();
  Stopwatch watch;
  int reps = 0;
  while (watch.seconds() < 0.3 || reps < 3) {
    expert();
    ++reps;
  }
  const double per_token = watch.seconds() / (reps * 256.0);
  at::set_num_threads(threads);
  p.memory_mb = prices.memory_sizes_mb;
  p.t_cal.clear();
  for (int64_t m : p.memory_mb) {
    // A function gets memory / memory_mb_per_vcpu of a vCPU; below one vCPU
    // it runs proportionally slower, above it gains nothing on one thread.
    const double share = std::min(1.0, static_cast<double>(m) / prices.memory_mb_per_vcpu);
    p.t_cal.push_back(per_token / share);
  }
  p.input_bytes_per_token = p.output_bytes_per_token = hidden * 4;
  p.expert_weight_bytes = 3 * hidden * intermediate * 4;
  p.intermediate_bytes_per_token = 2 * intermediate * 4;
  // Storage: write and read back 64 MiB.
  std::filesystem::create_directories(scratch_dir);
  const std::string path = scratch_dir + "/tessera-storage-probe";
  std::vector<char> buf(64 << 20, 'x');
  Stopwatch io;
  {
    std::ofstream out(path, std::ios::binary);
    out.write(buf.data(), static_cast<std::streamsize>(buf.size()));
  }
  {
    std::ifstream in(path, std::ios::binary);
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
  }
  p.storage_bandwidth = 2.0 * static_cast<double>(buf.size()) / io.seconds();
  std::filesystem::remove(path);
  return p;
}

}  // namespace tessera::moe
