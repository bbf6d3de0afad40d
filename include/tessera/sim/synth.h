// tessera/sim/synth.h — analytical traces: the training step of a job on a
// described accelerator, without running it.
//
// The tracer (tracer.h) times real kernels on this machine; a model the size
// of Llama-70B on a GPU cluster cannot run here. synthesize_trace() writes
// the trace such a run would record instead: the same communication calls
// in the same order, with the same groups and sizes, as Tessera's trainer
// issues them (tests/sim compare both on small jobs: kinds, groups and bytes
// agree exactly, except the data-dependent all_to_all volumes of MoE token
// exchange, which are taken as balanced here), and compute nodes timed with
// a roofline per operation on the device:
//
//   time(op) = kernels * kernel_overhead_us
//              + max(flops / (peak * matmul_efficiency),
//                    bytes / (memory_gbps * memory_efficiency))
//
// where peak is matmul_tflops of the job's precision (fp32, or bf16 under
// bf16_autocast) for matrix products, and vector work (norms, softmax,
// elementwise, the optimiser) is counted by the bytes it moves. The
// operations follow Tessera's implementation (attention materialises the
// [T, T] scores; backward costs two matrix products per forward one).
// Each compute node carries its matrix-product FLOPs.
//
// Memory per rank is estimated (not measured) as parameters, gradients and
// optimiser state in fp32 plus the activations kept for backward, and
// compared with the device's memory in the trace's metadata (the composer
// reports ranks over it).
//
// The device file:
//
//   {"schema": "tessera.sim.device/1", "name": "a100-sxm4-80gb",
//    "description": "...", "provenance": "...",
//    "matmul_tflops": {"fp32": 19.5, "bf16": 312},
//    "memory_gbps": 2039, "memory_bytes": 85899345920,
//    "matmul_efficiency": 0.7, "memory_efficiency": 0.8, "kernel_overhead_us": 4}
//
//   auto device = tessera::sim::DeviceSpec::load_file("data/sim/a100_sxm4_80gb.json");
//   tessera::sim::Trace t = tessera::sim::synthesize_trace(job, device);
//
// Pure functions; DeviceSpec is a plain value (thread-compatible).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "tessera/sim/trace.h"
#include "tessera/sim/training_job.h"

namespace tessera::sim {

struct DeviceSpec {
  std::string name;
  std::string description;
  std::string provenance;
  double matmul_tflops_fp32 = 19.5;  // dense matrix-product peak, TFLOP/s
  double matmul_tflops_bf16 = 312;
  double memory_gbps = 2039;  // GB/s (1e9 bytes)
  int64_t memory_bytes = 0;   // 0 = unknown
  double matmul_efficiency = 0.7;
  double memory_efficiency = 0.8;
  double kernel_overhead_us = 4;

  // Parses and checks (InvalidArgument naming the source and the field:
  // unknown keys, non-positive rates, efficiencies outside (0, 1]).
  static DeviceSpec parse(std::string_view text, const std::string& source = "<device>");
  // NotFound when the file cannot be read.
  static DeviceSpec load_file(const std::string& path);
  std::string to_json() const;
};

// Estimated bytes one rank of the job holds at its peak (see the top).
struct MemoryEstimate {
  int64_t parameters = 0;
  int64_t gradients = 0;
  int64_t optimizer = 0;
  int64_t activations = 0;  // one micro-batch's activations kept for backward
  int64_t total() const { return parameters + gradients + optimizer + activations; }
};
MemoryEstimate estimate_memory(const TrainingJobConfig& config, int rank);

// The trace of one step of `config` on `device` (see the top): one entry per
// rank class (tracer.h's rank_classes), groups as named partitions,
// metadata.memory_capacity_bytes = device.memory_bytes. InvalidArgument when
// the config is invalid.
Trace synthesize_trace(const TrainingJobConfig& config, const DeviceSpec& device);

}  // namespace tessera::sim
