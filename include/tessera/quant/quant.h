// tessera/quant/quant.h — int4 weights with per-group scales, run two ways.
//
// A linear weight W [N, K] is packed once into 4-bit codes q in [0, 15] with
// one scale s and one integer zero point z per group of `group_size`
// consecutive input features: W[n, k] ~ s[n, g] * (q[n, k] - z[n, g]).
// Symmetric groups use z = 8 (codes -8..7 around zero); asymmetric groups
// fit [min, max] with z in [0, 15].
//
// The same packed weights run in three modes:
//   * kW4A16 — weight-only: activations are rounded to bf16 and multiplied
//     with the integer codes; fp32 accumulation, the scale per group.
//   * kW4A8 / kW4A4 — activation-weight: each token's activations are
//     quantized per group (scale = max|x| / 127 or / 7, round to nearest),
//     and each group's dot product runs in integer arithmetic:
//       y[m, n] = sum_g s[n, g] * sx[m, g] * (sum_k q x_q - z[n, g] * sum_k x_q).
// Every kernel computes each output with the same operation order whatever
// the batch (rows of x) it runs in, so a token's result does not depend on
// how many tokens were batched with it: the property that makes QSPEC's
// verification match token-by-token decoding exactly.
//
// CPU kernels: AVX-512 (VNNI for the integer modes, BF16 dot products for
// W4A16), AVX2, and a portable reference that defines the results; chosen
// at run time from what the CPU supports (TESSERA_QUANT_ISA=reference|avx2|
// avx512 narrows the choice).
//
//   auto q = tessera::quant::quantize(w, {.group_size = 128});
//   at::Tensor y = tessera::quant::linear(x, q, tessera::quant::Mode::kW4A16);
//
// Thread safety: pure functions; thread-safe.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace tessera::quant {

enum class Mode { kFloat, kW4A16, kW4A8, kW4A4 };
const char* mode_name(Mode mode);
Mode parse_mode(const std::string& name);  // "fp", "w4a16", "w4a8", "w4a4"; InvalidArgument

enum class Isa { kReference, kAvx2, kAvx512 };
const char* isa_name(Isa isa);
// The best path this CPU runs (and TESSERA_QUANT_ISA allows).
Isa best_isa();
// Whether this CPU can run `isa` (kReference: always).
bool isa_supported(Isa isa);

struct QuantConfig {
  // Inputs per scale: a positive multiple of 64 dividing K, or 0 to let
  // QuantizedModel::pack choose the largest of 128 and 64 that divides the
  // input width of every layer it packs (SmolLM2-135M's 576 gives 64).
  // Larger groups store fewer scales; smaller ones quantize more finely.
  int64_t group_size = 0;
  bool symmetric = true;
  // Rotate every block of 64 inputs by the normalized 64x64 Hadamard matrix
  // H before quantizing, weights at packing and activations at run time
  // (x W^T = (x H)(W H)^T since H H^T = I), as QuaRot does: an outlier is
  // spread over its block, so both the weight and the activation codes
  // lose less. Costs one fast Walsh-Hadamard transform per activation row.
  bool rotate = false;
};

// `config` with group_size 0 replaced by the largest of 128 and 64 that
// divides every width in `in_features`. InvalidArgument naming the widths
// when none does (int4 packing needs K to be a multiple of 64).
QuantConfig resolve_group_size(const QuantConfig& config, const std::vector<int64_t>& in_features);

// A packed int4 weight [N, K].
struct QuantizedWeight {
  int64_t out_features = 0, in_features = 0;
  QuantConfig config;
  // [N, K / 2] uint8. Within each block of 64 inputs, byte j holds input j
  // in its low nibble and input j + 32 in its high nibble.
  at::Tensor codes;
  at::Tensor scales;  // [N, K / group_size] float
  at::Tensor zeros;   // [N, K / group_size] uint8

  int64_t groups() const { return in_features / config.group_size; }
  int64_t bytes() const;  // codes + scales + zeros
  // The same weight on another device (CUDA inputs need CUDA weights).
  QuantizedWeight to(const at::Device& device) const;
};

// Packs W [N, K] (fp32, bf16, fp16 or fp64). InvalidArgument for a group size
// that is not a positive multiple of 64 or does not divide K, or a weight that
// is not 2-D.
QuantizedWeight quantize(const at::Tensor& weight, const QuantConfig& config);
// The fp32 weight the codes stand for: s * (q - z) (rotated back when the
// weight was packed with `rotate`).
at::Tensor dequantize(const QuantizedWeight& weight);

// x [..., K] with each block of 64 values multiplied by the normalized
// Hadamard matrix (its own inverse), in a fixed order (batch-invariant).
at::Tensor hadamard_rotate(const at::Tensor& x);

// y = x W^T for x [..., K] (any float dtype); y has x's dtype and shape
// [..., N]. kFloat multiplies by the dequantized weight (a reference for
// accuracy, not a fast path). CUDA inputs run kernels/quant on the default
// stream (builds with CUDA kernels; the weight must be on x's device; `isa`
// is ignored there, and results are not batch-invariant).
at::Tensor linear(const at::Tensor& x, const QuantizedWeight& weight, Mode mode,
                  Isa isa = best_isa());

// Per-token, per-group activation quantization as the integer modes do it
// (exposed for tests): x [M, K] fp32 -> codes [M, K] int8, scales [M, K/group]
// float, sums [M, K/group] int32.
struct QuantizedActivations {
  at::Tensor codes, scales, sums;
};
QuantizedActivations quantize_activations(const at::Tensor& x, int64_t group_size, Mode mode);

}  // namespace tessera::quant
