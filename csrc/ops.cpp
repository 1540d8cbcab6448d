// fastunlearn C++ ops: schemas (TORCH_LIBRARY) and the CPU kernels.
//
//   fastunlearn::noise_loss_fwd(student, targets[K<=4], coeffs (B,K) f32, weights (B,) f32,
//                               reduction 0=none 1=mean 2=sum, need_grad) -> (loss, grad)
//   fastunlearn::lpips_layer_fwd(f0, f1 (B,C,H,W), weight (C,) f32, need_grad)
//                               -> (dist (B,) f32, grad_f0, grad_f1)
//
// Both compute the gradient in the forward pass (Liger style); autograd, fake kernels and the
// dispatch live in fastunlearn/_ext.py. Inputs fp32/fp16/bf16, accumulation fp32 within short
// runs and fp64 across them, gradients in the input dtype. When need_grad is false the grad
// outputs are empty (0,) tensors. The CUDA kernels are in ops_cuda.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastunlearn {

namespace {

// Elements per CPU task: big enough to amortise scheduling, small enough that batch 1 of a
// 4x64x64 latent still splits over several threads.
constexpr int64_t kNoiseChunk = 8192;
// Inner run accumulated in fp32 (vectorised) before it is added to the fp64 total.
constexpr int64_t kRun = 512;
// Spatial positions per LPIPS task (at most); the inner loops run over these contiguous positions.
// The tile is sized so that both maps' tile (P x C) stays in L2 for the second pass over channels.
constexpr int64_t kTile = 256;

int64_t lpips_tile_size(int64_t C, int64_t HW) {
  int64_t p = std::max<int64_t>(16, std::min<int64_t>(kTile, (32768 / std::max<int64_t>(C, 1)) / 16 * 16));
  return std::min(p, HW);
}

template <typename T>
inline float tof(T v) { return static_cast<float>(v); }

// The inner loops are compiled twice on x86-64 with GCC: for AVX2+FMA (chosen at load time on
// CPUs that have it) and for the baseline ISA, so the build stays portable.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define FU_CLONES
#endif
#define FU_INLINE inline __attribute__((always_inline))

template <typename scalar_t, int K>
FU_INLINE double noise_chunk(const scalar_t* __restrict s, const scalar_t* const* t, const float* c,
                   scalar_t* __restrict g, float gscale, int64_t n) {
  const scalar_t* __restrict t0 = t[0];
  const scalar_t* __restrict t1 = t[K > 1 ? 1 : 0];
  const scalar_t* __restrict t2 = t[K > 2 ? 2 : 0];
  const scalar_t* __restrict t3 = t[K > 3 ? 3 : 0];
  const float c0 = c[0], c1 = K > 1 ? c[1] : 0.f, c2 = K > 2 ? c[2] : 0.f, c3 = K > 3 ? c[3] : 0.f;
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kRun) {
    const int64_t i1 = std::min(n, i0 + kRun);
    float acc = 0.f;
    if (g != nullptr) {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = i0; i < i1; ++i) {
        float y = c0 * tof(t0[i]);
        if (K > 1) y += c1 * tof(t1[i]);
        if (K > 2) y += c2 * tof(t2[i]);
        if (K > 3) y += c3 * tof(t3[i]);
        const float d = tof(s[i]) - y;
        acc += d * d;
        g[i] = static_cast<scalar_t>(gscale * d);
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = i0; i < i1; ++i) {
        float y = c0 * tof(t0[i]);
        if (K > 1) y += c1 * tof(t1[i]);
        if (K > 2) y += c2 * tof(t2[i]);
        if (K > 3) y += c3 * tof(t3[i]);
        const float d = tof(s[i]) - y;
        acc += d * d;
      }
    }
    total += acc;
  }
  return total;
}

#define FU_NOISE_CLONE(T, NAME)                                                                             \
  FU_CLONES double NAME(const T* s, const T* const* t, const float* c, T* g, float gscale, int64_t n, int64_t K) { \
    switch (K) {                                                                                              \
      case 1: return noise_chunk<T, 1>(s, t, c, g, gscale, n);                                                \
      case 2: return noise_chunk<T, 2>(s, t, c, g, gscale, n);                                                \
      case 3: return noise_chunk<T, 3>(s, t, c, g, gscale, n);                                                \
      default: return noise_chunk<T, 4>(s, t, c, g, gscale, n);                                               \
    }                                                                                                         \
  }
FU_NOISE_CLONE(float, noise_chunk_f32)
FU_NOISE_CLONE(c10::Half, noise_chunk_f16)
FU_NOISE_CLONE(c10::BFloat16, noise_chunk_bf16)

inline double noise_chunk_any(const float* s, const float* const* t, const float* c, float* g, float gs, int64_t n,
                              int64_t K) { return noise_chunk_f32(s, t, c, g, gs, n, K); }
inline double noise_chunk_any(const c10::Half* s, const c10::Half* const* t, const float* c, c10::Half* g, float gs,
                              int64_t n, int64_t K) { return noise_chunk_f16(s, t, c, g, gs, n, K); }
inline double noise_chunk_any(const c10::BFloat16* s, const c10::BFloat16* const* t, const float* c, c10::BFloat16* g,
                              float gs, int64_t n, int64_t K) { return noise_chunk_bf16(s, t, c, g, gs, n, K); }

// float64 never reaches the kernels (check_floating), but AT_DISPATCH instantiates it.
inline double noise_chunk_any(const double* s, const double* const* t, const float* c, double* g, float gs, int64_t n,
                              int64_t K) { TORCH_CHECK(false, "fastunlearn: float64 is not supported"); return 0.0; }

template <typename scalar_t>
void noise_loss_cpu_impl(const at::Tensor& s, const std::vector<at::Tensor>& ts, const at::Tensor& coeffs,
                         const at::Tensor& weights, bool need_grad, double grad_scale, at::Tensor& grad,
                         std::vector<double>& sumsq) {
  const int64_t B = s.size(0), D = s.numel() / B, K = static_cast<int64_t>(ts.size());
  const int64_t n_chunks = (D + kNoiseChunk - 1) / kNoiseChunk;
  std::vector<double> partial(B * n_chunks, 0.0);
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const float* cp = coeffs.const_data_ptr<float>();
  const float* wp = weights.const_data_ptr<float>();
  scalar_t* gp = need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  std::vector<const scalar_t*> tp;
  for (const auto& t : ts) tp.push_back(t.const_data_ptr<scalar_t>());
  at::parallel_for(0, B * n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_chunks, chunk = task % n_chunks;
      const int64_t off = b * D + chunk * kNoiseChunk;
      const int64_t n = std::min(kNoiseChunk, D - chunk * kNoiseChunk);
      const scalar_t* tk[4];
      for (int64_t k = 0; k < K; ++k) tk[k] = tp[k] + off;
      const float* ck = cp + b * K;
      const float gscale = static_cast<float>(grad_scale * 2.0 * wp[b] / static_cast<double>(D));
      scalar_t* g = gp ? gp + off : nullptr;
      partial[task] = noise_chunk_any(sp + off, tk, ck, g, gscale, n, K);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    double acc = 0.0;
    for (int64_t c = 0; c < n_chunks; ++c) acc += partial[b * n_chunks + c];
    sumsq[b] = acc;
  }
}

template <typename scalar_t>
FU_INLINE double lpips_tile(const scalar_t* __restrict f0, const scalar_t* __restrict f1, const float* __restrict w,
                  scalar_t* __restrict g0, scalar_t* __restrict g1, int64_t C, int64_t HW, int64_t P,
                  float gscale) {
  float ss0[kTile] = {0}, ss1[kTile] = {0}, a0[kTile], a1[kTile];
  float dist[kTile] = {0}, p0[kTile] = {0}, p1[kTile] = {0};
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* __restrict x0 = f0 + c * HW;
    const scalar_t* __restrict x1 = f1 + c * HW;
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) {
      const float u = tof(x0[p]), v = tof(x1[p]);
      ss0[p] += u * u;
      ss1[p] += v * v;
    }
  }
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) {
    a0[p] = 1.f / (std::sqrt(ss0[p]) + 1e-10f);
    a1[p] = 1.f / (std::sqrt(ss1[p]) + 1e-10f);
  }
  const bool need_grad = g0 != nullptr;
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* __restrict x0 = f0 + c * HW;
    const scalar_t* __restrict x1 = f1 + c * HW;
    const float wc = w[c];
    if (need_grad) {
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const float n0 = tof(x0[p]) * a0[p], n1 = tof(x1[p]) * a1[p];
        const float d = n0 - n1, wd = wc * d;
        dist[p] += wd * d;
        p0[p] += wd * n0;
        p1[p] += wd * n1;
      }
    } else {
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const float d = tof(x0[p]) * a0[p] - tof(x1[p]) * a1[p];
        dist[p] += wc * d * d;
      }
    }
  }
  double total = 0.0;
  for (int64_t p = 0; p < P; ++p) total += dist[p];
  if (!need_grad) return total;

  // dd/df0 = a0 (g - f0 * 2 p0 / r0), dd/df1 = a1 (f1 * 2 p1 / r1 - g), g = 2 w (n0 - n1);
  // an all-zero feature vector (r = 0) gets the first term only.
  float k0[kTile], k1[kTile], s0[kTile], s1[kTile];
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) {
    const float r0 = std::sqrt(ss0[p]), r1 = std::sqrt(ss1[p]);
    k0[p] = r0 > 0.f ? 2.f * p0[p] / r0 : 0.f;
    k1[p] = r1 > 0.f ? 2.f * p1[p] / r1 : 0.f;
    s0[p] = a0[p] * gscale;
    s1[p] = a1[p] * gscale;
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* __restrict x0 = f0 + c * HW;
    const scalar_t* __restrict x1 = f1 + c * HW;
    scalar_t* __restrict y0 = g0 + c * HW;
    scalar_t* __restrict y1 = g1 + c * HW;
    const float w2 = 2.f * w[c];
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) {
      const float u = tof(x0[p]), v = tof(x1[p]);
      const float g = w2 * (u * a0[p] - v * a1[p]);
      y0[p] = static_cast<scalar_t>(s0[p] * (g - u * k0[p]));
      y1[p] = static_cast<scalar_t>(s1[p] * (v * k1[p] - g));
    }
  }
  return total;
}

#define FU_LPIPS_CLONE(T, NAME)                                                                     \
  FU_CLONES double NAME(const T* f0, const T* f1, const float* w, T* g0, T* g1, int64_t C, int64_t HW, \
                        int64_t P, float gscale) {                                                    \
    return lpips_tile<T>(f0, f1, w, g0, g1, C, HW, P, gscale);                                       \
  }                                                                                                   \
  inline double lpips_tile_any(const T* f0, const T* f1, const float* w, T* g0, T* g1, int64_t C,    \
                               int64_t HW, int64_t P, float gscale) {                                \
    return NAME(f0, f1, w, g0, g1, C, HW, P, gscale);                                                \
  }
FU_LPIPS_CLONE(float, lpips_tile_f32)
FU_LPIPS_CLONE(c10::Half, lpips_tile_f16)
FU_LPIPS_CLONE(c10::BFloat16, lpips_tile_bf16)
inline double lpips_tile_any(const double*, const double*, const float*, double*, double*, int64_t, int64_t, int64_t,
                             float) { TORCH_CHECK(false, "fastunlearn: float64 is not supported"); return 0.0; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> noise_loss_fwd_cpu(const at::Tensor& student, at::TensorList targets,
                                                      const at::Tensor& coeffs, const at::Tensor& weights,
                                                      int64_t reduction, bool need_grad) {
  check_noise_args(student, targets, coeffs, weights, reduction);
  TORCH_CHECK(student.device().is_cpu(), "fastunlearn: noise_loss_fwd CPU kernel got a ", student.device(), " tensor");
  const at::Tensor s = student.contiguous();
  std::vector<at::Tensor> ts;
  for (const auto& t : targets) ts.push_back(t.contiguous());
  const at::Tensor c = coeffs.contiguous(), w = weights.contiguous();
  const int64_t B = s.size(0), D = s.numel() / B;
  at::Tensor grad = need_grad ? at::empty_like(s, at::MemoryFormat::Contiguous) : at::empty({0}, s.options());
  std::vector<double> sumsq(B);
  const double grad_scale = reduction == 1 ? 1.0 / static_cast<double>(B) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "noise_loss_fwd_cpu", [&] {
    noise_loss_cpu_impl<scalar_t>(s, ts, c, w, need_grad, grad_scale, grad, sumsq);
  });
  at::Tensor per_sample = at::empty({B}, s.options().dtype(at::kFloat));
  float* out = per_sample.mutable_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) out[b] = static_cast<float>(wp[b] * sumsq[b] / static_cast<double>(D));
  return {reduce_loss(per_sample, reduction), grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lpips_layer_fwd_cpu(const at::Tensor& feat0, const at::Tensor& feat1,
                                                                   const at::Tensor& weight, bool need_grad) {
  check_lpips_args(feat0, feat1, weight);
  TORCH_CHECK(feat0.device().is_cpu(), "fastunlearn: lpips_layer_fwd CPU kernel got a ", feat0.device(), " tensor");
  const at::Tensor f0 = feat0.contiguous(), f1 = feat1.contiguous(), w = weight.contiguous();
  const int64_t B = f0.size(0), C = f0.size(1), HW = f0.size(2) * f0.size(3);
  at::Tensor g0 = need_grad ? at::empty_like(f0, at::MemoryFormat::Contiguous) : at::empty({0}, f0.options());
  at::Tensor g1 = need_grad ? at::empty_like(f1, at::MemoryFormat::Contiguous) : at::empty({0}, f1.options());
  at::Tensor dist = at::empty({B}, f0.options().dtype(at::kFloat));
  if (HW == 0 || C == 0) {
    dist.zero_();
    if (need_grad) { g0.zero_(); g1.zero_(); }
    return {dist, g0, g1};
  }
  const int64_t tile_p = lpips_tile_size(C, HW);
  const int64_t n_tiles = (HW + tile_p - 1) / tile_p;
  std::vector<double> partial(B * n_tiles, 0.0);
  const float gscale = static_cast<float>(1.0 / static_cast<double>(HW));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "lpips_layer_fwd_cpu", [&] {
    const scalar_t* p0 = f0.const_data_ptr<scalar_t>();
    const scalar_t* p1 = f1.const_data_ptr<scalar_t>();
    scalar_t* q0 = need_grad ? g0.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* q1 = need_grad ? g1.mutable_data_ptr<scalar_t>() : nullptr;
    const float* wp = w.const_data_ptr<float>();
    at::parallel_for(0, B * n_tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / n_tiles, tile = task % n_tiles;
        const int64_t off = b * C * HW + tile * tile_p;
        const int64_t P = std::min(tile_p, HW - tile * tile_p);
        partial[task] = lpips_tile_any(p0 + off, p1 + off, wp, q0 ? q0 + off : nullptr,
                                             q1 ? q1 + off : nullptr, C, HW, P, gscale);
      }
    });
  });
  float* out = dist.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    double acc = 0.0;
    for (int64_t t = 0; t < n_tiles; ++t) acc += partial[b * n_tiles + t];
    out[b] = static_cast<float>(acc / static_cast<double>(HW));
  }
  return {dist, g0, g1};
}

TORCH_LIBRARY(fastunlearn, m) {
  m.def("noise_loss_fwd(Tensor student, Tensor[] targets, Tensor coeffs, Tensor weights, int reduction, "
        "bool need_grad) -> (Tensor, Tensor)");
  m.def("lpips_layer_fwd(Tensor f0, Tensor f1, Tensor weight, bool need_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastunlearn, CPU, m) {
  m.impl("noise_loss_fwd", &noise_loss_fwd_cpu);
  m.impl("lpips_layer_fwd", &lpips_layer_fwd_cpu);
}

}  // namespace fastunlearn

