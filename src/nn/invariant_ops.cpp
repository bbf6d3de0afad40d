#include "invariant_ops.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

#include "tessera/core/error.h"
#include "tessera/core/tensor.h"

namespace tessera::nn::detail {
namespace {

// --- The tiled kernel (invariant_tile.inc), once for each instruction set.
// An Isa supplies the vector type and width, loads (a partial one
// zero-filled beyond the inputs), the fused multiply-add and a fixed-order
// sum of the lanes; the tile loop is the same for all, so the two
// instruction sets differ only in the lane count and their sums' trees.
// AVX-512: 16 lanes, tiles of up to 4 x 4 outputs (32 vector registers),
// the tail through a lane mask, _mm512_reduce_add_ps's fixed tree.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")
namespace avx512 {
struct Isa {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int kRows = 4;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static Mask head_mask(int64_t n) { return static_cast<Mask>((1u << n) - 1u); }
  static V load_head(const float* p, Mask mask) { return _mm512_maskz_loadu_ps(mask, p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#include "invariant_tile.inc"
}  // namespace avx512
#pragma GCC pop_options

// AVX2: 8 lanes, tiles of up to 2 x 4 outputs (16 vector registers), the
// tail through a lane mask, a fixed tree of halvings.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct Isa {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int kLanes = 8;
  static constexpr int kRows = 2;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static Mask head_mask(int64_t n) {
    alignas(32) int32_t lanes[8];
    for (int l = 0; l < 8; ++l) lanes[l] = l < n ? -1 : 0;
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  }
  static V load_head(const float* p, Mask mask) { return _mm256_maskload_ps(p, mask); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#include "invariant_tile.inc"
}  // namespace avx2
#pragma GCC pop_options

// --- Portable: dot_fixed per output.

void linear_generic(const float* x, int64_t M, const float* w, int64_t N, int64_t K, float* out,
                    int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) out[m * N + n] = dot_fixed(x + m * K, w + n * K, K);
  }
}

// --- Dot products and axpy (see invariant_ops.h).

#define TESSERA_AVX512 __attribute__((target("avx512f,avx512dq,fma")))

// The AVX-512 tile of one row and one output: the chain linear_fixed runs
// for each of its outputs.
TESSERA_AVX512 float dot_avx512(const float* a, const float* b, int64_t n) {
  float out;
  avx512::tile<1, 1>(a, b, n, &out, 0, 0, 0);
  return out;
}

float dot_generic(const float* a, const float* b, int64_t n) {
  float s[16] = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    for (int l = 0; l < 16; ++l) s[l] += a[k + l] * b[k + l];
  }
  for (int l = 0; k + l < n; ++l) s[l] += a[k + l] * b[k + l];
  for (int width = 8; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) s[l] += s[l + width];
  }
  return s[0];
}

TESSERA_AVX512 void axpy_avx512(float p, const float* v, float* out, int64_t n) {
  const __m512 pv = _mm512_set1_ps(p);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_loadu_ps(out + i),
                                            _mm512_mul_ps(pv, _mm512_loadu_ps(v + i))));
  }
  for (; i < n; ++i) out[i] += p * v[i];
}

void axpy_generic(float p, const float* v, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += p * v[i];
}

bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

}  // namespace

std::vector<NamedLinearKernel> linear_kernels() {
  std::vector<NamedLinearKernel> out;
  if (has_avx512()) out.push_back({"avx512", avx512::linear});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    out.push_back({"avx2", avx2::linear});
  }
  out.push_back({"generic", linear_generic});
  return out;
}

const DotFn dot_fixed_kernel = has_avx512() ? dot_avx512 : dot_generic;
const AxpyFn axpy_kernel = has_avx512() ? axpy_avx512 : axpy_generic;

at::Tensor linear_fixed(const at::Tensor& x, const at::Tensor& w) {
  TESSERA_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), InvalidArgument,
                "batch-invariant linear: fp32 CPU inputs only, got ", dtype_name(x.scalar_type()),
                " on ", x.device().str());
  TESSERA_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), InvalidArgument,
                "batch-invariant linear: input ", shape_string(x.sizes()), " and weight ",
                shape_string(w.sizes()), " do not match");
  static const LinearKernel kernel = linear_kernels().front().fn;
  const int64_t K = w.size(1), N = w.size(0);
  at::Tensor xc = x.reshape({-1, K}).contiguous();
  at::Tensor wc = w.scalar_type() == at::kFloat ? w.contiguous() : w.to(at::kFloat).contiguous();
  const int64_t M = xc.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  if (M == 0 || N == 0) return out;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Outputs per task: about 2^16 multiply-adds, in multiples of the tile width.
  const int64_t grain =
      std::max<int64_t>(4, ((int64_t{1} << 16) / std::max<int64_t>(1, M * K) + 3) / 4 * 4);
  if (N <= grain) {
    kernel(xp, M, wp, N, K, op, 0, N);
  } else {
    at::parallel_for(0, (N + 3) / 4, grain / 4, [&](int64_t b0, int64_t b1) {
      kernel(xp, M, wp, N, K, op, b0 * 4, std::min(N, b1 * 4));
    });
  }
  return out;
}

void rms_norm_rows(const float* x, const float* w, float* out, int64_t rows, int64_t H, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* v = x + r * H;
    const float ss = dot_fixed(v, v, H);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
    float* o = out + r * H;
    for (int64_t i = 0; i < H; ++i) o[i] = v[i] * inv * w[i];
  }
}

void rope_rows(float* x, int64_t rows, int64_t heads, int64_t hd, const int64_t* positions,
               const float* cos_table, const float* sin_table) {
  const int64_t half = hd / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos_table + positions[r] * hd;
    const float* s = sin_table + positions[r] * hd;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (r * heads + h) * hd;
      // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        const float lo = a * c[i] + (-b) * s[i];
        const float hi = b * c[i + half] + a * s[i + half];
        v[i] = lo;
        v[i + half] = hi;
      }
    }
  }
}

void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.f + std::exp(-g)) * up[i];
  }
}

}  // namespace tessera::nn::detail
