// Argument checks and small helpers shared by the CPU (ops.cpp) and CUDA (ops_cuda.cu) kernels.
#pragma once

#include <ATen/ATen.h>

namespace fastunlearn {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "fastunlearn: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_noise_args(const at::Tensor& student, const at::TensorList targets, const at::Tensor& coeffs,
                      const at::Tensor& weights, int64_t reduction) {
  check_floating(student, "student");
  TORCH_CHECK(student.dim() >= 1 && student.size(0) >= 1 && student.numel() > 0,
              "fastunlearn: student must be (B, ...) with B >= 1 and at least one element");
  const int64_t B = student.size(0), K = static_cast<int64_t>(targets.size());
  TORCH_CHECK(K >= 1 && K <= 4, "fastunlearn: 1 to 4 targets, got ", K);
  for (const auto& t : targets) {
    TORCH_CHECK(t.sizes() == student.sizes() && t.scalar_type() == student.scalar_type() &&
                    t.device() == student.device(),
                "fastunlearn: every target must match student in shape, dtype and device");
  }
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(0) == B && coeffs.size(1) == K && coeffs.scalar_type() == at::kFloat,
              "fastunlearn: coeffs must be (B, K) float32");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == B && weights.scalar_type() == at::kFloat,
              "fastunlearn: weights must be (B,) float32");
  TORCH_CHECK(coeffs.device() == student.device() && weights.device() == student.device(),
              "fastunlearn: coeffs and weights must be on the student's device");
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fastunlearn: reduction must be 0 (none), 1 (mean) or 2 (sum)");
}

inline void check_lpips_args(const at::Tensor& f0, const at::Tensor& f1, const at::Tensor& weight) {
  check_floating(f0, "feature map");
  TORCH_CHECK(f0.dim() == 4 && f0.sizes() == f1.sizes() && f0.scalar_type() == f1.scalar_type() &&
                  f0.device() == f1.device(),
              "fastunlearn: feature maps must be two (B, C, H, W) tensors of one shape, dtype and device");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == f0.size(1) && weight.scalar_type() == at::kFloat &&
                  weight.device() == f0.device(),
              "fastunlearn: lpips weight must be (C,) float32 on the features' device");
}

inline at::Tensor reduce_loss(const at::Tensor& per_sample, int64_t reduction) {
  if (reduction == 1) return per_sample.mean();
  if (reduction == 2) return per_sample.sum();
  return per_sample;
}

}  // namespace fastunlearn
