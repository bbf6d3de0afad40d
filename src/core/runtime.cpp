#include "tessera/core/runtime.h"

#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <dlfcn.h>
#include <malloc.h>
#include <sched.h>
#include <sys/sysinfo.h>
#include <torch/version.h>

#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <unordered_map>

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

// The CPU allocator init_runtime installs (RuntimeOptions::
// reuse_large_allocations): blocks of 1 MiB and more are kept when freed and
// handed out again for a request of about their size. LibTorch allocates
// with posix_memalign and frees at once; glibc serves blocks above 32 MiB
// with fresh mmap()s, and even with a raised mmap threshold an aligned
// block freed in the heap is not reused for the next aligned request of the
// same size (the alignment slack makes that request larger), so a step
// that allocates the same large activations and communication buffers
// every time page-faults all of them in again (on a 2-core KVM guest,
// 11,463 faults and tens of ms per 45 MiB buffer). Smaller blocks go to
// malloc as before, freed straight back to it. The idle cache holds at most
// an eighth of the host's memory (up to 4 GiB), shared out among the
// LOCAL_WORLD_SIZE ranks of the host; beyond that freed blocks go back to
// the OS.
class LargeBlockCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;
  static constexpr size_t kAlignment = 64;  // LibTorch's CPU alignment

  static LargeBlockCache& instance() {
    // Never destroyed: tensors freed during exit still return here.
    static LargeBlockCache* cache = new LargeBlockCache();
    return *cache;
  }

  // LibTorch 2.3 made allocate() non-const and added copy_data().
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  c10::DataPtr allocate(size_t bytes) override { return allocate_block(bytes); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count > 0) std::memcpy(dest, src, count);
  }
#else
  c10::DataPtr allocate(size_t bytes) const override { return allocate_block(bytes); }
#endif

  // For raw_allocate()'s blocks of any size: release() frees what it does
  // not hold.
  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  // Cached (idle) bytes and blocks, for tests.
  std::pair<size_t, size_t> idle() {
    std::lock_guard<std::mutex> lock(mu_);
    return {idle_bytes_, idle_.size()};
  }

 private:
  // allocate() for either LibTorch signature.
  c10::DataPtr allocate_block(size_t bytes) const {
    void* data = nullptr;
    if (bytes >= kMinBytes) {
      data = const_cast<LargeBlockCache*>(this)->take(bytes);
    } else if (bytes > 0) {
      TESSERA_CHECK(posix_memalign(&data, kAlignment, bytes) == 0, ResourceExhausted,
                    "CPU allocator: out of memory allocating ", bytes, " bytes");
    }
    return {data, data, bytes >= kMinBytes ? &release : &release_small,
            c10::Device(c10::DeviceType::CPU)};
  }

  LargeBlockCache() {
    struct sysinfo si {};
    size_t ram = sysinfo(&si) == 0 ? static_cast<size_t>(si.totalram) * si.mem_unit : 0;
    const size_t local_ranks = static_cast<size_t>(std::max(1, env_int("LOCAL_WORLD_SIZE", 1)));
    cap_ = std::min<size_t>(size_t{4} << 30, ram / 8) / local_ranks;
  }

  // A free block of at least `bytes` and at most 1/8 more, else a new one
  // rounded up to a whole MiB.
  void* take(size_t bytes) {
    const size_t rounded = (bytes + kMinBytes - 1) / kMinBytes * kMinBytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = idle_.lower_bound(rounded);
      if (it != idle_.end() && it->first <= rounded + rounded / 8) {
        void* data = it->second;
        idle_bytes_ -= it->first;
        live_[data] = it->first;
        idle_.erase(it);
        return data;
      }
    }
    void* data = nullptr;
    TESSERA_CHECK(posix_memalign(&data, kAlignment, rounded) == 0, ResourceExhausted,
                  "CPU allocator: out of memory allocating ", bytes, " bytes");
    std::lock_guard<std::mutex> lock(mu_);
    live_[data] = rounded;
    return data;
  }

  static void release_small(void* data) { std::free(data); }

  static void release(void* data) {
    if (!data) return;
    LargeBlockCache& self = instance();
    {
      std::lock_guard<std::mutex> lock(self.mu_);
      auto it = self.live_.find(data);
      if (it != self.live_.end()) {
        const size_t size = it->second;
        self.live_.erase(it);
        if (self.idle_bytes_ + size <= self.cap_) {
          self.idle_.emplace(size, data);
          self.idle_bytes_ += size;
          return;
        }
      }
    }
    std::free(data);
  }

  std::mutex mu_;
  std::unordered_map<void*, size_t> live_;  // large blocks in use -> size; guarded by mu_
  std::multimap<size_t, void*> idle_;       // freed large blocks by size; guarded by mu_
  size_t idle_bytes_ = 0;                   // guarded by mu_
  size_t cap_ = 0;
};

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

std::pair<size_t, size_t> cpu_allocator_idle() { return LargeBlockCache::instance().idle(); }

std::string RuntimeInfo::summary() const {
  std::ostringstream out;
  out << "LibTorch " << torch_version << ", " << num_threads << " thread"
      << (num_threads == 1 ? "" : "s") << " (" << usable_cores << " usable core"
      << (usable_cores == 1 ? "" : "s") << "), BLAS: " << blas_name
      << (blas_core.empty() ? "" : " (" + blas_core + ")")
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
  // OpenBLAS picks its kernels from the CPU model when it loads; a release
  // older than the CPU falls back to generic SSE3 ones ('Prescott'), 5x
  // slower on an AVX-512 host (Debian 12's 0.3.21 on Xeon model 207).
  using CoreName = char* (*)();
  if (auto corename = reinterpret_cast<CoreName>(dlsym(RTLD_DEFAULT, "openblas_get_corename"))) {
    if (const char* core = corename()) info.blas_core = core;
  }
  if (info.blas_core == "Prescott" && !std::getenv("OPENBLAS_CORETYPE")) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      info.blas_core_advice = "SkylakeX";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      info.blas_core_advice = "Haswell";
    }
  }
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
    static std::once_flag installed;
    std::call_once(installed, [] {
      c10::SetCPUAllocator(&LargeBlockCache::instance());
      // Blocks below the cache's 1 MiB stay with malloc: keep its heap
      // from mmap()ing them and from trimming freed memory at the top of
      // the heap back to the OS, which would page-fault it in again at the
      // next step.
      mallopt(M_MMAP_THRESHOLD, 1 << 30);
      mallopt(M_TRIM_THRESHOLD, 1 << 30);
    });
  }

  RuntimeInfo info = runtime_info();
  if (options.check_blas && !info.blas_core_advice.empty()) {
    static std::once_flag warned;
    std::call_once(warned, [&] {
      TESSERA_LOG(Warn, "core") << "OpenBLAS does not recognise this CPU and runs its generic '"
                                << info.blas_core << "' kernels: fp32 matmuls about 5x slower. "
                                << "Start the program with OPENBLAS_CORETYPE="
                                << info.blas_core_advice
                                << " in the environment (read when the library loads).";
    });
  }
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
