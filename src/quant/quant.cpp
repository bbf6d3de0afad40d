#include "tessera/quant/quant.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels.h"
#ifdef TESSERA_QUANT_CUDA
#include "quant/w4.h"
#endif
#include "tessera/core/error.h"
#include "tessera/core/tensor.h"

namespace tessera::quant {

const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::kFloat:
      return "fp";
    case Mode::kW4A16:
      return "w4a16";
    case Mode::kW4A8:
      return "w4a8";
    case Mode::kW4A4:
      return "w4a4";
  }
  return "?";
}

Mode parse_mode(const std::string& name) {
  for (Mode m : {Mode::kFloat, Mode::kW4A16, Mode::kW4A8, Mode::kW4A4}) {
    if (name == mode_name(m)) return m;
  }
  TESSERA_THROW(InvalidArgument, "unknown quantization mode '", name,
                "' (expected fp, w4a16, w4a8 or w4a4)");
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kReference:
      return "reference";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "?";
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kReference:
      return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
             __builtin_cpu_supports("avx512bf16");
  }
  return false;
}

Isa best_isa() {
  static const Isa kBest = [] {
    Isa limit = Isa::kAvx512;
    if (const char* env = std::getenv("TESSERA_QUANT_ISA")) {
      const std::string v = env;
      if (v == "reference")
        limit = Isa::kReference;
      else if (v == "avx2")
        limit = Isa::kAvx2;
      else if (v == "avx512" || v.empty())
        limit = Isa::kAvx512;
      else
        TESSERA_THROW(InvalidArgument, "TESSERA_QUANT_ISA='", v,
                      "' (expected reference, avx2 or avx512)");
    }
    for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
      if (static_cast<int>(isa) <= static_cast<int>(limit) && isa_supported(isa)) return isa;
    }
    return Isa::kReference;
  }();
  return kBest;
}

int64_t QuantizedWeight::bytes() const {
  return codes.defined() ? codes.nbytes() + scales.nbytes() + zeros.nbytes() : 0;
}

QuantizedWeight QuantizedWeight::to(const at::Device& device) const {
  QuantizedWeight out = *this;
  out.codes = codes.to(device);
  out.scales = scales.to(device);
  out.zeros = zeros.to(device);
  return out;
}

namespace {

void check_group(int64_t group, int64_t K, const char* what) {
  TESSERA_CHECK(group > 0 && group % 64 == 0, InvalidArgument, what, ": group size ", group,
                " must be a positive multiple of 64");
  TESSERA_CHECK(K % group == 0, InvalidArgument, what, ": group size ", group,
                " does not divide the ", K, " input features");
}

kernels::Packed packed_view(const QuantizedWeight& w) {
  return {w.codes.data_ptr<uint8_t>(),
          w.scales.data_ptr<float>(),
          w.zeros.data_ptr<uint8_t>(),
          w.out_features,
          w.in_features,
          w.config.group_size};
}

// Output features per parallel task: enough work to amortise a task.
int64_t grain_for(int64_t M, int64_t K) {
  return std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, M * K));
}

}  // namespace

namespace {

// Normalized Walsh-Hadamard transform of 64 values, in place.
inline void fwht64(float* v) {
  for (int len = 1; len < 64; len <<= 1) {
    for (int i = 0; i < 64; i += 2 * len) {
      for (int j = i; j < i + len; ++j) {
        const float a = v[j], b = v[j + len];
        v[j] = a + b;
        v[j + len] = a - b;
      }
    }
  }
  for (int k = 0; k < 64; ++k) v[k] *= 0.125f;  // 1 / sqrt(64)
}

}  // namespace

at::Tensor hadamard_rotate(const at::Tensor& x) {
  TESSERA_CHECK(x.dim() >= 1 && x.size(-1) % 64 == 0, InvalidArgument,
                "hadamard_rotate: the last dimension (", x.dim() ? x.size(-1) : 0,
                ") must be a multiple of 64");
  if (x.is_cuda()) {
    // Sylvester's construction, normalized.
    at::Tensor h = at::ones({1, 1}, x.options().dtype(at::kFloat));
    while (h.size(0) < 64) h = at::cat({at::cat({h, h}, 1), at::cat({h, -h}, 1)}, 0);
    at::Tensor blocks = x.to(at::kFloat).reshape({-1, 64});
    return at::matmul(blocks, h * 0.125).view(x.sizes());
  }
  // One fresh fp32 contiguous copy, transformed in place.
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat)).copy_(x);
  float* p = out.data_ptr<float>();
  const int64_t blocks = out.numel() / 64;
  at::parallel_for(0, blocks, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fwht64(p + b * 64);
  });
  return out;
}

QuantizedWeight quantize(const at::Tensor& weight, const QuantConfig& requested) {
  TESSERA_CHECK(weight.defined() && weight.dim() == 2, InvalidArgument,
                "quantize: expected a 2-D weight [out, in], got ",
                weight.defined() ? shape_string(weight.sizes()) : std::string("undefined"));
  TESSERA_CHECK(at::isFloatingType(weight.scalar_type()), InvalidArgument,
                "quantize: expected a floating-point weight, got ",
                dtype_name(weight.scalar_type()));
  const int64_t N = weight.size(0), K = weight.size(1);
  const QuantConfig config = resolve_group_size(requested, {K});
  check_group(config.group_size, K, "quantize");
  const int64_t G = K / config.group_size;
  at::Tensor w = weight.detach().to(at::kCPU, at::kFloat).contiguous();
  if (config.rotate) w = hadamard_rotate(w);
  w = w.view({N, G, config.group_size});
  at::Tensor scale, zero, q;
  if (config.symmetric) {
    at::Tensor amax = w.abs().amax(-1);  // [N, G]
    scale = amax / 7.0;
    at::Tensor inv = at::where(scale > 0, 1.0 / scale, at::zeros_like(scale));
    q = (w * inv.unsqueeze(-1)).round().clamp(-8, 7) + 8;
    zero = at::full({N, G}, 8, at::kByte);
  } else {
    at::Tensor lo = w.amin(-1).clamp_max(0), hi = w.amax(-1).clamp_min(0);
    scale = (hi - lo) / 15.0;
    at::Tensor inv = at::where(scale > 0, 1.0 / scale, at::zeros_like(scale));
    at::Tensor zf = (-lo * inv).round().clamp(0, 15);
    q = ((w * inv.unsqueeze(-1)).round() + zf.unsqueeze(-1)).clamp(0, 15);
    zero = zf.to(at::kByte);
  }
  // Pack: within each 64-input block, byte j = code j | code (j + 32) << 4.
  at::Tensor codes = q.to(at::kByte).view({N, K / 64, 2, 32});
  at::Tensor packed =
      at::bitwise_or(codes.select(2, 0), codes.select(2, 1) * 16).contiguous().view({N, K / 2});
  QuantizedWeight out;
  out.out_features = N;
  out.in_features = K;
  out.config = config;
  out.codes = packed;
  out.scales = scale.to(at::kFloat).contiguous();
  out.zeros = zero.contiguous();
  return out;
}

at::Tensor dequantize(const QuantizedWeight& w) {
  TESSERA_CHECK(w.codes.defined(), InvalidArgument, "dequantize: empty weight");
  const int64_t N = w.out_features, K = w.in_features, G = w.groups();
  at::Tensor packed = w.codes.view({N, K / 64, 1, 32});
  at::Tensor codes = at::cat({at::bitwise_and(packed, 0x0F), packed.div(16, "floor")}, 2)
                         .view({N, G, w.config.group_size});
  at::Tensor full =
      ((codes.to(at::kFloat) - w.zeros.to(at::kFloat).unsqueeze(-1)) * w.scales.unsqueeze(-1))
          .view({N, K});
  return w.config.rotate ? hadamard_rotate(full) : full;
}

QuantConfig resolve_group_size(const QuantConfig& config, const std::vector<int64_t>& in_features) {
  if (config.group_size != 0) return config;
  for (int64_t g : {128, 64}) {
    bool divides = true;
    for (int64_t k : in_features) divides = divides && k % g == 0;
    if (divides) {
      QuantConfig out = config;
      out.group_size = g;
      return out;
    }
  }
  std::string widths;
  for (int64_t k : in_features) widths += (widths.empty() ? "" : ", ") + std::to_string(k);
  TESSERA_THROW(InvalidArgument,
                "int4 packing needs every input width to be a multiple of 64; got ", widths);
}

QuantizedActivations quantize_activations(const at::Tensor& x, int64_t group_size, Mode mode) {
  TESSERA_CHECK(mode == Mode::kW4A8 || mode == Mode::kW4A4, InvalidArgument,
                "quantize_activations: mode must be w4a8 or w4a4, got ", mode_name(mode));
  TESSERA_CHECK(x.dim() == 2, InvalidArgument, "quantize_activations: expected [tokens, in], got ",
                shape_string(x.sizes()));
  const int64_t M = x.size(0), K = x.size(1);
  check_group(group_size, K, "quantize_activations");
  const int64_t G = K / group_size;
  const float qmax = mode == Mode::kW4A8 ? 127.f : 7.f;
  at::Tensor xf = x.to(at::kFloat).contiguous();
  QuantizedActivations out{at::empty({M, K}, at::kChar), at::empty({M, G}, at::kFloat),
                           at::empty({M, G}, at::kInt)};
  const float* src = xf.data_ptr<float>();
  int8_t* codes = out.codes.data_ptr<int8_t>();
  float* scales = out.scales.data_ptr<float>();
  int32_t* sums = out.sums.data_ptr<int32_t>();
  at::parallel_for(0, M * G, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* v = src + i * group_size;  // (m, g) groups are contiguous
      float amax = 0.f;
      for (int64_t k = 0; k < group_size; ++k) amax = std::max(amax, std::fabs(v[k]));
      const float scale = amax / qmax;
      const float inv = amax > 0.f ? qmax / amax : 0.f;
      int32_t sum = 0;
      for (int64_t k = 0; k < group_size; ++k) {
        const float r = std::nearbyint(v[k] * inv);
        const int c = static_cast<int>(std::min(qmax, std::max(-qmax, r)));
        codes[i * group_size + k] = static_cast<int8_t>(c);
        sum += c;
      }
      scales[i] = scale;
      sums[i] = sum;
    }
  });
  return out;
}

namespace {

// The same codes, marked as not rotated (for the kernels, which only see
// codes, scales and zeros).
QuantizedWeight unrotated_view(const QuantizedWeight& w) {
  QuantizedWeight v = w;
  v.config.rotate = false;
  return v;
}

// CUDA inputs: kernels/quant, activations quantized with ATen on the device.
at::Tensor linear_cuda(const at::Tensor& x, const QuantizedWeight& w, Mode mode) {
#ifdef TESSERA_QUANT_CUDA
  const int64_t K = w.in_features, N = w.out_features, group = w.config.group_size;
  at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  cudaError_t err;
  if (mode == Mode::kW4A16) {
    at::Tensor xb = x2.to(at::kBFloat16).contiguous();
    err = ::tessera::kernels::invoke_w4a16_gemm(
        reinterpret_cast<const uint16_t*>(xb.data_ptr()), M, w.codes.data_ptr<uint8_t>(),
        w.scales.data_ptr<float>(), w.zeros.data_ptr<uint8_t>(), N, K, group, out.data_ptr<float>(),
        nullptr);
  } else {
    const double qmax = mode == Mode::kW4A8 ? 127.0 : 7.0;
    at::Tensor xg = x2.to(at::kFloat).view({M, K / group, group});
    at::Tensor amax = xg.abs().amax(-1);
    at::Tensor inv = at::where(amax > 0, qmax / amax, at::zeros_like(amax));
    at::Tensor codes =
        (xg * inv.unsqueeze(-1)).round().clamp(-qmax, qmax).to(at::kChar).contiguous();
    at::Tensor scales = (amax / qmax).contiguous();
    err = ::tessera::kernels::invoke_w4ax_gemm(
        codes.data_ptr<int8_t>(), scales.data_ptr<float>(), M, w.codes.data_ptr<uint8_t>(),
        w.scales.data_ptr<float>(), w.zeros.data_ptr<uint8_t>(), N, K, group, out.data_ptr<float>(),
        nullptr);
  }
  TESSERA_CHECK(err == cudaSuccess, Internal,
                "quant::linear: CUDA kernel failed: ", cudaGetErrorString(err));
  return out;
#else
  (void)w;
  (void)mode;
  TESSERA_THROW(InvalidArgument, "quant::linear: input on ", x.device().str(),
                ", but this build has no CUDA kernels (configure with TESSERA_CUDA=ON)");
#endif
}

}  // namespace

at::Tensor linear(const at::Tensor& x, const QuantizedWeight& w, Mode mode, Isa isa) {
  TESSERA_CHECK(w.codes.defined(), InvalidArgument, "quant::linear: empty weight");
  TESSERA_CHECK(x.dim() >= 1 && x.size(-1) == w.in_features, InvalidArgument,
                "quant::linear: input ", shape_string(x.sizes()), " does not end in the weight's ",
                w.in_features, " input features");
  TESSERA_CHECK(w.codes.device() == x.device(), InvalidArgument, "quant::linear: input on ",
                x.device().str(), ", packed weight on ", w.codes.device().str(),
                " (QuantizedWeight::to moves the weight)");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = w.out_features;
  if (mode == Mode::kFloat) return at::matmul(x, dequantize(w).to(x.scalar_type()).t());
  if (w.config.rotate) {
    // The codes live in the rotated basis: rotate the activations too.
    return linear(hadamard_rotate(x).to(x.scalar_type()), unrotated_view(w), mode, isa);
  }
  if (x.is_cuda()) return linear_cuda(x, w, mode).to(x.scalar_type()).view(out_shape);
  TESSERA_CHECK(x.device().is_cpu(), InvalidArgument, "quant::linear: unsupported device ",
                x.device().str());
  TESSERA_CHECK(isa_supported(isa), InvalidArgument, "quant::linear: this CPU cannot run the ",
                isa_name(isa), " kernels");

  const int64_t K = w.in_features, N = w.out_features;
  at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, N}, at::kFloat);
  if (M == 0) return out.to(x.scalar_type()).view(out_shape);
  const kernels::Packed pw = packed_view(w);
  float* o = out.data_ptr<float>();
  const int64_t grain = grain_for(M, K);
  if (mode == Mode::kW4A16) {
    // Activations in bf16 (the "A16"), also kept as fp32 values for the
    // kernels that multiply in fp32.
    at::Tensor xb = x2.to(at::kBFloat16).contiguous();
    at::Tensor xf;  // only the fp32 kernels read it
    if (isa != Isa::kAvx512) xf = xb.to(at::kFloat).contiguous();
    const auto* xbp = reinterpret_cast<const uint16_t*>(xb.data_ptr());
    const float* xfp = xf.defined() ? xf.data_ptr<float>() : nullptr;
    kernels::W4A16Fn fn = isa == Isa::kAvx512 ? kernels::w4a16_avx512
                          : isa == Isa::kAvx2 ? kernels::w4a16_avx2
                                              : kernels::w4a16_reference;
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { fn(xbp, xfp, M, pw, o, n0, n1); });
  } else {
    QuantizedActivations qa = quantize_activations(x2, w.config.group_size, mode);
    kernels::W4AxFn fn = isa == Isa::kAvx512 ? kernels::w4ax_avx512
                         : isa == Isa::kAvx2 ? kernels::w4ax_avx2
                                             : kernels::w4ax_reference;
    const int8_t* xq = qa.codes.data_ptr<int8_t>();
    const float* xs = qa.scales.data_ptr<float>();
    const int32_t* xsum = qa.sums.data_ptr<int32_t>();
    at::parallel_for(0, N, grain,
                     [&](int64_t n0, int64_t n1) { fn(xq, xs, xsum, M, pw, o, n0, n1); });
  }
  return (x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type())).view(out_shape);
}

}  // namespace tessera::quant
