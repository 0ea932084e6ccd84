// CUDA kernels of the coordinatewise LSTM step (contract: lstm_step.h, lstm_step_cuda.h).
//
// Three kernels:
//  * fwd_fp32_kernel: one thread per coordinate, FP32 FMA loops, accurate expf/tanhf/logf; any hidden sizes.
//    Serves GpuMath::kFP32, and kTF32 for shapes without a fast path (anything but hidden 20/20) or on
//    cards older than sm_80.
//  * fwd_tf32_kernel (GpuMath::kTF32, hidden1 = hidden2 = 20): each warp takes tiles of 16*MT coordinates
//    (MT = 2: 32 coordinates, one 128-byte line per state row), computes the [coords x 80] gate matrices of
//    both layers with warp-level mma.sync m16n8k8 TF32 (fp32 accumulate, bias in the accumulator), does the
//    LSTM pointwise math in registers and writes the new state straight from the accumulator layout.
//      - Weights: staged once per block in shared memory, already in the B-fragment layout (one 16-byte
//        load per lane per (k-step, unit group)), rounded to TF32 (cvt.rna).
//      - Gate columns are permuted so that lane (g, t) of the warp owns units u = 4j + t (j = 0..4): the
//        i, f, g, o columns of unit u land in that lane's accumulators, and the h1' it computes are exactly
//        the A-fragment elements layer 2 needs (input positions are permuted the same way): no shuffles.
//      - State: read exactly once, with 16-byte cp.async (4-byte when N % 4 != 0 or the pointers are not
//        16-byte aligned) into a per-warp multi-stage shared-memory ring (persistent grid, prefetching
//        STAGES-1 tiles ahead), XOR-swizzled so that the A-fragment reads are free of bank conflicts.
//        The new state is written once from registers (each store instruction fills whole 32-byte sectors).
//      - Activations: ex2.approx / rcp.approx (sigmoid = 1 / (1 + 2^(-z log2 e)), tanh = 1 - 2 / (1 + e^(2z)));
//        a tanh.approx.f32 variant (act 0) exists for comparison.
//    Accuracy: TF32 operands (10-bit mantissa, cvt.rna) with fp32 accumulation; see TF32_ACCURACY_NOTE.
//  * bwd_kernel: one thread per coordinate recomputes the forward (FP32, accurate), back-propagates, writes
//    d_grad and d_state, and stores its per-coordinate (dz, input) vectors in shared memory; the block then
//    forms d_phi for its tile as sum over coordinates of dz (x) input (each thread owns a strided set of
//    parameters, accumulating in shared memory over all tiles of a persistent block), and adds it to d_phi
//    (zeroed first on the stream) with one atomicAdd per parameter per block. Not deterministic in the
//    last bits (atomic order).
//
// Limits: the FP32 forward keeps 4 (D + 2 H1 + H2) bytes per coordinate in shared memory, the backward about
// 4 (2 + D + 8 H1 + 7 H2); blocks shrink down to 8 threads to fit, and sizes beyond the card's shared memory
// (on Hopper: H1 = H2 above ~2400 forward, ~480 backward) return a message instead of launching.
//
// In-place use (new_state == state, d_state == d_new_state) is safe: every coordinate's inputs are read
// before its outputs are written, and no coordinate reads another's values.
//
// TF32_ACCURACY_NOTE (tools/gpu_check.sh on one NVIDIA H200, 2026-11-30): max |tf32 - cpu| / max |cpu| per output
//   (update, new_state), hidden 20/20, random phi ~ N(0, 0.3^2), h ~ U(-1, 1), c ~ N(0, 2^2), gradients over 10
//   decades plus exact zeros, subnormals, +-1e30/3e38 (1e3..3e4 for "none") and +-inf, N in {5, 10, 4099, 8192,
//   100003}: 2.8e-4 worst over the 3 preprocess modes and the tile variants (2.8e-4 vs the float64 NumPy reference
//   too). The FP32 kernel: <= 2.8e-7 vs the CPU kernel (tolerance 1e-5); the backward: <= 1.4e-6 on d_phi, d_grad
//   and d_state (20/20 and 7/5, with and without d_new_state).
// Speed on that H200 (copy bandwidth 4.24 TB/s, so the 652 B/coordinate floor is 1.54 ms at N = 1e7), median of
//   20: TF32 forward 1.95 ms at N = 1e7 (1.27x the floor; 0.227 ms at 1e6), FP32 forward 19.8 ms, backward
//   137 ms; JAX jit of the same step 10.0 ms, torch.compile 14.3 ms.
#include "lstm_step_cuda.h"

#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

namespace l2l {
namespace {

// ------------------------------------------------------------------------------------------------
// Shared helpers
// ------------------------------------------------------------------------------------------------

struct Dims {
  int h1, h2, d, k1, k2;
  int mode;       // Preprocess as int
  float param;    // p or k
  float thresh;   // kPaper: exp(-p)
  float expp;     // exp(p) / exp(k)
  int64_t w1, b1, w2, b2, wo, bo, np;
};

Dims make_dims(const StepConfig& cfg) {
  Dims d;
  d.h1 = cfg.hidden1;
  d.h2 = cfg.hidden2;
  d.d = cfg.input_size();
  d.k1 = d.d + d.h1;
  d.k2 = d.h1 + d.h2;
  d.mode = static_cast<int>(cfg.preprocess);
  d.param = cfg.preprocess_param;
  // As the CPU kernels: thresholds computed in double, rounded to float.
  d.thresh = static_cast<float>(std::exp(-static_cast<double>(cfg.preprocess_param)));
  d.expp = static_cast<float>(std::exp(static_cast<double>(cfg.preprocess_param)));
  d.w1 = cfg.w1_offset();
  d.b1 = cfg.b1_offset();
  d.w2 = cfg.w2_offset();
  d.b2 = cfg.b2_offset();
  d.wo = cfg.wo_offset();
  d.bo = cfg.bo_offset();
  d.np = cfg.num_params();
  return d;
}

// Clamps that keep NaN (a NaN gradient must give a NaN update, lstm_step.h): fmaxf / fminf return the non-NaN
// operand, which would turn a NaN gradient into a finite feature. Comparisons with NaN are false, so these return v.
__host__ __device__ inline float max_keep_nan(float v, float lo) { return v < lo ? lo : v; }
__host__ __device__ inline float clamp_keep_nan(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// +-inf act as +-FLT_MAX, the largest finite gradient of that sign (lstm_step.h); finite values (subnormals included)
// and NaN unchanged, bit for bit, as in the CPU kernels.
__host__ __device__ inline float clamp_infinities(float g) { return fabsf(g) > FLT_MAX ? copysignf(FLT_MAX, g) : g; }

// The raw gradient as the TF32 path's input for preprocess kNone: clamped to the largest finite TF32 value
// ((2 - 2^-10) 2^127), so that the cvt.rna rounding of a gradient near FLT_MAX (or of +-inf, clamped to +-FLT_MAX)
// cannot round up to infinity and make a 0 * inf in the MMA. The gates of such inputs saturate either way.
#define L2L_TF32_MAX 0x1.ffcp+127f  // 0x7f7fe000, the largest finite TF32 number (3.4011621e38)
__device__ __forceinline__ float tf32_raw_input(float g) { return clamp_keep_nan(g, -L2L_TF32_MAX, L2L_TF32_MAX); }

// TF32 path: the log feature is rounded to TF32 (10-bit mantissa) before use, so the fast __logf
// (MUFU.LG2, ~2^-21 relative) and a multiplication by 1/p are plenty.
__device__ __forceinline__ void preprocess_feat_fast(int mode, float inv_param, float thresh, float expp, float g,
                                                     float& x0, float& x1) {
  g = clamp_infinities(g);
  const float a = fabsf(g);
  const float sg = g > 0.f ? 1.f : (g < 0.f ? -1.f : 0.f);
  if (mode == 1) {
    const bool big = a >= thresh;
    x0 = big ? __logf(a) * inv_param : -1.f;
    x1 = big ? sg : expp * g;
  } else {
    x0 = max_keep_nan(__logf(a + FLT_EPSILON) * inv_param, -1.f);
    x1 = clamp_keep_nan(g * expp, -1.f, 1.f);
  }
}

// Features of one gradient value and their derivatives w.r.t. g (see lstm_step.h): at the clamped gradient, and 0 at
// +-inf (the clamp is flat there).
__host__ __device__ inline void preprocess_feat(int mode, float param, float thresh, float expp, float g_in,
                                                float& x0, float& x1, float& dx0, float& dx1) {
  const float g = clamp_infinities(g_in);
  if (mode == 0) {
    x0 = g;
    x1 = 0.f;
    dx0 = 1.f;
    dx1 = 0.f;
  } else if (mode == 1) {
    const float a = fabsf(g);
    if (a >= thresh) {
      x0 = logf(a) / param;
      x1 = g > 0.f ? 1.f : (g < 0.f ? -1.f : 0.f);
      dx0 = 1.f / (param * g);
      dx1 = 0.f;
    } else {
      x0 = -1.f;
      x1 = expp * g;
      dx0 = 0.f;
      dx1 = expp;
    }
  } else {
    const float a = fabsf(g);
    const float l = logf(a + FLT_EPSILON) / param;
    x0 = max_keep_nan(l, -1.f);
    const float sg = g > 0.f ? 1.f : (g < 0.f ? -1.f : 0.f);
    dx0 = l > -1.f ? sg / (param * (a + FLT_EPSILON)) : 0.f;
    const float v = g * expp;
    x1 = clamp_keep_nan(v, -1.f, 1.f);
    dx1 = fabsf(v) < 1.f ? expp : 0.f;
  }
  if (fabsf(g_in) > FLT_MAX) {
    dx0 = 0.f;
    dx1 = 0.f;
  }
}

__host__ __device__ inline float sigmoid_acc(float z) { return 1.f / (1.f + expf(-z)); }

// __ldg on the device; a plain load when the backward's per-coordinate code is compiled for the host (tests).
#ifdef __CUDA_ARCH__
#define L2L_LDG(p) __ldg(p)
#else
#define L2L_LDG(p) (*(p))
#endif

// ------------------------------------------------------------------------------------------------
// FP32 forward, any hidden sizes. One thread per coordinate; the thread's input vectors live in shared
// memory columns ([k][T], conflict-free); weights are warp-uniform __ldg loads (broadcast, L1-resident).
// ------------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(128) fwd_fp32_kernel(Dims d, const float* __restrict__ phi,
                                                       const float* grad, const float* state, float scale,
                                                       int64_t n, float* update, float* new_state) {
  extern __shared__ float smem_f[];
  const int T = blockDim.x;
  const int tid = threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * T + tid;
  if (i >= n) return;  // no block-level synchronisation below
  const int H1 = d.h1, H2 = d.h2, D = d.d, K1 = d.k1;
  float* in1 = smem_f + tid;                                // [K1][T]: x | h1
  float* in2 = smem_f + static_cast<int64_t>(K1) * T + tid;  // [K2][T]: h1' | h2

  float x0, x1, dx0, dx1;
  preprocess_feat(d.mode, d.param, d.thresh, d.expp, grad[i], x0, x1, dx0, dx1);
  in1[0] = x0;
  if (D == 2) in1[T] = x1;
  for (int k = 0; k < H1; ++k) in1[(D + k) * T] = state[static_cast<int64_t>(k) * n + i];
  for (int k = 0; k < H2; ++k) in2[(H1 + k) * T] = state[static_cast<int64_t>(2 * H1 + k) * n + i];

  const float* W1 = phi + d.w1;
  const float* B1 = phi + d.b1;
  for (int u = 0; u < H1; ++u) {
    float zi = __ldg(B1 + u), zf = __ldg(B1 + H1 + u), zg = __ldg(B1 + 2 * H1 + u), zo = __ldg(B1 + 3 * H1 + u);
    const float* wi = W1 + static_cast<int64_t>(u) * K1;
    const float* wf = wi + static_cast<int64_t>(H1) * K1;
    const float* wg = wf + static_cast<int64_t>(H1) * K1;
    const float* wq = wg + static_cast<int64_t>(H1) * K1;
    for (int k = 0; k < K1; ++k) {
      const float v = in1[k * T];
      zi = fmaf(__ldg(wi + k), v, zi);
      zf = fmaf(__ldg(wf + k), v, zf);
      zg = fmaf(__ldg(wg + k), v, zg);
      zo = fmaf(__ldg(wq + k), v, zo);
    }
    const float c = state[static_cast<int64_t>(H1 + u) * n + i];
    const float cn = sigmoid_acc(zf) * c + sigmoid_acc(zi) * tanhf(zg);
    const float hn = sigmoid_acc(zo) * tanhf(cn);
    new_state[static_cast<int64_t>(H1 + u) * n + i] = cn;
    new_state[static_cast<int64_t>(u) * n + i] = hn;
    in2[u * T] = hn;
  }

  const int K2 = d.k2;
  const float* W2 = phi + d.w2;
  const float* B2 = phi + d.b2;
  const float* WO = phi + d.wo;
  float out = 0.f;
  for (int u = 0; u < H2; ++u) {
    float zi = __ldg(B2 + u), zf = __ldg(B2 + H2 + u), zg = __ldg(B2 + 2 * H2 + u), zo = __ldg(B2 + 3 * H2 + u);
    const float* wi = W2 + static_cast<int64_t>(u) * K2;
    const float* wf = wi + static_cast<int64_t>(H2) * K2;
    const float* wg = wf + static_cast<int64_t>(H2) * K2;
    const float* wq = wg + static_cast<int64_t>(H2) * K2;
    for (int k = 0; k < K2; ++k) {
      const float v = in2[k * T];
      zi = fmaf(__ldg(wi + k), v, zi);
      zf = fmaf(__ldg(wf + k), v, zf);
      zg = fmaf(__ldg(wg + k), v, zg);
      zo = fmaf(__ldg(wq + k), v, zo);
    }
    const int64_t crow = static_cast<int64_t>(2 * H1 + H2 + u) * n + i;
    const float c = state[crow];
    const float cn = sigmoid_acc(zf) * c + sigmoid_acc(zi) * tanhf(zg);
    const float hn = sigmoid_acc(zo) * tanhf(cn);
    new_state[crow] = cn;
    new_state[static_cast<int64_t>(2 * H1 + u) * n + i] = hn;
    out = fmaf(__ldg(WO + u), hn, out);
  }
  update[i] = scale * (out + __ldg(phi + d.bo));
}

// ------------------------------------------------------------------------------------------------
// TF32 tensor-core forward, hidden sizes 4*J1 / 4*J2 (instantiated for 20/20).
// ------------------------------------------------------------------------------------------------

template <int J1, int J2, int D, int MT>
struct FastShape {
  static constexpr int H1 = 4 * J1, H2 = 4 * J2;
  static constexpr int K1 = D + H1, K2 = H1 + H2;
  static constexpr int KS1 = (J1 + 2) / 2;      // layer-1 k-steps: slots 0..J1-1 = h1, slot J1 = x
  static constexpr int KS2 = (J1 + J2 + 1) / 2;  // layer-2 k-steps: slots h1' | h2
  static constexpr int ROWS = 1 + 2 * H1 + 2 * H2;  // staged rows: grad | h1 | c1 | h2 | c2
  static constexpr int C = 16 * MT;                 // coordinates per warp tile
  static constexpr int CH = C / 4;                  // 16-byte chunks per staged row
  static constexpr int STAGE_FLOATS = ROWS * C;
  static constexpr int W1F = KS1 * J1 * 128;  // B fragments: [k-step][unit group j][lane][4]
  static constexpr int W2F = KS2 * J2 * 128;
  static constexpr int B1F = 4 * H1;          // [unit][gate]
  static constexpr int B2F = 4 * H2;
  static constexpr int WOF = ((H2 + 1 + 3) / 4) * 4;  // wo | bo, padded to 16 bytes
  static constexpr int FIXED_FLOATS = W1F + W2F + B1F + B2F + WOF;
};

// Float offset of coordinate `coord` (0..16*MT-1) inside staged row `row`: the 16-byte chunk index is
// XOR-swizzled with the row so that the A-fragment reads (lanes t = 0..3 read 4 consecutive rows, lanes
// g = 0..7 read 8 consecutive coordinates) hit 32 distinct banks.
template <int MT>
__host__ __device__ __forceinline__ int swz_col(int row, int coord) {
  const int f = (MT == 2) ? ((row & 3) << 1) : (((row >> 1) & 1) << 1);
  return (((coord >> 2) ^ f) << 2) | (coord & 3);
}

// Value of B-fragment element idx (layer 1 or 2) in the staged layout, from the row-major weights.
// idx = ((s * J + j) * 32 + lane) * 4 + q; lane = 4 g + t; q: 0 = b0 of n-tile 2j, 1 = b1 of 2j,
// 2 = b0 of 2j+1, 3 = b1 of 2j+1. b0 holds B[k = t][n = g], b1 B[k = t + 4][n = g].
// Column n of n-tile 2j + e2 is gate (2 e2 + (n & 1)) of unit 4j + (n >> 1); input position 8s + k is
// slot 2s + (k >> 2) of lane-column (k & 3): layer 1 slot j < J1 is h1 unit 4j + (k&3), slot J1 is x
// (feature k&3 when < D); layer 2 slot j < J1 is h1' unit 4j + (k&3), slot J1 + j' is h2 unit 4j' + (k&3).
template <int J1, int J2, int D>
__host__ __device__ inline float staged_weight(int layer, int idx, const float* W, int H, int K) {
  const int q = idx & 3;
  const int lane = (idx >> 2) & 31;
  const int sj = idx >> 7;
  const int J = layer == 1 ? J1 : J2;
  const int j = sj % J, s = sj / J;
  const int g = lane >> 2, t = lane & 3;
  const int kk = (q & 1) ? t + 4 : t;
  const int unit = 4 * j + (g >> 1);
  const int gate = 2 * (q >> 1) + (g & 1);
  const int wrow = gate * H + unit;
  const int slot = 2 * s + (kk >> 2), sc = kk & 3;
  int col = -1;
  if (layer == 1) {
    if (slot < J1) col = D + 4 * slot + sc;
    else if (slot == J1 && sc < D) col = sc;
  } else {
    if (slot < J1) col = 4 * slot + sc;
    else if (slot < J1 + J2) col = 4 * J1 + 4 * (slot - J1) + sc;
  }
  return col < 0 ? 0.f : W[static_cast<int64_t>(wrow) * K + col];
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ACT 1 (default): sigmoid = 1 / (1 + 2^(-z log2 e)), tanh = 1 - 2 / (1 + 2^(2 z log2 e)) with ex2.approx and
// rcp.approx (2 MUFU ops each). ACT 0: the hardware tanh.approx.f32 (1 MUFU op, max rel. error ~2^-11); it
// measured slower on an H200 (2.60 vs 1.95 ms at N = 1e7) and slightly less accurate.
template <int ACT>
__device__ __forceinline__ float act_sigmoid(float z) {
  if (ACT == 0) return fmaf(0.5f, tanh_approx(0.5f * z), 0.5f);
  return __fdividef(1.f, 1.f + __expf(-z));
}
template <int ACT>
__device__ __forceinline__ float act_tanh(float z) {
  if (ACT == 0) return tanh_approx(z);
  return 1.f - __fdividef(2.f, 1.f + __expf(2.f * z));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Queue the copies of one warp tile (grad row + all state rows, coordinates [tile*C, tile*C + C)) into
// `stage`. Coordinates >= n are zero-filled.
template <int J1, int J2, int D, int MT>
__device__ __forceinline__ void issue_tile(float* stage, const float* grad, const float* state, int64_t n,
                                           int64_t tile, int lane, bool vec16) {
  using S = FastShape<J1, J2, D, MT>;
  const int64_t base = tile * S::C;
  if (vec16) {
    // n % 4 == 0 and 16-byte aligned rows: a 4-coordinate chunk is either fully inside or fully outside.
#pragma unroll 4
    for (int idx = lane; idx < S::ROWS * S::CH; idx += 32) {
      const int row = idx / S::CH, ch = idx % S::CH;
      const int64_t coord = base + ch * 4;
      const bool in = coord < n;
      const float* src = !in ? grad : (row == 0 ? grad + coord : state + static_cast<int64_t>(row - 1) * n + coord);
      const uint32_t dst = smem_u32(stage + row * S::C + swz_col<MT>(row, ch * 4));
      cp_async16(dst, src, in ? 16 : 0);
    }
  } else {
#pragma unroll 4
    for (int idx = lane; idx < S::ROWS * S::C; idx += 32) {
      const int row = idx / S::C, c = idx % S::C;
      const int64_t coord = base + c;
      const bool in = coord < n;
      const float* src = !in ? grad : (row == 0 ? grad + coord : state + static_cast<int64_t>(row - 1) * n + coord);
      const uint32_t dst = smem_u32(stage + row * S::C + swz_col<MT>(row, c));
      cp_async4(dst, src, in ? 4 : 0);
    }
  }
}

template <int J1, int J2, int D, int MT, int STAGES, int ACT>
__global__ void __launch_bounds__(MT == 2 ? 256 : 384, 1)
    fwd_tf32_kernel(const float* __restrict__ phi, const float* grad, const float* state, float scale,
                    int64_t n, float* update, float* new_state, int mode, float inv_param, float thresh,
                    float expp, int vec16_flag) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using S = FastShape<J1, J2, D, MT>;
  constexpr int H1 = S::H1, H2 = S::H2, KS1 = S::KS1, KS2 = S::KS2, C = S::C;
  extern __shared__ __align__(16) float smem_t[];
  float* w1s = smem_t;
  float* w2s = w1s + S::W1F;
  float* b1s = w2s + S::W2F;
  float* b2s = b1s + S::B1F;
  float* wos = b2s + S::B2F;
  float* stages_base = wos + S::WOF;

  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int nwarps = nthreads >> 5;
  const bool vec16 = vec16_flag != 0;

  // Start this warp's first prefetches before staging the weights: their latency overlaps the staging.
  const int64_t num_tiles = (n + C - 1) / C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * nwarps;
  int64_t tile = static_cast<int64_t>(blockIdx.x) * nwarps + warp;
  float* my_stages = stages_base + warp * (STAGES * S::STAGE_FLOATS);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    const int64_t tt = tile + s * stride;
    if (tt < num_tiles) issue_tile<J1, J2, D, MT>(my_stages + s * S::STAGE_FLOATS, grad, state, n, tt, lane, vec16);
    cp_async_commit();
  }

  {
    const float* W1 = phi;
    const float* B1 = phi + 4 * H1 * S::K1;
    const float* W2 = B1 + 4 * H1;
    const float* B2 = W2 + 4 * H2 * S::K2;
    const float* WO = B2 + 4 * H2;
    for (int idx = tid; idx < S::W1F; idx += nthreads)
      w1s[idx] = __uint_as_float(to_tf32(staged_weight<J1, J2, D>(1, idx, W1, H1, S::K1)));
    for (int idx = tid; idx < S::W2F; idx += nthreads)
      w2s[idx] = __uint_as_float(to_tf32(staged_weight<J1, J2, D>(2, idx, W2, H2, S::K2)));
    for (int idx = tid; idx < S::B1F; idx += nthreads) b1s[idx] = B1[(idx & 3) * H1 + (idx >> 2)];
    for (int idx = tid; idx < S::B2F; idx += nthreads) b2s[idx] = B2[(idx & 3) * H2 + (idx >> 2)];
    for (int idx = tid; idx < S::WOF; idx += nthreads) wos[idx] = idx <= H2 ? WO[idx] : 0.f;  // WO[H2] = bo
  }
  __syncthreads();

  const int g = lane >> 2, t = lane & 3;
  const float bo = wos[H2];

  for (int it = 0; tile < num_tiles; ++it, tile += stride) {
    {
      const int64_t pre = tile + (STAGES - 1) * stride;
      if (pre < num_tiles)
        issue_tile<J1, J2, D, MT>(my_stages + ((it + STAGES - 1) % STAGES) * S::STAGE_FLOATS, grad, state, n,
                                  pre, lane, vec16);
      cp_async_commit();
    }
    cp_async_wait<STAGES - 1>();
    __syncwarp();
    const float* st = my_stages + (it % STAGES) * S::STAGE_FLOATS;
    const int64_t base = tile * C;
    auto LD = [&](int row, int coord) -> float { return st[row * C + swz_col<MT>(row, coord)]; };

    // ---- layer 1 A fragments: slot j < J1: h1 unit 4j + t; slot J1: x feature t (t < D)
    uint32_t a1[MT][KS1][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float xs[2];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float gr = LD(0, m * 16 + 8 * hh + g);
        if (D == 1) {
          xs[hh] = t == 0 ? tf32_raw_input(gr) : 0.f;
        } else {
          float x0, x1;
          preprocess_feat_fast(mode, inv_param, thresh, expp, gr, x0, x1);
          xs[hh] = t == 0 ? x0 : (t == 1 ? x1 : 0.f);
        }
      }
#pragma unroll
      for (int s = 0; s < KS1; ++s) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int slot = 2 * s + h;
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            float v;
            if (slot < J1) v = LD(1 + 4 * slot + t, m * 16 + 8 * hh + g);
            else if (slot == J1) v = xs[hh];
            else v = 0.f;
            a1[m][s][2 * h + hh] = to_tf32(v);
          }
        }
      }
    }

    // ---- layer 1: per unit group j, gates of unit 4j + t in n-tiles 2j (i, f) and 2j + 1 (g, o)
    uint32_t a2[MT][KS2][4];
#pragma unroll
    for (int j = 0; j < J1; ++j) {
      const float4 bb = *reinterpret_cast<const float4*>(b1s + (4 * j + t) * 4);
      float acc[MT][2][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        acc[m][0][0] = bb.x; acc[m][0][1] = bb.y; acc[m][0][2] = bb.x; acc[m][0][3] = bb.y;
        acc[m][1][0] = bb.z; acc[m][1][1] = bb.w; acc[m][1][2] = bb.z; acc[m][1][3] = bb.w;
      }
#pragma unroll
      for (int s = 0; s < KS1; ++s) {
        const uint4 w = *reinterpret_cast<const uint4*>(w1s + ((s * J1 + j) * 32 + lane) * 4);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          mma_tf32(acc[m][0], a1[m][s], w.x, w.y);
          mma_tf32(acc[m][1], a1[m][s], w.z, w.w);
        }
      }
      const int u = 4 * j + t;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int coord = m * 16 + 8 * hh + g;
          const float c = LD(1 + H1 + u, coord);
          const float cn = act_sigmoid<ACT>(acc[m][0][2 * hh + 1]) * c +
                           act_sigmoid<ACT>(acc[m][0][2 * hh]) * act_tanh<ACT>(acc[m][1][2 * hh]);
          const float hn = act_sigmoid<ACT>(acc[m][1][2 * hh + 1]) * act_tanh<ACT>(cn);
          const int64_t gc = base + coord;
          if (gc < n) {
            new_state[static_cast<int64_t>(H1 + u) * n + gc] = cn;
            new_state[static_cast<int64_t>(u) * n + gc] = hn;
          }
          a2[m][j >> 1][2 * (j & 1) + hh] = to_tf32(hn);
        }
      }
    }
    // ---- layer 2 A fragments, second half: slot J1 + j: h2 unit 4j + t; padding slot: 0
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int slot = J1; slot < 2 * KS2; ++slot) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const float v = slot < J1 + J2 ? LD(1 + 2 * H1 + 4 * (slot - J1) + t, m * 16 + 8 * hh + g) : 0.f;
          a2[m][slot >> 1][2 * (slot & 1) + hh] = to_tf32(v);
        }
      }
    }

    // ---- layer 2 and the output
    float out[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) out[m][0] = out[m][1] = 0.f;
#pragma unroll
    for (int j = 0; j < J2; ++j) {
      const float4 bb = *reinterpret_cast<const float4*>(b2s + (4 * j + t) * 4);
      float acc[MT][2][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        acc[m][0][0] = bb.x; acc[m][0][1] = bb.y; acc[m][0][2] = bb.x; acc[m][0][3] = bb.y;
        acc[m][1][0] = bb.z; acc[m][1][1] = bb.w; acc[m][1][2] = bb.z; acc[m][1][3] = bb.w;
      }
#pragma unroll
      for (int s = 0; s < KS2; ++s) {
        const uint4 w = *reinterpret_cast<const uint4*>(w2s + ((s * J2 + j) * 32 + lane) * 4);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          mma_tf32(acc[m][0], a2[m][s], w.x, w.y);
          mma_tf32(acc[m][1], a2[m][s], w.z, w.w);
        }
      }
      const int u = 4 * j + t;
      const float wo_u = wos[u];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int coord = m * 16 + 8 * hh + g;
          const float c = LD(1 + 2 * H1 + H2 + u, coord);
          const float cn = act_sigmoid<ACT>(acc[m][0][2 * hh + 1]) * c +
                           act_sigmoid<ACT>(acc[m][0][2 * hh]) * act_tanh<ACT>(acc[m][1][2 * hh]);
          const float hn = act_sigmoid<ACT>(acc[m][1][2 * hh + 1]) * act_tanh<ACT>(cn);
          const int64_t gc = base + coord;
          if (gc < n) {
            new_state[static_cast<int64_t>(2 * H1 + H2 + u) * n + gc] = cn;
            new_state[static_cast<int64_t>(2 * H1 + u) * n + gc] = hn;
          }
          out[m][hh] = fmaf(wo_u, hn, out[m][hh]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float v = out[m][hh];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        const int64_t gc = base + m * 16 + 8 * hh + g;
        if (t == 0 && gc < n) update[gc] = scale * (v + bo);
      }
    }
    __syncwarp();  // the stage is refilled by a later iteration's prefetch
  }
  cp_async_wait<0>();
#endif
}

// ------------------------------------------------------------------------------------------------
// Backward (FP32, any hidden sizes)
// ------------------------------------------------------------------------------------------------

// Per-coordinate row in shared memory (odd pitch: conflict-free both for "thread c reads its own row"
// and for "threads read consecutive slots of one row").
struct BwdLayout {
  int one, in1, in2, h2n, z1, z2, dz3, tc1, tc2, dh1, len, pitch;
};

BwdLayout make_bwd_layout(const Dims& d) {
  BwdLayout L;
  int o = 0;
  L.one = o; o += 1;
  L.in1 = o; o += d.k1;
  L.in2 = o; o += d.k2;
  L.h2n = o; o += d.h2;
  L.z1 = o; o += 4 * d.h1;
  L.z2 = o; o += 4 * d.h2;
  L.dz3 = o; o += 1;
  L.tc1 = o; o += d.h1;
  L.tc2 = o; o += d.h2;
  L.dh1 = o; o += d.h1;
  L.len = o;
  L.pitch = o | 1;
  return L;
}

// z[q] = b[q * H] + sum_k w[q * gstride + k] * in[k], q = 0..3 (the 4 gates of one unit): 4 independent
// FMA chains, unrolled, so that the weight loads of several k are in flight at once.
__host__ __device__ inline void gate_dots(float (&z)[4], const float* __restrict__ w, int64_t gstride,
                                          const float* __restrict__ b, int H, const float* in, int K) {
  float a0 = L2L_LDG(b), a1 = L2L_LDG(b + H), a2 = L2L_LDG(b + 2 * H), a3 = L2L_LDG(b + 3 * H);
  const float* w1 = w + gstride;
  const float* w2 = w1 + gstride;
  const float* w3 = w2 + gstride;
#ifdef __CUDA_ARCH__
#pragma unroll 4
#endif
  for (int k = 0; k < K; ++k) {
    const float v = in[k];
    a0 = fmaf(L2L_LDG(w + k), v, a0);
    a1 = fmaf(L2L_LDG(w1 + k), v, a1);
    a2 = fmaf(L2L_LDG(w2 + k), v, a2);
    a3 = fmaf(L2L_LDG(w3 + k), v, a3);
  }
  z[0] = a0;
  z[1] = a1;
  z[2] = a2;
  z[3] = a3;
}

// out[j] = sum_{r < R} w[r * K + k0 + j] * dz[r] for j < kn (<= 4): 4 independent chains, one dz load per r.
__host__ __device__ inline void wt_dots4(float (&out)[4], const float* __restrict__ w, int K, int k0, int kn,
                                         const float* dz, int R) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  const float* wc = w + k0;
  if (kn == 4) {
#ifdef __CUDA_ARCH__
#pragma unroll 4
#endif
    for (int r = 0; r < R; ++r) {
      const float z = dz[r];
      const float* wr = wc + static_cast<int64_t>(r) * K;
      s0 = fmaf(L2L_LDG(wr), z, s0);
      s1 = fmaf(L2L_LDG(wr + 1), z, s1);
      s2 = fmaf(L2L_LDG(wr + 2), z, s2);
      s3 = fmaf(L2L_LDG(wr + 3), z, s3);
    }
  } else {
#ifdef __CUDA_ARCH__
#pragma unroll 4
#endif
    for (int r = 0; r < R; ++r) {
      const float z = dz[r];
      const float* wr = wc + static_cast<int64_t>(r) * K;
      s0 = fmaf(L2L_LDG(wr), z, s0);
      if (kn > 1) s1 = fmaf(L2L_LDG(wr + 1), z, s1);
      if (kn > 2) s2 = fmaf(L2L_LDG(wr + 2), z, s2);
    }
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

struct BwdArgs {
  Dims d;
  BwdLayout L;
  const float* phi;
  const float* grad;
  const float* state;
  float scale;
  int64_t n;
  const float* d_update;
  const float* d_new_state;  // may be null
  float* d_phi;
  float* d_grad;
  float* d_state;
};

// Phase A, one coordinate i: recompute the forward, back-propagate, write d_grad[i] and d_state[:, i], and
// leave in `row` what the parameter gradient needs (inputs, dz of both layers, dz of the output layer).
// Reads every d_new_state value of a row before d_state of that row is written (in-place safe).
__host__ __device__ inline void bwd_coord(const BwdArgs& a, float* row, int64_t i) {
  const Dims& d = a.d;
  const BwdLayout& L = a.L;
  const int H1 = d.h1, H2 = d.h2, D = d.d, K1 = d.k1, K2 = d.k2;
  const int64_t n = a.n;
  const float* state = a.state;
  const float* dns = a.d_new_state;
  float* d_state = a.d_state;
  const bool has_dns = dns != nullptr;
  const float* W1 = a.phi + d.w1;
  const float* B1 = a.phi + d.b1;
  const float* W2 = a.phi + d.w2;
  const float* B2 = a.phi + d.b2;
  const float* WO = a.phi + d.wo;

  row[L.one] = 1.f;
  float x0, x1, dx0, dx1;
  const float gi = a.grad[i];
  const bool g_infinite = fabsf(gi) > FLT_MAX;
  preprocess_feat(d.mode, d.param, d.thresh, d.expp, gi, x0, x1, dx0, dx1);
  row[L.in1] = x0;
  if (D == 2) row[L.in1 + 1] = x1;
  for (int k = 0; k < H1; ++k) row[L.in1 + D + k] = state[static_cast<int64_t>(k) * n + i];
  for (int k = 0; k < H2; ++k) row[L.in2 + H1 + k] = state[static_cast<int64_t>(2 * H1 + k) * n + i];

  // forward, layer 1
  for (int u = 0; u < H1; ++u) {
    float z[4];
    gate_dots(z, W1 + static_cast<int64_t>(u) * K1, static_cast<int64_t>(H1) * K1, B1 + u, H1, row + L.in1, K1);
    const float ai = sigmoid_acc(z[0]), af = sigmoid_acc(z[1]), ag = tanhf(z[2]), ao = sigmoid_acc(z[3]);
    const float c = state[static_cast<int64_t>(H1 + u) * n + i];
    const float cn = af * c + ai * ag;
    const float tc = tanhf(cn);
    row[L.z1 + u] = ai;
    row[L.z1 + H1 + u] = af;
    row[L.z1 + 2 * H1 + u] = ag;
    row[L.z1 + 3 * H1 + u] = ao;
    row[L.tc1 + u] = tc;
    row[L.in2 + u] = ao * tc;
  }
  // forward, layer 2
  for (int u = 0; u < H2; ++u) {
    float z[4];
    gate_dots(z, W2 + static_cast<int64_t>(u) * K2, static_cast<int64_t>(H2) * K2, B2 + u, H2, row + L.in2, K2);
    const float ai = sigmoid_acc(z[0]), af = sigmoid_acc(z[1]), ag = tanhf(z[2]), ao = sigmoid_acc(z[3]);
    const float c = state[static_cast<int64_t>(2 * H1 + H2 + u) * n + i];
    const float cn = af * c + ai * ag;
    const float tc = tanhf(cn);
    row[L.z2 + u] = ai;
    row[L.z2 + H2 + u] = af;
    row[L.z2 + 2 * H2 + u] = ag;
    row[L.z2 + 3 * H2 + u] = ao;
    row[L.tc2 + u] = tc;
    row[L.h2n + u] = ao * tc;
  }
  const float du = a.d_update[i] * a.scale;
  row[L.dz3] = du;

  // backward, layer 2
  for (int u = 0; u < H2; ++u) {
    const int64_t hrow = static_cast<int64_t>(2 * H1 + u) * n + i;
    const int64_t crow = static_cast<int64_t>(2 * H1 + H2 + u) * n + i;
    const float dh = du * L2L_LDG(WO + u) + (has_dns ? dns[hrow] : 0.f);
    const float dcn = has_dns ? dns[crow] : 0.f;
    const float ai = row[L.z2 + u], af = row[L.z2 + H2 + u], ag = row[L.z2 + 2 * H2 + u],
                ao = row[L.z2 + 3 * H2 + u];
    const float tc = row[L.tc2 + u];
    const float c = state[crow];
    const float dc = dh * ao * (1.f - tc * tc) + dcn;
    d_state[crow] = dc * af;
    row[L.z2 + u] = dc * ag * ai * (1.f - ai);
    row[L.z2 + H2 + u] = dc * c * af * (1.f - af);
    row[L.z2 + 2 * H2 + u] = dc * ai * (1.f - ag * ag);
    row[L.z2 + 3 * H2 + u] = dh * tc * ao * (1.f - ao);
  }
  // d(in2) = W2^T dz2: the h1' part into row[dh1] (+ upstream), the h2 part to d_state
  for (int k0 = 0; k0 < K2; k0 += 4) {
    const int kn = K2 - k0 < 4 ? K2 - k0 : 4;
    float sv[4];
    wt_dots4(sv, W2, K2, k0, kn, row + L.z2, 4 * H2);
    for (int j = 0; j < kn; ++j) {
      const int k = k0 + j;
      if (k < H1) {
        row[L.dh1 + k] = sv[j] + (has_dns ? dns[static_cast<int64_t>(k) * n + i] : 0.f);
      } else {
        d_state[static_cast<int64_t>(2 * H1 + (k - H1)) * n + i] = sv[j];
      }
    }
  }
  // backward, layer 1
  for (int u = 0; u < H1; ++u) {
    const int64_t crow = static_cast<int64_t>(H1 + u) * n + i;
    const float dh = row[L.dh1 + u];
    const float dcn = has_dns ? dns[crow] : 0.f;
    const float ai = row[L.z1 + u], af = row[L.z1 + H1 + u], ag = row[L.z1 + 2 * H1 + u],
                ao = row[L.z1 + 3 * H1 + u];
    const float tc = row[L.tc1 + u];
    const float c = state[crow];
    const float dc = dh * ao * (1.f - tc * tc) + dcn;
    d_state[crow] = dc * af;
    row[L.z1 + u] = dc * ag * ai * (1.f - ai);
    row[L.z1 + H1 + u] = dc * c * af * (1.f - af);
    row[L.z1 + 2 * H1 + u] = dc * ai * (1.f - ag * ag);
    row[L.z1 + 3 * H1 + u] = dh * tc * ao * (1.f - ao);
  }
  // d(in1) = W1^T dz1: the x part to d_grad, the h1 part to d_state
  float dxs0 = 0.f, dxs1 = 0.f;
  for (int k0 = 0; k0 < K1; k0 += 4) {
    const int kn = K1 - k0 < 4 ? K1 - k0 : 4;
    float sv[4];
    wt_dots4(sv, W1, K1, k0, kn, row + L.z1, 4 * H1);
    for (int j = 0; j < kn; ++j) {
      const int k = k0 + j;
      if (k == 0) dxs0 = sv[j];
      else if (k < D) dxs1 = sv[j];
      else d_state[static_cast<int64_t>(k - D) * n + i] = sv[j];
    }
  }
  // 0 at +-inf (dx0 = dx1 = 0 there), also when the upstream dxs is not finite.
  a.d_grad[i] = g_infinite ? 0.f : (D == 1 ? dxs0 * dx0 : dxs0 * dx0 + dxs1 * dx1);
}

// Parameter index p -> (dz slot, input slot) in a coordinate's row: d_phi[p] = sum_c row_c[zs] * row_c[is].
__host__ __device__ inline void bwd_param_slots(const Dims& d, const BwdLayout& L, int p, int& zs, int& is) {
  const int nw1 = 4 * d.h1 * d.k1, nb1 = 4 * d.h1, nw2 = 4 * d.h2 * d.k2, nb2 = 4 * d.h2, nwo = d.h2;
  int q = p;
  if (q < nw1) {
    zs = L.z1 + q / d.k1; is = L.in1 + q % d.k1;
  } else if ((q -= nw1) < nb1) {
    zs = L.z1 + q; is = L.one;
  } else if ((q -= nb1) < nw2) {
    zs = L.z2 + q / d.k2; is = L.in2 + q % d.k2;
  } else if ((q -= nw2) < nb2) {
    zs = L.z2 + q; is = L.one;
  } else if ((q -= nb2) < nwo) {
    zs = L.dz3; is = L.h2n + q;
  } else {
    zs = L.dz3; is = L.one;
  }
}

// Phase B, parameter p: sum over the `valid` rows of the tile (4 independent chains).
__host__ __device__ inline float bwd_param_sum(const Dims& d, const BwdLayout& L, const float* rows, int valid,
                                               int p) {
  int zs, is;
  bwd_param_slots(d, L, p, zs, is);
  const float* rz = rows + zs;
  const float* ri = rows + is;
  const int pitch = L.pitch;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int c = 0;
  for (; c + 3 < valid; c += 4) {
    s0 = fmaf(rz[c * pitch], ri[c * pitch], s0);
    s1 = fmaf(rz[(c + 1) * pitch], ri[(c + 1) * pitch], s1);
    s2 = fmaf(rz[(c + 2) * pitch], ri[(c + 2) * pitch], s2);
    s3 = fmaf(rz[(c + 3) * pitch], ri[(c + 3) * pitch], s3);
  }
  for (; c < valid; ++c) s0 = fmaf(rz[c * pitch], ri[c * pitch], s0);
  return (s0 + s1) + (s2 + s3);
}

__global__ void __launch_bounds__(128) bwd_kernel(BwdArgs a, int acc_in_smem) {
  extern __shared__ float smem_b[];
  const int T = blockDim.x;
  const int tid = threadIdx.x;
  const int P = static_cast<int>(a.d.np);
  float* acc = smem_b;                                        // [P] when acc_in_smem
  float* rows = smem_b + (acc_in_smem ? ((P + 3) & ~3) : 0);  // [T][pitch]
  if (acc_in_smem)
    for (int p = tid; p < P; p += T) acc[p] = 0.f;
  const int64_t n = a.n;
  const int64_t num_tiles = (n + T - 1) / T;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t i = tile * T + tid;
    const int valid = static_cast<int>(n - tile * T < T ? n - tile * T : T);
    if (i < n) bwd_coord(a, rows + tid * a.L.pitch, i);
    __syncthreads();
    // Thread tid owns parameters p = tid + k T (no two threads touch one accumulator).
    for (int p = tid; p < P; p += T) {
      const float s = bwd_param_sum(a.d, a.L, rows, valid, p);
      if (acc_in_smem) acc[p] += s;
      else atomicAdd(a.d_phi + p, s);
    }
    __syncthreads();
  }
  if (acc_in_smem)
    for (int p = tid; p < P; p += T) atomicAdd(a.d_phi + p, acc[p]);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 0, optin_smem = 0, major = 0;
};

const char* device_info(DeviceInfo& info) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&info.optin_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, dev);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

const char* launch_status() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

const char* check_common(const StepConfig& cfg, const float* phi, int64_t n) {
  if (const char* m = validate_config(cfg)) return m;
  if (n < 0) return "lstm_step (CUDA): n must be non-negative";
  if (phi == nullptr) return "lstm_step (CUDA): phi is null";
  const int64_t s = cfg.state_rows();
  if (n > 0 && s > INT64_MAX / n) return "lstm_step (CUDA): state size overflows";
  return nullptr;
}

const char* launch_fp32_forward(const Dims& d, const float* phi, const float* grad, const float* state,
                                float scale, int64_t n, float* update, float* new_state, cudaStream_t stream) {
  DeviceInfo info;
  if (const char* m = device_info(info)) return m;
  const int64_t per_thread = static_cast<int64_t>(d.k1 + d.k2) * sizeof(float);
  int T = 128;
  while (T > 8 && per_thread * T > info.optin_smem) T /= 2;
  const int64_t smem = per_thread * T;
  if (smem > info.optin_smem)
    return "lstm_step (CUDA): hidden sizes too large for the CUDA kernel's shared memory";
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(fwd_fp32_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  const int64_t blocks = (n + T - 1) / T;
  if (blocks > 0x7fffffffLL) return "lstm_step (CUDA): n too large";
  fwd_fp32_kernel<<<static_cast<unsigned>(blocks), T, static_cast<size_t>(smem), stream>>>(
      d, phi, grad, state, scale, n, update, new_state);
  return launch_status();
}

struct Tf32Variant {
  int m_tiles = 2;  // 16 * m_tiles coordinates per warp tile (1 or 2)
  int stages = 2;   // shared-memory ring depth (2 or 3)
  int act = 1;      // 1: ex2.approx + rcp.approx (default: faster and more accurate on H200); 0: tanh.approx
  int warps = 0;    // warps per block; 0: as many as fit (at most 8 for m_tiles 2, 12 for 1)
};

template <int D, int MT, int STAGES, int ACT>
const char* launch_tf32_impl(const Dims& d, int warps_req, const float* phi, const float* grad,
                             const float* state, float scale, int64_t n, float* update, float* new_state,
                             cudaStream_t stream, bool* launched) {
  using S = FastShape<5, 5, D, MT>;
  *launched = false;
  DeviceInfo info;
  if (const char* m = device_info(info)) return m;
  if (info.major < 8) return nullptr;  // no TF32 mma: caller falls back to FP32
  const int64_t fixed = static_cast<int64_t>(S::FIXED_FLOATS) * 4;
  const int64_t per_warp = static_cast<int64_t>(STAGES) * S::STAGE_FLOATS * 4;
  const int max_warps = MT == 2 ? 8 : 12;  // = the kernel's __launch_bounds__
  int warps = warps_req > 0 ? (warps_req < max_warps ? warps_req : max_warps) : max_warps;
  while (warps > 1 && fixed + warps * per_warp > info.optin_smem) --warps;
  const int64_t smem = fixed + warps * per_warp;
  if (smem > info.optin_smem) return nullptr;  // does not fit: FP32 fallback
  auto kern = fwd_tf32_kernel<5, 5, D, MT, STAGES, ACT>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return cudaGetErrorString(e);
  const int64_t tiles = (n + S::C - 1) / S::C;
  int64_t blocks = (tiles + warps - 1) / warps;
  int per_sm = 1;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, warps * 32, static_cast<size_t>(smem));
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (per_sm < 1) per_sm = 1;
  const int64_t max_blocks = static_cast<int64_t>(info.sms) * per_sm;
  if (blocks > max_blocks) blocks = max_blocks;
  const bool vec16 = (n % 4 == 0) && (reinterpret_cast<uintptr_t>(grad) % 16 == 0) &&
                     (reinterpret_cast<uintptr_t>(state) % 16 == 0);
  kern<<<static_cast<unsigned>(blocks), warps * 32, static_cast<size_t>(smem), stream>>>(
      phi, grad, state, scale, n, update, new_state, d.mode, 1.f / d.param, d.thresh, d.expp, vec16 ? 1 : 0);
  *launched = true;
  return launch_status();
}

template <int D>
const char* launch_tf32_d(const Dims& d, const Tf32Variant& v, const float* phi, const float* grad,
                          const float* state, float scale, int64_t n, float* update, float* new_state,
                          cudaStream_t stream, bool* launched) {
#define L2L_TF32_CASE(MT, ST, ACT)                                                                         \
  if (v.m_tiles == MT && v.stages == ST && v.act == ACT)                                                   \
    return launch_tf32_impl<D, MT, ST, ACT>(d, v.warps, phi, grad, state, scale, n, update, new_state, stream, \
                                            launched);
  L2L_TF32_CASE(2, 2, 1)  // the default
  L2L_TF32_CASE(2, 2, 0)
  L2L_TF32_CASE(2, 3, 0)
  L2L_TF32_CASE(1, 2, 1)
#undef L2L_TF32_CASE
  *launched = false;
  return "lstm_step (CUDA): unknown TF32 kernel variant";
}

const char* forward_impl(const StepConfig& cfg, bool tf32, const Tf32Variant& v, const float* phi,
                         const float* grad, const float* state, float scale, int64_t n, float* update,
                         float* new_state, void* stream_ptr) {
  if (const char* m = check_common(cfg, phi, n)) return m;
  if (n == 0) return nullptr;
  if (!grad || !state || !update || !new_state) return "lstm_step_forward_cuda: null pointer";
  const Dims d = make_dims(cfg);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (tf32 && cfg.hidden1 == 20 && cfg.hidden2 == 20) {
    bool launched = false;
    const char* m = d.d == 1 ? launch_tf32_d<1>(d, v, phi, grad, state, scale, n, update, new_state, stream, &launched)
                             : launch_tf32_d<2>(d, v, phi, grad, state, scale, n, update, new_state, stream, &launched);
    if (m != nullptr || launched) return m;
  }
  return launch_fp32_forward(d, phi, grad, state, scale, n, update, new_state, stream);
}

}  // namespace

const char* lstm_step_forward_cuda(const StepConfig& cfg, GpuMath math, const float* phi, const float* grad,
                                   const float* state, float scale, int64_t n, float* update, float* new_state,
                                   void* stream) {
  if (math != GpuMath::kFP32 && math != GpuMath::kTF32) return "lstm_step_forward_cuda: unknown GpuMath";
  return forward_impl(cfg, math == GpuMath::kTF32, Tf32Variant{}, phi, grad, state, scale, n, update, new_state,
                      stream);
}

// Internal tuning hook (declared in pybind_cuda.cc, used by tools/gpu_check.py): the TF32 kernel with an
// explicit tile shape. Not part of the public contract.
const char* lstm_step_forward_cuda_variant(const StepConfig& cfg, int m_tiles, int stages, int act, int warps,
                                           const float* phi, const float* grad, const float* state, float scale,
                                           int64_t n, float* update, float* new_state, void* stream) {
  Tf32Variant v;
  v.m_tiles = m_tiles;
  v.stages = stages;
  v.act = act;
  v.warps = warps;
  return forward_impl(cfg, true, v, phi, grad, state, scale, n, update, new_state, stream);
}

const char* lstm_step_backward_cuda(const StepConfig& cfg, const float* phi, const float* grad, const float* state,
                                    float scale, int64_t n, const float* d_update, const float* d_new_state,
                                    float* d_phi, float* d_grad, float* d_state, void* stream_ptr) {
  if (const char* m = check_common(cfg, phi, n)) return m;
  if (d_phi == nullptr) return "lstm_step_backward_cuda: d_phi is null";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const Dims d = make_dims(cfg);
  cudaError_t e = cudaMemsetAsync(d_phi, 0, static_cast<size_t>(d.np) * sizeof(float), stream);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (n == 0) return nullptr;
  if (!grad || !state || !d_update || !d_grad || !d_state) return "lstm_step_backward_cuda: null pointer";
  DeviceInfo info;
  if (const char* m = device_info(info)) return m;
  const BwdLayout L = make_bwd_layout(d);
  const int64_t acc_bytes = ((d.np + 3) & ~int64_t(3)) * 4;
  int T = 0;
  int acc_in_smem = 0;
  int64_t smem = 0;
  for (int pass = 0; pass < 2 && T == 0; ++pass) {
    const int want_acc = pass == 0 ? 1 : 0;
    for (int t = 64; t >= 8; t /= 2) {
      const int64_t s = (want_acc ? acc_bytes : 0) + static_cast<int64_t>(t) * L.pitch * 4;
      if (s <= info.optin_smem) {
        T = t;
        acc_in_smem = want_acc;
        smem = s;
        break;
      }
    }
  }
  if (T == 0) return "lstm_step_backward_cuda: hidden sizes too large for the CUDA kernel's shared memory";
  e = cudaFuncSetAttribute(bwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return cudaGetErrorString(e);
  int per_sm = 1;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, bwd_kernel, T, static_cast<size_t>(smem));
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (per_sm < 1) per_sm = 1;
  const int64_t tiles = (n + T - 1) / T;
  int64_t blocks = static_cast<int64_t>(info.sms) * per_sm;
  if (blocks > tiles) blocks = tiles;
  const BwdArgs args{d, L, phi, grad, state, scale, n, d_update, d_new_state, d_phi, d_grad, d_state};
  bwd_kernel<<<static_cast<unsigned>(blocks), T, static_cast<size_t>(smem), stream>>>(args, acc_in_smem);
  return launch_status();
}

__global__ void add_kernel(float* dst, const float* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] += src[i];
}

const char* add_inplace_cuda(float* dst, const float* src, int64_t n, void* stream_ptr) {
  if (n <= 0) return nullptr;
  if (!dst || !src) return "add_inplace_cuda: null pointer";
  const int64_t blocks = (n + 255) / 256 < 1024 ? (n + 255) / 256 : 1024;
  add_kernel<<<static_cast<unsigned>(blocks), 256, 0, static_cast<cudaStream_t>(stream_ptr)>>>(dst, src, n);
  return launch_status();
}

}  // namespace l2l
