// tessera/core/runtime.h — process-wide start-up: threads, BLAS check.
//
// Call init_runtime() once near the top of main(). It
//   * sets LibTorch's intra-op thread count from the cores this process may
//     use (CPU affinity and cgroup quota), divided among the local ranks when
//     launched by tessera-launch/torchrun (LOCAL_WORLD_SIZE). LibTorch would
//     otherwise start with whatever OMP_NUM_THREADS says, often 1;
//   * finds which BLAS library LibTorch's matmuls will call and warns loudly
//     when it is the unoptimised reference BLAS (about 30x slower than
//     OpenBLAS for fp32 GEMM on a 2-core machine);
//   * applies the log level.
//
//   tessera::RuntimeOptions opts;        // defaults are right for most programs
//   auto info = tessera::init_runtime(opts);
//   std::cout << info.summary() << "\n";
//
// Thread-safe; later calls re-apply the options.
#pragma once

#include <cstddef>
#include <string>
#include <utility>

namespace tessera {

struct RuntimeOptions {
  // Intra-op threads. 0: TESSERA_NUM_THREADS if set, else usable cores
  // divided by LOCAL_WORLD_SIZE (at least 1).
  int num_threads = 0;
  // Warn when LibTorch runs on the reference BLAS.
  bool check_blas = true;
  // Install a CPU allocator that keeps freed blocks of 1 MiB and more and
  // hands them out again for a request of about their size, so buffers of a
  // repeated size are not page-faulted in on every step. The idle blocks
  // take at most an eighth of the host's memory (up to 4 GiB), divided by
  // LOCAL_WORLD_SIZE, of resident memory; tensors allocated before
  // init_runtime are unaffected.
  bool reuse_large_allocations = true;
  // A TESSERA_LOG_LEVEL-style spec ("info", "warn,dist=debug"); empty keeps
  // the environment's.
  std::string log_level;
};

struct RuntimeInfo {
  std::string torch_version;  // "1.13.1"
  int num_threads = 1;        // intra-op threads now in effect
  int usable_cores = 1;       // cores this process may run on
  std::string blas_name;      // "OpenBLAS", "reference BLAS", "MKL", "unknown"
  std::string blas_library;   // resolved path of the library providing sgemm_
  bool blas_is_reference = false;
  // OpenBLAS only: the kernel set it chose ("SkylakeX", "Haswell", ...), and
  // the OPENBLAS_CORETYPE to set when it fell back to its generic kernels
  // on a CPU it does not know (empty otherwise; init_runtime warns).
  std::string blas_core;
  std::string blas_core_advice;
  bool cuda = false;  // LibTorch sees a CUDA device

  std::string summary() const;  // one line for logs
};

RuntimeInfo init_runtime(const RuntimeOptions& options = {});

// Inspects without changing anything.
RuntimeInfo runtime_info();

// Cores this process may run on: the affinity mask, capped by a cgroup v2
// CPU quota when one is set.
int usable_cores();

// The CPU allocator of RuntimeOptions::reuse_large_allocations: bytes and
// blocks it holds freed for reuse now.
std::pair<size_t, size_t> cpu_allocator_idle();

}  // namespace tessera
