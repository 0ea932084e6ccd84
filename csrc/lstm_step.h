// The coordinatewise LSTM optimizer step: the framework-free contract shared by the CPU kernels
// (lstm_step_cpu.cc), the CUDA kernels (lstm_step_cuda.cu), the TensorFlow op (tf_op.cc) and the
// pybind11 module (pybind_module.cc). No TensorFlow, no pybind11 in here.
//
// Per coordinate i (every coordinate independent; phi shared):
//   x      = preprocess(grad[i])                                   (D = 1 for kNone, else 2)
//   z1     = W1 [x; h1] + b1        W1: [4*H1, D+H1] row-major      gate order i, f, g, o
//   c1'    = sigmoid(f1) * c1 + sigmoid(i1) * tanh(g1);  h1' = sigmoid(o1) * tanh(c1')
//   z2     = W2 [h1'; h2] + b2      W2: [4*H2, H1+H2] row-major
//   c2', h2' likewise
//   update = scale * (wo . h2' + bo)
// phi is one flat float32 vector: W1 | b1 | W2 | b2 | wo (H2) | bo (1). The forget bias of 1 lives in
// the initial value of b1/b2 (set by the library), not in the kernels.
// State is one float32 [S, N] array, S = 2*(H1+H2), rows h1 | c1 | h2 | c2, coordinates contiguous
// (row stride N), so that a warp / a SIMD lane group reading consecutive coordinates is coalesced.
//
// Preprocessing (Andrychowicz et al. 2016, Appendix A, and the authors' release):
//   kNone:    x = (g)
//   kPaper:   |g| >= exp(-p) ? (log|g| / p, sign g) : (-1, exp(p) * g)
//   kClamped: (max(log(|g| + FLT_EPSILON) / k, -1), clamp(g * exp(k), -1, 1))
// Derivatives of the preprocessing w.r.t. g (for d_grad): kPaper (1 / (p g), 0) | (0, exp(p));
// kClamped: first feature sign(g) / (k (|g| + eps)) where log(|g|+eps)/k > -1 else 0, second feature
// exp(k) where |g exp(k)| < 1 else 0.
// p (kPaper) and k (kClamped) must lie in [kPreprocessParamMin, kPreprocessParamMax] = [0.001, 80]: exp(p) and
// exp(-p) are then normal float32 numbers (exp(88.8) overflows float32) and log|g| / p is finite.
//
// Non-finite gradients (every mode, every kernel, and the pure-TF and NumPy references alike):
//   +inf / -inf act as +FLT_MAX / -FLT_MAX, the largest finite gradient of that sign: g is clamped to
//     [-FLT_MAX, FLT_MAX] before the preprocessing, so the update and new state of a +inf coordinate are exactly
//     those of +FLT_MAX (the sign is kept; every finite g is unchanged). d_grad at +-inf is 0 (the clamp is flat
//     beyond +-FLT_MAX), and d_phi / d_state there are those of +-FLT_MAX: all finite.
//   NaN propagates: a NaN gradient gives a NaN update and NaN new state for its coordinate (and NaN d_grad, d_state
//     and, through the sum over coordinates, d_phi in the backward); other coordinates are unaffected by it in the
//     forward. The kernels' min/max keep NaN (no fmaxf-style NaN dropping).
#pragma once

#include <cstdint>

namespace l2l {

enum class Preprocess : int32_t { kNone = 0, kPaper = 1, kClamped = 2 };

// The accepted preprocess_param for kPaper and kClamped (validate_config; l2l_tf/ops/config.py has the same range).
constexpr float kPreprocessParamMin = 1e-3f;
constexpr float kPreprocessParamMax = 80.0f;

struct StepConfig {
  int32_t hidden1 = 20;
  int32_t hidden2 = 20;
  Preprocess preprocess = Preprocess::kNone;
  float preprocess_param = 10.0f;  // p for kPaper, k for kClamped; unused for kNone

  int32_t input_size() const { return preprocess == Preprocess::kNone ? 1 : 2; }
  int64_t state_rows() const { return 2 * (int64_t(hidden1) + hidden2); }
  // Offsets into phi, in floats.
  int64_t w1_offset() const { return 0; }
  int64_t b1_offset() const { return w1_offset() + 4LL * hidden1 * (input_size() + hidden1); }
  int64_t w2_offset() const { return b1_offset() + 4LL * hidden1; }
  int64_t b2_offset() const { return w2_offset() + 4LL * hidden2 * (hidden1 + hidden2); }
  int64_t wo_offset() const { return b2_offset() + 4LL * hidden2; }
  int64_t bo_offset() const { return wo_offset() + hidden2; }
  int64_t num_params() const { return bo_offset() + 1; }
};

// Returns nullptr when cfg is usable, else a static message naming the problem.
const char* validate_config(const StepConfig& cfg);

// ---- CPU (lstm_step_cpu.cc). Each call handles coordinates [begin, end) of an N-coordinate problem;
// the caller splits the range across threads (the TF op with its thread pool, pybind11 with std::thread).
void lstm_step_forward_cpu(const StepConfig& cfg, const float* phi, const float* grad,
                           const float* state, float scale, int64_t n, int64_t begin, int64_t end,
                           float* update, float* new_state);

// Backward of the forward above, recomputing the forward activations (nothing saved).
// d_new_state may be nullptr (zero upstream gradient). d_grad and d_state are written for
// [begin, end); d_phi_partial (num_params floats) is ACCUMULATED into, so each thread passes its own
// buffer and the caller sums them (deterministic for a fixed split).
void lstm_step_backward_cpu(const StepConfig& cfg, const float* phi, const float* grad,
                            const float* state, float scale, int64_t n, int64_t begin, int64_t end,
                            const float* d_update, const float* d_new_state, float* d_phi_partial,
                            float* d_grad, float* d_state);

}  // namespace l2l
