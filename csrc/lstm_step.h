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
#include <vector>

namespace l2l {

enum class Preprocess : int32_t { kNone = 0, kPaper = 1, kClamped = 2 };

// The accepted preprocess_param for kPaper and kClamped (validate_config; l2l_tf/ops/config.py has the same range).
constexpr float kPreprocessParamMin = 1e-3f;
constexpr float kPreprocessParamMax = 80.0f;

// Coordinates per block of the saved activations (see lstm_step_forward_cpu).
constexpr int kActivationGroup = 64;

struct StepConfig {
  int32_t hidden1 = 20;
  int32_t hidden2 = 20;
  Preprocess preprocess = Preprocess::kNone;
  float preprocess_param = 10.0f;  // p for kPaper, k for kClamped; unused for kNone
  // The three GEMMs (gates, input gradient, weight gradient) take their inputs rounded to bfloat16 (the raw gradient
  // of kNone saturated at the largest finite bfloat16, 3.39e38, so that +-inf never enters a GEMM) and accumulate
  // in float32 (vdpbf16ps: twice the float32 FMA rate). CPU kernels built with AVX512_BF16 only; the
  // pointwise math stays float32. Off by default: results then differ from float32 by ~0.1-0.3% (README).
  bool bf16_matmul = false;

  int32_t input_size() const { return preprocess == Preprocess::kNone ? 1 : 2; }
  int64_t state_rows() const { return 2 * (int64_t(hidden1) + hidden2); }
  // Rows of the saved activations (see lstm_step_forward_cpu).
  int64_t activation_rows() const { return 4 * (int64_t(hidden1) + hidden2); }
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
// activations (optional, activation_rows() * n floats): the forward also writes the activations the backward needs,
// so that a backward given them does not recompute them (a meta-training unroll keeps them between its forward and
// backward passes: 640 bytes per coordinate and step at 20/20 units, against the forward's two gate GEMMs and
// pointwise math again). Layout, blocked so that the backward reads them front to back (rows n apart, like the
// state, put a unit's values 1.25 MB apart at n = 15,680 and made the backward wait on memory): per group of
// kActivationGroup coordinates (the tensor's last group may be narrower: w = n - its first coordinate), a row-major
// [activation_rows(), w] block at activations + activation_rows() * (the group's first coordinate). Rows: layer 1
// unit by unit, 4 rows per unit (its i, f, g, o gates after their sigmoid / tanh), then layer 2's likewise: row
// 4 j + q for layer 1, 4 H1 + 4 j + q for layer 2. tanh(c') is not saved: the backward recomputes it from the gates
// and the state's c (c' = f c + i g, bit for bit as the forward formed it), one tanh for a fifth fewer bytes each
// way. With activations the outputs are computed from them one by one, and may differ from the fused forward's
// (sigmoid * tanh in one reciprocal) by an ulp or two.
void lstm_step_forward_cpu(const StepConfig& cfg, const float* phi, const float* grad,
                           const float* state, float scale, int64_t n, int64_t begin, int64_t end,
                           float* update, float* new_state, float* activations = nullptr);

// Backward of the forward above. Without activations it recomputes them; with the ones the forward wrote for the
// same phi, grad, state and scale, the results are the same bit for bit.
// d_new_state may be nullptr (zero upstream gradient). d_grad and d_state are written for
// [begin, end); d_grad may be nullptr (not wanted: a meta-gradient that stops at the optimizee gradient skips the
// input rows of layer 1's input gradient; d_phi and d_state are the same bit for bit); d_phi_partial (num_params floats) is ACCUMULATED into, so each thread passes its own
// buffer and the caller sums them (deterministic for a fixed split).
void lstm_step_backward_cpu(const StepConfig& cfg, const float* phi, const float* grad,
                            const float* state, float scale, int64_t n, int64_t begin, int64_t end,
                            const float* d_update, const float* d_new_state, float* d_phi_partial,
                            float* d_grad, float* d_state, const float* activations = nullptr);

// ---- Many tensors in one call (one optimizer step over all of a rule's tensors, sharing phi and scale).
// One tensor's arrays, as in the single-tensor calls above (d_new_state may be nullptr; unused fields null).
struct TensorArgs {
  const float* grad = nullptr;
  const float* state = nullptr;
  int64_t n = 0;
  float* update = nullptr;             // forward outputs
  float* new_state = nullptr;
  const float* d_update = nullptr;     // backward inputs
  const float* d_new_state = nullptr;
  float* d_grad = nullptr;             // backward outputs (d_grad may stay nullptr: not wanted)
  float* d_state = nullptr;
  float* activations_out = nullptr;    // forward: also write the activations (optional)
  const float* activations = nullptr;  // backward: read them instead of recomputing (optional)
};

// Coordinates [begin, end) of tensor `tensor`.
struct Slice {
  int32_t tensor;
  int64_t begin, end;
};

// Splits the coordinates of tensors of sizes n[0..count) into shards for `threads` threads that take them in order:
// whole 256-coordinate chunks (a tensor's last chunk may be partial), consecutive in tensor order, costed by their
// columns rounded up to the sub-block the kernels compute (sub_block_size(): 64 coordinates with AVX-512, 16 with
// AVX2). Guided self-scheduling: each shard has about 1/threads of the cost left after the shards before it (at
// least two full chunks), so shards shrink towards the end
// and threads that take the next one whenever they are free finish together, whichever thread starts late or runs
// slow. One thread: one shard. Deterministic: the same sizes and threads give the same shards.
std::vector<std::vector<Slice>> plan_shards(const int64_t* n, int count, int threads);
// Coordinates per register-tiled sub-block of the CPU kernels (their unit of cost in plan_shards).
int sub_block_size();

// One shard of a multi-tensor step: each slice in order, with the weights packed once. The backward accumulates
// d_phi of all its slices into d_phi_partial (as lstm_step_backward_cpu does).
void lstm_step_forward_cpu_slices(const StepConfig& cfg, const float* phi, float scale, const TensorArgs* tensors,
                                  const Slice* slices, int count);
void lstm_step_backward_cpu_slices(const StepConfig& cfg, const float* phi, float scale, const TensorArgs* tensors,
                                   const Slice* slices, int count, float* d_phi_partial);

// ---- Cycle accounting by phase (a benchmark mode: experiments/bench_step.py --benchmark=phases). While a
// PhaseCycles is installed on a thread, the CPU kernels running on that thread add the time-stamp-counter ticks
// spent in each phase to it (a few rdtsc per 64-coordinate sub-block; nothing is counted when none is installed).
enum Phase : int32_t {
  kPhaseStage = 0,        // preprocessing of the gradient, staging of the state rows, weight packing
  kPhaseGates1,           // layer-1 gate GEMM
  kPhaseCell1,            // layer-1 pointwise LSTM math (forward; in the backward: recomputed activations)
  kPhaseGates2,           // layer-2 gate GEMM
  kPhaseCell2,            // layer-2 pointwise math and the output
  kPhaseCellBackward2,    // backward: layer-2 pointwise chain rule (and the output layer)
  kPhaseInputGrad2,       // backward: layer-2 input-gradient GEMM
  kPhaseCellBackward1,    // backward: layer-1 pointwise chain rule
  kPhaseInputGrad1,       // backward: layer-1 input-gradient GEMM and d_grad through the preprocessing
  kPhaseWeightGrad,       // backward: weight-gradient GEMMs
  kPhaseFinish,           // backward: reduction of the per-lane d_phi sums
  kNumPhases
};
struct PhaseCycles {
  uint64_t ticks[kNumPhases] = {};
};
// Multiply-adds per second this thread sustains in the kernels' vector width (independent FMA chains held in
// registers, best of short bursts over ~`seconds`): the peak that the arithmetic floor of the step is measured
// against (experiments/bench_step.py --benchmark=meta).
double fma_peak_per_second(double seconds);

// Installs `counters` (nullptr: none) for the calling thread; returns the previous one.
PhaseCycles* set_thread_phase_cycles(PhaseCycles* counters);
const char* phase_name(int phase);

}  // namespace l2l
