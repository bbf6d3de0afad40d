#include "tessera/core/runtime.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <malloc.h>
#include <sched.h>
#include <torch/version.h>

#include <climits>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>

#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/tensor.h"

namespace tessera {
namespace {

// cgroup v2 "max period" or "quota period"; returns 0 when unlimited/unknown.
int cgroup_cpu_limit() {
  std::ifstream in("/sys/fs/cgroup/cpu.max");
  std::string quota;
  long period = 0;
  if (!(in >> quota >> period) || quota == "max" || period <= 0) return 0;
  long q = std::atol(quota.c_str());
  if (q <= 0) return 0;
  return static_cast<int>(std::ceil(static_cast<double>(q) / static_cast<double>(period)));
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long parsed = std::strtol(v, &end, 10);
  TESSERA_CHECK(end && *end == '\0' && parsed > 0 && parsed < INT_MAX, InvalidArgument, name,
                " must be a positive integer, got '", v, "'");
  return static_cast<int>(parsed);
}

struct BlasInfo {
  std::string name = "unknown";
  std::string path;
  bool reference = false;
};

// LibTorch calls the Fortran BLAS symbol sgemm_ for fp32 matmul; whichever
// library provides it in this process is the BLAS in use.
BlasInfo detect_blas() {
  BlasInfo info;
  void* symbol = dlsym(RTLD_DEFAULT, "sgemm_");
  Dl_info dl{};
  if (!symbol || dladdr(symbol, &dl) == 0 || dl.dli_fname == nullptr) {
    info.name = "none found (LibTorch's own kernels)";
    return info;
  }
  char resolved[PATH_MAX];
  info.path = realpath(dl.dli_fname, resolved) ? resolved : dl.dli_fname;
  const std::string& p = info.path;
  if (p.find("openblas") != std::string::npos) {
    info.name = "OpenBLAS";
  } else if (p.find("mkl") != std::string::npos) {
    info.name = "MKL";
  } else if (p.find("blis") != std::string::npos) {
    info.name = "BLIS";
  } else if (p.find("atlas") != std::string::npos) {
    info.name = "ATLAS";
  } else if (p.find("/blas/") != std::string::npos || p.find("libblas.so") != std::string::npos) {
    info.name = "reference BLAS";
    info.reference = true;
  }
  return info;
}

}  // namespace

int usable_cores() {
  int cores = 1;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cores = CPU_COUNT(&set);
  int limit = cgroup_cpu_limit();
  if (limit > 0 && limit < cores) cores = limit;
  return cores > 0 ? cores : 1;
}

std::string RuntimeInfo::summary() const {
  std::ostringstream out;
  out << "LibTorch " << torch_version << ", " << num_threads << " thread"
      << (num_threads == 1 ? "" : "s") << " (" << usable_cores << " usable core"
      << (usable_cores == 1 ? "" : "s") << "), BLAS: " << blas_name
      << (cuda ? ", CUDA available" : ", CPU only");
  return out.str();
}

RuntimeInfo runtime_info() {
  RuntimeInfo info;
  info.torch_version = TORCH_VERSION;
  info.num_threads = at::get_num_threads();
  info.usable_cores = usable_cores();
  BlasInfo blas = detect_blas();
  info.blas_name = blas.name;
  info.blas_library = blas.path;
  info.blas_is_reference = blas.reference;
  info.cuda = cuda_available();
  return info;
}

RuntimeInfo init_runtime(const RuntimeOptions& options) {
  if (!options.log_level.empty()) log::configure(options.log_level);
  int threads = options.num_threads;
  if (threads <= 0) threads = env_int("TESSERA_NUM_THREADS", 0);
  if (threads <= 0) {
    int local_ranks = env_int("LOCAL_WORLD_SIZE", 1);
    threads = std::max(1, usable_cores() / local_ranks);
  }
  if (at::get_num_threads() != threads) at::set_num_threads(threads);
  if (options.reuse_large_allocations) {
    // glibc serves blocks above 32 MiB (its dynamic mmap threshold's cap)
    // with fresh mmap()s and unmaps them on free, so every step that
    // allocates a large activation or communication buffer page-faults it in
    // again. Keeping such blocks in the heap makes a reused size free.
    static std::once_flag tuned;
    std::call_once(tuned, [] {
      mallopt(M_MMAP_THRESHOLD, 1 << 30);
      mallopt(M_TRIM_THRESHOLD, 1 << 30);
    });
  }

  RuntimeInfo info = runtime_info();
  if (options.check_blas && info.blas_is_reference) {
    // Once per process is enough; this runs in every rank.
    static std::once_flag warned;
    std::call_once(
        warned, [&] {
          TESSERA_LOG(Warn, "core")
              << "LibTorch is calling the REFERENCE BLAS (" << info.blas_library
              << "): fp32 matmuls will run ~30x slower than with an optimised BLAS. "
                 "Install one: apt-get install libopenblas0-openmp (scripts/install-deps.sh does).";
        });
  }
  TESSERA_LOG(Debug, "core") << info.summary();
  return info;
}

}  // namespace tessera
