// CUDA entry points of the coordinatewise LSTM step (lstm_step_cuda.cu). Same math, phi layout and
// [S, N] state layout as lstm_step.h. All pointers are device pointers; work is queued on `stream`
// (cudaStream_t passed as void* so that this header needs no CUDA include). Returns nullptr on
// success, else a static message (launch failure, bad config).
#pragma once

#include <cstdint>

#include "lstm_step.h"

namespace l2l {

enum class GpuMath : int32_t {
  kFP32 = 0,  // FP32 arithmetic and accurate transcendentals: matches the CPU kernels to ~1e-6.
  kTF32 = 1,  // gate products on the tensor cores (TF32 mma), fast path; documented tolerance.
};

const char* lstm_step_forward_cuda(const StepConfig& cfg, GpuMath math, const float* phi,
                                   const float* grad, const float* state, float scale, int64_t n,
                                   float* update, float* new_state, void* stream);

// d_new_state may be nullptr. d_phi (num_params floats) is OVERWRITTEN (the kernel zeroes it first).
const char* lstm_step_backward_cuda(const StepConfig& cfg, const float* phi, const float* grad,
                                    const float* state, float scale, int64_t n,
                                    const float* d_update, const float* d_new_state, float* d_phi,
                                    float* d_grad, float* d_state, void* stream);

// dst[i] += src[i] for i < n (the multi-tensor op sums its tensors' d_phi with it).
const char* add_inplace_cuda(float* dst, const float* src, int64_t n, void* stream);

}  // namespace l2l
