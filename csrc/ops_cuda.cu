// CUDA kernels for the fastunlearn ops (schemas and the CPU kernels are in ops.cpp; this file
// only adds the CUDA implementations, so it is loaded after ops.cpp).
//
// noise_loss_fwd: grid (chunks, B); each block reads kNoiseChunk elements of one sample from
// the student and the K targets, writes the scaled gradient and one fp32 partial sum.
// lpips_layer_fwd: grid (position blocks, B); one thread per spatial position walks the
// channels (coalesced: neighbouring threads read neighbouring positions of one channel).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"

namespace fastunlearn {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kNoiseChunk = 4096;
constexpr int kLpipsThreads = 128;

template <typename scalar_t>
struct TargetPtrs {
  const scalar_t* t[4];
};

__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = threadIdx.x < n_warps ? shared[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;  // valid in thread 0
}

template <typename scalar_t, int K, bool NEED_GRAD>
__global__ void noise_loss_kernel(const scalar_t* __restrict__ s, TargetPtrs<scalar_t> tp,
                                  const float* __restrict__ coeffs, const float* __restrict__ weights,
                                  scalar_t* __restrict__ grad, float* __restrict__ partial, int64_t D,
                                  int64_t n_chunks, float grad_scale) {
  __shared__ float shared[32];
  const int64_t chunk = blockIdx.x, b = blockIdx.y;
  const int64_t begin = chunk * kNoiseChunk;
  const int64_t end = min(D, begin + kNoiseChunk);
  const int64_t base = b * D;
  const float c0 = coeffs[b * K];
  const float c1 = K > 1 ? coeffs[b * K + 1] : 0.f;
  const float c2 = K > 2 ? coeffs[b * K + 2] : 0.f;
  const float c3 = K > 3 ? coeffs[b * K + 3] : 0.f;
  const float gs = NEED_GRAD ? grad_scale * weights[b] : 0.f;
  float acc = 0.f;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t i = base + j;
    float y = c0 * static_cast<float>(tp.t[0][i]);
    if (K > 1) y += c1 * static_cast<float>(tp.t[1][i]);
    if (K > 2) y += c2 * static_cast<float>(tp.t[2][i]);
    if (K > 3) y += c3 * static_cast<float>(tp.t[3][i]);
    const float d = static_cast<float>(s[i]) - y;
    acc += d * d;
    if (NEED_GRAD) grad[i] = static_cast<scalar_t>(gs * d);
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partial[b * n_chunks + chunk] = acc;
}

template <typename scalar_t, bool NEED_GRAD>
__global__ void lpips_layer_kernel(const scalar_t* __restrict__ f0, const scalar_t* __restrict__ f1,
                                   const float* __restrict__ w, scalar_t* __restrict__ g0,
                                   scalar_t* __restrict__ g1, float* __restrict__ partial, int64_t C,
                                   int64_t HW, float grad_scale) {
  __shared__ float shared[32];
  const int64_t b = blockIdx.y;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = p < HW;
  const int64_t base = b * C * HW + (active ? p : 0);
  float dist = 0.f;
  if (active) {
    float ss0 = 0.f, ss1 = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      const float u = static_cast<float>(f0[base + c * HW]), v = static_cast<float>(f1[base + c * HW]);
      ss0 += u * u;
      ss1 += v * v;
    }
    const float r0 = sqrtf(ss0), r1 = sqrtf(ss1);
    const float a0 = 1.f / (r0 + 1e-10f), a1 = 1.f / (r1 + 1e-10f);
    float p0 = 0.f, p1 = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      const float n0 = static_cast<float>(f0[base + c * HW]) * a0;
      const float n1 = static_cast<float>(f1[base + c * HW]) * a1;
      const float d = n0 - n1, wd = w[c] * d;
      dist += wd * d;
      if (NEED_GRAD) {
        p0 += wd * n0;
        p1 += wd * n1;
      }
    }
    if (NEED_GRAD) {
      // dd/df0 = a0 (g - f0 * 2 p0 / r0), dd/df1 = a1 (f1 * 2 p1 / r1 - g), g = 2 w (n0 - n1).
      const float k0 = r0 > 0.f ? 2.f * p0 / r0 : 0.f, k1 = r1 > 0.f ? 2.f * p1 / r1 : 0.f;
      const float s0 = a0 * grad_scale, s1 = a1 * grad_scale;
      for (int64_t c = 0; c < C; ++c) {
        const float u = static_cast<float>(f0[base + c * HW]), v = static_cast<float>(f1[base + c * HW]);
        const float g = 2.f * w[c] * (u * a0 - v * a1);
        g0[base + c * HW] = static_cast<scalar_t>(s0 * (g - u * k0));
        g1[base + c * HW] = static_cast<scalar_t>(s1 * (v * k1 - g));
      }
    }
  }
  dist = block_sum(dist, shared);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = dist;
}

template <typename scalar_t, int K>
void launch_noise(const at::Tensor& s, const std::vector<at::Tensor>& ts, const at::Tensor& coeffs,
                  const at::Tensor& weights, at::Tensor& grad, at::Tensor& partial, bool need_grad,
                  float grad_scale) {
  const int64_t B = s.size(0), D = s.numel() / B, n_chunks = partial.size(1);
  TargetPtrs<scalar_t> tp;
  for (int k = 0; k < 4; ++k) tp.t[k] = ts[k < K ? k : 0].const_data_ptr<scalar_t>();
  const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>(B));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (need_grad) {
    noise_loss_kernel<scalar_t, K, true><<<grid, kThreads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), tp, coeffs.const_data_ptr<float>(), weights.const_data_ptr<float>(),
        grad.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<float>(), D, n_chunks, grad_scale);
  } else {
    noise_loss_kernel<scalar_t, K, false><<<grid, kThreads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), tp, coeffs.const_data_ptr<float>(), weights.const_data_ptr<float>(),
        nullptr, partial.mutable_data_ptr<float>(), D, n_chunks, grad_scale);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> noise_loss_fwd_cuda(const at::Tensor& student, at::TensorList targets,
                                                       const at::Tensor& coeffs, const at::Tensor& weights,
                                                       int64_t reduction, bool need_grad) {
  check_noise_args(student, targets, coeffs, weights, reduction);
  TORCH_CHECK(student.is_cuda(), "fastunlearn: noise_loss_fwd CUDA kernel got a ", student.device(), " tensor");
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous();
  std::vector<at::Tensor> ts;
  for (const auto& t : targets) ts.push_back(t.contiguous());
  const at::Tensor c = coeffs.contiguous(), w = weights.contiguous();
  const int64_t B = s.size(0), D = s.numel() / B, K = static_cast<int64_t>(ts.size());
  TORCH_CHECK(B <= 65535, "fastunlearn: noise_loss_fwd CUDA kernel supports batch <= 65535, got ", B);
  const int64_t n_chunks = (D + kNoiseChunk - 1) / kNoiseChunk;
  at::Tensor partial = at::empty({B, n_chunks}, s.options().dtype(at::kFloat));
  at::Tensor grad = need_grad ? at::empty_like(s, at::MemoryFormat::Contiguous) : at::empty({0}, s.options());
  const float grad_scale = static_cast<float>(2.0 / static_cast<double>(D) / (reduction == 1 ? B : 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "noise_loss_fwd_cuda", [&] {
    switch (K) {
      case 1: launch_noise<scalar_t, 1>(s, ts, c, w, grad, partial, need_grad, grad_scale); break;
      case 2: launch_noise<scalar_t, 2>(s, ts, c, w, grad, partial, need_grad, grad_scale); break;
      case 3: launch_noise<scalar_t, 3>(s, ts, c, w, grad, partial, need_grad, grad_scale); break;
      default: launch_noise<scalar_t, 4>(s, ts, c, w, grad, partial, need_grad, grad_scale); break;
    }
  });
  at::Tensor per_sample = partial.sum(1) * w / static_cast<double>(D);
  return {reduce_loss(per_sample, reduction), grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lpips_layer_fwd_cuda(const at::Tensor& feat0, const at::Tensor& feat1,
                                                                    const at::Tensor& weight, bool need_grad) {
  check_lpips_args(feat0, feat1, weight);
  TORCH_CHECK(feat0.is_cuda(), "fastunlearn: lpips_layer_fwd CUDA kernel got a ", feat0.device(), " tensor");
  const c10::cuda::CUDAGuard guard(feat0.device());
  const at::Tensor f0 = feat0.contiguous(), f1 = feat1.contiguous(), w = weight.contiguous();
  const int64_t B = f0.size(0), C = f0.size(1), HW = f0.size(2) * f0.size(3);
  TORCH_CHECK(B <= 65535, "fastunlearn: lpips_layer_fwd CUDA kernel supports batch <= 65535, got ", B);
  at::Tensor g0 = need_grad ? at::empty_like(f0, at::MemoryFormat::Contiguous) : at::empty({0}, f0.options());
  at::Tensor g1 = need_grad ? at::empty_like(f1, at::MemoryFormat::Contiguous) : at::empty({0}, f1.options());
  if (HW == 0 || C == 0 || B == 0) {
    if (need_grad) { g0.zero_(); g1.zero_(); }
    return {at::zeros({B}, f0.options().dtype(at::kFloat)), g0, g1};
  }
  const int64_t n_blocks = (HW + kLpipsThreads - 1) / kLpipsThreads;
  at::Tensor partial = at::empty({B, n_blocks}, f0.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(n_blocks), static_cast<unsigned>(B));
  const float grad_scale = static_cast<float>(1.0 / static_cast<double>(HW));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "lpips_layer_fwd_cuda", [&] {
    if (need_grad) {
      lpips_layer_kernel<scalar_t, true><<<grid, kLpipsThreads, 0, stream>>>(
          f0.const_data_ptr<scalar_t>(), f1.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
          g0.mutable_data_ptr<scalar_t>(), g1.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<float>(),
          C, HW, grad_scale);
    } else {
      lpips_layer_kernel<scalar_t, false><<<grid, kLpipsThreads, 0, stream>>>(
          f0.const_data_ptr<scalar_t>(), f1.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(), nullptr,
          nullptr, partial.mutable_data_ptr<float>(), C, HW, grad_scale);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {partial.sum(1) / static_cast<double>(HW), g0, g1};
}

TORCH_LIBRARY_IMPL(fastunlearn, CUDA, m) {
  m.impl("noise_loss_fwd", &noise_loss_fwd_cuda);
  m.impl("lpips_layer_fwd", &lpips_layer_fwd_cuda);
}

}  // namespace fastunlearn
