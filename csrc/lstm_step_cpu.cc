// CPU kernels of the coordinatewise LSTM step (contract: lstm_step.h). No TensorFlow, no pybind11.
//
// Layout of the work. Coordinates are processed in chunks of kChunk (256) consecutive coordinates. For a
// chunk, the rows of the state it needs as GEMM inputs (h1, h2) are copied once into small contiguous local
// buffers ([rows][kLd], coordinates innermost; the [S, N] state rows are N floats apart in memory and would
// alias in the L1 cache), the preprocessed gradient features are written next to them, and then each
// sub-block of kSub coordinates (4 SIMD vectors with AVX-512: 64 coordinates) runs the gate products of a layer
// as a register-tiled GEMM: for each LSTM unit j, its 4 gates (i, f, g, o) x 4 coordinate vectors are 16
// accumulators, the packed weights W[{i,f,g,o} j][k] are broadcast, the inputs are vector loads; the gates go to
// a small [unit][gate][coordinate] buffer (in L1). The pointwise LSTM math of unit j then reads its 4 gate rows
// and c[j], and writes h'[j], c'[j] straight to the output rows: every state element is read once and written
// once.
//
// Vector code: GCC vector extensions (portable; lowered to AVX-512, AVX2 or SSE by the -m flags the file is
// compiled with; setup.py uses -march=native unless L2L_TF_MARCH says otherwise) plus a few intrinsics where the
// ISA has something better (fma, rcp14, reduce, scalef, streaming stores). Transcendentals are our own branch-free
// fp32 versions (max relative error < 5e-7, except exp on AVX-512: < 1.1e-6, see there):
//   exp(-x), AVX-512 (with DQ): 2^y, y = -x log2(e) rounded once (that rounding dominates the error: relative
//     < 1.1e-6 for |x| < 22, where sigmoid > 2e-10; < 4e-6 beyond, where sigmoid is < 2e-10 or within 1e-9 of 1),
//     y capped at 115, f = y - floor(y) by vreduce, 2^f by a degree-5 polynomial on [0, 1), scaled by scalef;
//     9 operations. Elsewhere: Cephes-style range reduction (n = round(-x / ln 2), two-part ln 2) + degree-5
//     minimax polynomial, x clamped to [-80, 80] (sigmoid then is within 2e-35 of the exact value outside);
//   sigmoid(x) = 1 / (1 + exp(-x)), exactly 0 for x < -80 (where the exact value is below 1.9e-35);
//   tanh: the [9/8] odd/even rational minimax approximation also used by Eigen (so by TensorFlow's own CPU
//     tanh), clamped where it evaluates to +-1;
//   in the forward pass sigmoid(a) * tanh(b) is formed as p_b / ((1 + exp(-a)) q_b): one reciprocal, not two
//     (also exactly 0 for a < -80);
//   log (preprocessing only, once per coordinate): the FreeBSD/musl logf reduction and polynomial, with
//     subnormal inputs rescaled first.
// Reciprocals use rcp14 + one Newton step (~1 ulp) on AVX-512, a division elsewhere.
//
// Memory: the rows of a chunk lie N floats apart (80 rows of state), more streams than the hardware prefetchers
// follow, so the next chunk is prefetched into L2 from the compute loops of the current one; outputs whose rows
// are 64-byte aligned (N % 16 == 0 and aligned base pointers, as TF allocates) are written with streaming
// stores (no read-for-ownership), others with ordinary stores after a prefetch for writing.
//
// Backward: nothing is saved by the forward pass; the backward recomputes the forward activations of a chunk
// from (grad, state) into local buffers, then runs the chain rule. The step is memory-bound on the GPU and the
// recomputation costs arithmetic only (one extra forward GEMM), while saving the 5 x 40 activations per
// coordinate would more than double the memory traffic of both passes.
//
// Aliasing: new_state may be the same buffer as state, update the same as grad (forward), and d_state the
// same as d_new_state, d_grad the same as d_update (backward): within a chunk every element is read before
// the element at the same position is written. The TF op uses this to forward its input buffers.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <chrono>
#include <numeric>
#include <new>
#include <vector>

#include "lstm_step.h"

// bfloat16 GEMMs (StepConfig::bf16_matmul): vdpbf16ps, in AVX512_BF16 builds only.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define L2L_HAS_BF16 1
#else
#define L2L_HAS_BF16 0
#endif

#if defined(__SSE2__)
// GCC 12 warns about the deliberately undefined pass-through operand inside the AVX-512 min/max intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#include <x86intrin.h>
#endif

namespace l2l {

const char* validate_config(const StepConfig& cfg) {
  if (cfg.hidden1 < 1 || cfg.hidden1 > 4096) return "hidden1 must be in [1, 4096]";
  if (cfg.hidden2 < 1 || cfg.hidden2 > 4096) return "hidden2 must be in [1, 4096]";
  if (cfg.preprocess != Preprocess::kNone && cfg.preprocess != Preprocess::kPaper &&
      cfg.preprocess != Preprocess::kClamped) {
    return "preprocess must be kNone (0), kPaper (1) or kClamped (2)";
  }
  if (cfg.preprocess != Preprocess::kNone &&
      !(cfg.preprocess_param >= kPreprocessParamMin && cfg.preprocess_param <= kPreprocessParamMax)) {  // NaN fails
    return "preprocess_param must be in [0.001, 80] for the 'paper' and 'clamped' preprocessing (exp(p) must be a "
           "normal float32 number)";
  }
#if !L2L_HAS_BF16
  if (cfg.bf16_matmul) {
    return "matmul_precision 'bfloat16' needs CPU kernels built with AVX512_BF16 (this build's -march lacks it; "
           "rebuild with L2L_TF_MARCH=native on a CPU that has it)";
  }
#endif
  return nullptr;
}

namespace {
thread_local PhaseCycles* t_phase_cycles = nullptr;

uint64_t ticks_now() {
#if defined(__SSE2__)
  return __rdtsc();
#else
  return 0;
#endif
}
}  // namespace

PhaseCycles* set_thread_phase_cycles(PhaseCycles* counters) {
  PhaseCycles* previous = t_phase_cycles;
  t_phase_cycles = counters;
  return previous;
}

const char* phase_name(int phase) {
  static const char* names[kNumPhases] = {"stage", "gates1", "cell1", "gates2", "cell2", "cell_backward2",
                                          "input_grad2", "cell_backward1", "input_grad1", "weight_grad", "finish"};
  return phase >= 0 && phase < kNumPhases ? names[phase] : "?";
}

namespace {

// ---------------------------------------------------------------------------------------------------------
// SIMD layer.
#if defined(__AVX512F__)
#define L2L_VW 16
#elif defined(__AVX__)
#define L2L_VW 8
#else
#define L2L_VW 4
#endif
constexpr int kW = L2L_VW;  // floats per vector

typedef float vf __attribute__((vector_size(4 * L2L_VW), may_alias));
typedef int32_t vi __attribute__((vector_size(4 * L2L_VW), may_alias));
typedef uint32_t vu __attribute__((vector_size(4 * L2L_VW), may_alias));
typedef float vfu __attribute__((vector_size(4 * L2L_VW), aligned(4), may_alias));

#define L2L_INLINE inline __attribute__((always_inline))

L2L_INLINE vf splat(float x) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(x);
#elif L2L_VW == 8
  return _mm256_set1_ps(x);
#elif defined(__SSE2__)
  return _mm_set1_ps(x);
#else
  return x - vf{};  // exact for every x (unlike 0 + x for x = -0), so it folds to a broadcast
#endif
}
L2L_INLINE vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
// A load kept in a register: GCC otherwise folds a vector reused by several FMAs into each of them as a memory
// operand, so a register-tiled GEMM issues 4 loads per FMA group instead of 1 and runs at the load ports' rate
// (~80% of the FMA peak on the gate and input-gradient GEMMs) instead of the FMA units'. Whether GCC folds depends
// on flags: without -fwrapv (which setup.py and the Bazel build get from Python's CFLAGS) it folded all 20 loads
// of the float32 weight gradient's tile too, and that phase took ~390 instead of ~280 ticks per coordinate.
L2L_INLINE vf load_reg(const float* p) {
  vf v = load(p);
#if defined(__GNUC__)
  asm("" : "+v"(v));
#endif
  return v;
}
L2L_INLINE vf loadu(const float* p) { return *reinterpret_cast<const vfu*>(p); }
L2L_INLINE void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
L2L_INLINE void storeu(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// Non-temporal store of a full vector to a 64-byte aligned address (a whole cache line with AVX-512): the
// outputs are written once and not read back here, so they bypass the caches and skip the read-for-ownership.
L2L_INLINE void stream(float* p, vf v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, v);
#elif L2L_VW == 8
  _mm256_stream_ps(p, v);
#elif defined(__SSE2__)
  _mm_stream_ps(p, v);
#else
  storeu(p, v);
#endif
}
L2L_INLINE void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

L2L_INLINE vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__) && L2L_VW == 8
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

// min/max returning the second operand when either is NaN (the x86 semantics): pass the data second so that
// NaN propagates.
L2L_INLINE vf vmin(vf a, vf b) {
#if defined(__AVX512F__)
  return _mm512_min_ps(a, b);
#elif L2L_VW == 8
  return _mm256_min_ps(a, b);
#else
  return a < b ? a : b;
#endif
}
L2L_INLINE vf vmax(vf a, vf b) {
#if defined(__AVX512F__)
  return _mm512_max_ps(a, b);
#elif L2L_VW == 8
  return _mm256_max_ps(a, b);
#else
  return a > b ? a : b;
#endif
}
L2L_INLINE vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }
L2L_INLINE vf vsign(vf x) {  // -1, 0, +1 (0 for +-0), NaN for NaN
  vf s = (vf)(((vi)x & int32_t(0x80000000)) | 0x3f800000);
  s = x == 0.0f ? splat(0.0f) : s;
  return x != x ? x : s;
}

// 1/d for finite, positive, normal d (all our uses).
L2L_INLINE vf rcp(vf d) {
#if defined(__AVX512F__)
  vf r = _mm512_rcp14_ps(d);
  return vfma(r, vfma(-d, r, splat(1.0f)), r);
#else
  return splat(1.0f) / d;
#endif
}

// exp(-x) for x clamped to [-80, 80]: 2^n e^r with n = round(-x / ln 2), r = -x - n ln 2 (ln 2 in two parts,
// n * hi exact), e^r by a degree-5 minimax polynomial (Eigen's coefficients; ~2 ulp). We evaluate in
// r' = -r = x + n ln 2, so the odd coefficients carry the sign.
#if defined(__AVX512F__) && defined(__AVX512DQ__)
// AVX-512: exp(-x) = 2^y, y = -x log2(e) in one rounding (relative error of the result <= |y| 2^-24 ln 2 plus
// that of the rounded constant: < 1.1e-6 for |x| < 22, where sigmoid > 2e-10, < 4e-6 up to the cap), y capped at
// 115 (so that 1 + exp(-x) and its products below stay finite; NaN propagates), f = y - floor(y) in [0, 1) by
// vreduce (exact), 2^f by a degree-5 polynomial (relative error < 1.5e-7 in fp32), times 2^floor(y) by scalef
// (which floors its exponent operand itself, and saturates to 0 for y -> -inf: no lower clamp). 9 operations.
L2L_INLINE vf exp_neg(vf x) {
  const vf y = vmin(splat(115.0f), x * splat(-1.44269504088896341f));
  const vf f = _mm512_reduce_ps(y, 0x01);  // imm 0x01: round down, 0 fraction bits kept
  vf p = vfma(splat(1.8775736680e-03f), f, splat(8.9893480763e-03f));
  p = vfma(p, f, splat(5.5826310068e-02f));
  p = vfma(p, f, splat(2.4015362561e-01f));
  p = vfma(p, f, splat(6.9315308332e-01f));
  p = vfma(p, f, splat(9.9999994040e-01f));
  return _mm512_scalef_ps(p, y);
}
#else
L2L_INLINE vf exp_neg(vf x) {
  x = vmax(splat(-80.0f), vmin(splat(80.0f), x));  // NaN propagates
  const vf magic = splat(12582912.0f);               // 1.5 * 2^23: adding it rounds to an integer
  vf t = vfma(x, splat(-1.44269504088896341f), magic);
  vf n = t - magic;
  vf rn = vfma(n, splat(0.693145751953125f), x);
  rn = vfma(n, splat(1.428606765330187045e-06f), rn);  // rn = -r
  vf r2 = rn * rn;
  vf pe = vfma(r2, splat(4.1898667812347412109375e-2f), splat(0.49999141693115234375f));
  vf po = vfma(r2, splat(-8.33471305668354034423828125e-3f), splat(-0.16666877269744873046875f));
  vf p = vfma(rn, po, pe);
  p = vfma(r2, p, splat(1.0f) - rn);
#if defined(__AVX512F__)
  return _mm512_scalef_ps(p, n);
#else
  // The low bits of t hold n: shift them into the exponent field (p * 2^n stays normal in this range).
  return (vf)((vu)p + ((vu)t << 23));
#endif
}
#endif

// 1 / d, or exactly 0 where x < -80 (NaN x kept): the reciprocals of sigmoid(x) and of sigmoid(x) * tanh(b),
// whose exact values are below 1.9e-35 (times |tanh| <= 1) there. Without the flush exp_neg's cap (or clamp) near
// -80 would leave ~2e-35 for any x below, and the backward's d_phi multiplies sigmoid' by the layer's input: with
// the raw gradient as input (preprocess "none") at |g| near FLT_MAX that made a gate's d_phi column ~1e4 where the
// exact one (and TF's, and the GPU kernel's) is 0.
constexpr float kSigmoidZeroBelow = -80.0f;
L2L_INLINE vf rcp_unless_below(vf x, vf d) {
#if defined(__AVX512F__)
  // The flush rides on the Newton step's FMA (zero-masked): one compare more than rcp().
  const __mmask16 live = _mm512_cmp_ps_mask(x, splat(kSigmoidZeroBelow), _CMP_NLT_UQ);  // x >= -80, or NaN
  const vf r = _mm512_rcp14_ps(d);
  return _mm512_maskz_fmadd_ps(live, r, vfma(-d, r, splat(1.0f)), r);
#else
  return x < splat(kSigmoidZeroBelow) ? splat(0.0f) : rcp(d);  // NaN compares false: kept
#endif
}

L2L_INLINE vf sigmoid(vf x) { return rcp_unless_below(x, splat(1.0f) + exp_neg(x)); }

// tanh(x) = p / q: rational minimax approximation (numerator odd degree 9, denominator even degree 8),
// coefficients from Eigen's ptanh_float (rminimax), so the same as TensorFlow's own CPU tanh; the clamp is
// where it evaluates to exactly +-1. q is in [1, 240].
L2L_INLINE void tanh_pq(vf x, vf* p_out, vf* q_out) {
  const float c = 8.01773357391357422f;
  x = vmax(splat(-c), vmin(splat(c), x));
  vf x2 = x * x;
  vf p = vfma(splat(1.394553628e-8f), x2, splat(2.102733560e-5f));
  p = vfma(p, x2, splat(3.520756727e-3f));
  p = vfma(p, x2, splat(1.340216100e-1f));
  *p_out = vfma(x2 * x, p, x);
  vf q = vfma(splat(8.015776984e-7f), x2, splat(3.326951409e-4f));
  q = vfma(q, x2, splat(2.597254514e-2f));
  q = vfma(q, x2, splat(4.673548340e-1f));
  *q_out = vfma(q, x2, splat(1.0f));
}

L2L_INLINE vf tanh_(vf x) {
  vf p, q;
  tanh_pq(x, &p, &q);
  return p * rcp(q);
}

// sigmoid(a) * tanh(b) with one reciprocal: p_b / ((1 + exp(-a)) q_b) (at most ~1e35 * 240: no overflow).
L2L_INLINE vf sigmoid_times_tanh(vf a, vf b) {
  vf p, q;
  tanh_pq(b, &p, &q);
  return p * rcp_unless_below(a, (splat(1.0f) + exp_neg(a)) * q);
}

// Natural log for x >= 0 (or NaN); log(0) = -inf, log(inf) = inf.
L2L_INLINE vf log_(vf x) {
  vi sub = x < splat(FLT_MIN);
  vf xs = sub ? x * splat(8388608.0f) : x;  // subnormals: scale by 2^23
  vu ix = (vu)xs + (0x3f800000u - 0x3f3504f3u);
  vi k = (vi)(ix >> 23) - 0x7f + (sub & -23);
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  vf f = (vf)ix - splat(1.0f);  // in [sqrt(1/2) - 1, sqrt(2) - 1]
  vf s = f / (splat(2.0f) + f);
  vf z = s * s;
  vf w = z * z;
  vf t1 = w * vfma(w, splat(0.24279078841f), splat(0.40000972152f));
  vf t2 = z * vfma(w, splat(0.28498786688f), splat(0.66666662693f));
  vf hfsq = splat(0.5f) * f * f;
  vf dk = __builtin_convertvector(k, vf);
  vf r = s * (hfsq + (t2 + t1)) + dk * splat(9.0580006145e-06f) - hfsq + f + dk * splat(6.9313812256e-01f);
  r = x == 0.0f ? splat(-INFINITY) : r;
  r = x == splat(INFINITY) ? x : r;
  return x != x ? x : r;
}

// ---------------------------------------------------------------------------------------------------------
// Tiling.
constexpr int kNV = (kW == 16) ? 4 : 2;  // vectors per sub-block (register tile width)
constexpr int kSub = kNV * kW;            // coordinates per sub-block
constexpr int kChunk = 256;               // coordinates per chunk (multiple of kSub for every kW)
constexpr int kLd = kChunk + 16;          // local row stride (floats): 64-byte aligned, not a power of 2
constexpr int kKR = 4;                    // rows of W^T per tile in the input-gradient GEMM
constexpr int kGR = (kW == 16) ? 4 : 2;   // weight-gradient tile: gate rows
constexpr int kKC = (kW == 16) ? 5 : 3;   //                       input columns
// In bf16, the weight gradient is a GEMM over vectors of gates instead (weight_grad_gates): tiles of
constexpr int kWG = 5;                     // vectors of gates x kKC inputs,
constexpr int kPairsPerStep = 4;           // a Prefetcher::step() every 4 coordinate pairs of their long loops
static_assert(kChunk % kSub == 0, "chunk must hold whole sub-blocks");
static_assert(kActivationGroup % kSub == 0 && kChunk % kActivationGroup == 0,
              "a sub-block lies in one block of the saved activations, a chunk holds whole blocks");

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

float* aligned_floats(int64_t count) {
  void* p = nullptr;
  if (posix_memalign(&p, 64, sizeof(float) * std::max<int64_t>(count, 16)) != 0) throw std::bad_alloc();
  return static_cast<float*>(p);
}

// Software prefetch of the next chunk. Its rows lie N floats apart (80 rows for the state alone), far more
// concurrent streams than the hardware prefetchers track, so without this every chunk waits on DRAM latency.
// The lines of the next chunk are requested into L2 a few at a time from the compute loops of this chunk.
class Prefetcher {
 public:
  void clear() { ns_ = 0; si_ = row_ = line_ = 0; total_ = 0; }
  void add(const float* base, int64_t ld_floats, int rows, int64_t cols, bool write) {
    if (!base || rows <= 0 || cols <= 0 || ns_ == kMax) return;
    const int lines = int((cols * 4 + 63) / 64);
    s_[ns_++] = Stream{reinterpret_cast<const char*>(base), ld_floats * 4, rows, lines, write};
    total_ += int64_t(rows) * lines;
  }
  // Spread the lines over `calls` calls of step().
  void plan(int calls) { per_call_ = int((total_ + calls - 1) / std::max(calls, 1)) + 1; }
  // A run of lines of one row per inner loop (a prefetch and a pointer step per line: the backward issues ~23 lines
  // per coordinate, so the bookkeeping per line counts).
  L2L_INLINE void step() {
    for (int c = per_call_; c > 0 && si_ < ns_;) {
      const Stream& st = s_[si_];
      const int n = std::min(c, st.lines - line_);
      const char* p = st.base + row_ * st.ld + int64_t(line_) * 64;
      const char* const e = p + int64_t(n) * 64;
      if (st.write) {
        for (; p < e; p += 64) __builtin_prefetch(p, 1, 2);
      } else {
        for (; p < e; p += 64) __builtin_prefetch(p, 0, 2);
      }
      c -= n;
      line_ += n;
      if (line_ == st.lines) {
        line_ = 0;
        if (++row_ == st.rows) {
          row_ = 0;
          ++si_;
        }
      }
    }
  }

 private:
  struct Stream {
    const char* base;
    int64_t ld;
    int rows, lines;
    bool write;
  };
  static constexpr int kMax = 8;
  Stream s_[kMax];
  int ns_ = 0, si_ = 0, row_ = 0, line_ = 0, per_call_ = 0;
  int64_t total_ = 0;
};

// Where one chunk's activations are: sub-block s's rows start at at(s), lda floats apart. Blocked: a kernel output
// in the saved layout (lstm_step.h), p at the chunk's first block; staged: scratch rows kLd apart (act1_).
struct ActView {
  float* p = nullptr;
  int64_t lda = 0, group = 0;  // floats between rows, and from one block of kActivationGroup columns to the next
  L2L_INLINE float* at(int s) const { return p + (s / kActivationGroup) * group + s % kActivationGroup; }
};

bool aligned64(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }

// Per-thread scratch of the Kernels (grow-only; one forward and one backward Kernel per thread at a time).
float* thread_scratch(int64_t floats, bool backward) {
  thread_local std::unique_ptr<float, AlignedFree> buf[2];
  thread_local int64_t size[2] = {0, 0};
  if (floats > size[backward]) {
    buf[backward].reset(aligned_floats(floats));
    size[backward] = floats;
  }
  return buf[backward].get();
}

// fwd_chunk modes.
constexpr int kOut = 0, kRecompute = 1, kSave = 2;

class Kernel {
 public:
  Kernel(const StepConfig& cfg, const float* phi, float scale, bool backward)
      : cfg_(cfg), D_(cfg.input_size()), H1_(cfg.hidden1), H2_(cfg.hidden2), S_(int(cfg.state_rows())),
        K1_(D_ + H1_), K2_(H1_ + H2_), scale_(scale), backward_(backward) {
    prof_ = t_phase_cycles;
    if (prof_) last_ = ticks_now();
    W1_ = phi + cfg.w1_offset();
    b1_ = phi + cfg.b1_offset();
    W2_ = phi + cfg.w2_offset();
    b2_ = phi + cfg.b2_offset();
    wo_ = phi + cfg.wo_offset();
    bo_ = phi[cfg.bo_offset()];
    pre_ = cfg.preprocess;
    param_ = cfg.preprocess_param;
    if (pre_ == Preprocess::kPaper) {
      thr_ = float(std::exp(-double(param_)));
      ep_ = float(std::exp(double(param_)));
    } else if (pre_ == Preprocess::kClamped) {
      ep_ = float(std::exp(double(param_)));
    }
    K1w_ = round_up(K1_, kKC);
    K2w_ = round_up(K2_, kKC);
    // Layer 1's W^T rows (and output rows) hold round_up(K1, kKR) input rows, or from D on round_up(H1, kKR) (the
    // input gradient without d_grad).
    K1u_ = int(std::max(round_up(K1_, kKR), D_ + round_up(H1_, kKR)));
    K2u_ = round_up(K2_, kKR);

    // One aligned allocation for everything.
    int64_t floats = 0;
    auto take = [&floats](int64_t count) {
      int64_t at = floats;
      floats += round_up(count, 16);
      return at;
    };
    const int64_t o_wp1 = take(4LL * H1_ * K1_), o_bp1 = take(4LL * H1_);
    const int64_t o_wp2 = take(4LL * H2_ * K2_), o_bp2 = take(4LL * H2_);
    const int64_t o_in1 = take(K1w_ * kLd), o_in2 = take(K2w_ * kLd);
    const int64_t o_gbuf = take(4LL * std::max(H1_, H2_) * kSub);
    const int64_t o_gs = take(kLd), o_sts = take(int64_t(S_) * kLd);
    const int64_t o_us = take(kLd), o_nss = take(int64_t(S_) * kLd);
    // Activations staged or recomputed: the saved layout's rows (layer 1's, then layer 2's) at stride kLd.
    const int64_t o_act1 = take(cfg.activation_rows() * kLd);
    // tanh(c1') of one chunk, H1 rows at stride kLd: not saved, so the backward recomputes it once for layer 1's
    // weight-gradient input h1' and its cell backward.
    const int64_t o_tc1 = backward_ ? take(int64_t(H1_) * kLd) : 0;
    // bfloat16 GEMMs: W as bf16 pairs along each GEMM's reduction (k for the gates, gates for the input gradient;
    // one uint32 per pair), and the converted inputs of one sub-block (gates, input gradient) or chunk (weight
    // gradient).
    const bool bf16 = cfg.bf16_matmul;
    const int K1p = (K1_ + 1) / 2, K2p = (K2_ + 1) / 2;
    const int64_t o_wpair1 = bf16 ? take(4LL * H1_ * K1p) : 0, o_wpair2 = bf16 ? take(4LL * H2_ * K2p) : 0;
    const int64_t o_xb = bf16 ? take(int64_t(std::max(K1p, K2p)) * kNV * 16) : 0;
    int64_t o_wtpair1 = 0, o_wtpair2 = 0, o_db = 0, o_ab = 0, o_bb = 0, o_dzt = 0;
    int64_t o_wt1 = 0, o_wt2 = 0, o_dz1 = 0, o_dz2 = 0, o_dh1 = 0, o_dx = 0, o_dy = 0,
            o_junk = 0, o_zero = 0, o_lw1 = 0, o_lw2 = 0, o_lb1 = 0, o_lb2 = 0, o_lwo = 0, o_lbo = 0;
    if (backward_) {
      o_wt1 = take(4LL * H1_ * K1u_);
      o_wt2 = take(4LL * H2_ * K2u_);
      if (!bf16) {  // float32 dz rows (bf16 GEMMs read cell_backward's bf16 dz instead)
        o_dz1 = take(4LL * H1_ * kLd);
        o_dz2 = take(4LL * H2_ * kLd);
      }
      o_dh1 = take(int64_t(H1_) * kLd);
      o_dx = take(2LL * kLd);
      o_dy = take(kLd);
      o_junk = take(int64_t(kKR) * kLd);
      if (bf16) {
        o_wtpair1 = take(2LL * H1_ * K1u_);
        o_wtpair2 = take(2LL * H2_ * K2u_);
        o_db = take(2LL * std::max(H1_, H2_) * kNV * 16);
        // Both layers' dz as bf16 rows, [Gp, kChunk] each (Gp: 4 H rounded up to a vector; rows past 4 H are 0),
        // one layer's of them transposed into coordinate pairs for the weight gradient, and its input rows in bf16.
        Gp1_ = int(round_up(4LL * H1_, kW));
        Gp2_ = int(round_up(4LL * H2_, kW));
        o_ab = take(int64_t(Gp1_ + Gp2_) * kChunk / 2);
        o_dzt = take(int64_t(std::max(Gp1_, Gp2_)) * kChunk / 2);
        o_bb = take(int64_t(std::max(K1w_, K2w_)) * kChunk / 2);
      }
      // From here on: what must start at 0 (the zero row, the lane accumulators), one range.
      o_zero = take(kLd);
      // Weight-gradient sums: [Kw][Gp] whole sums in bf16, [4 H][Kw] lanes of kW partial sums in float32.
      o_lw1 = take(bf16 ? int64_t(K1w_) * Gp1_ : 4LL * H1_ * K1w_ * kW);
      o_lw2 = take(bf16 ? int64_t(K2w_) * Gp2_ : 4LL * H2_ * K2w_ * kW);
      o_lb1 = take(4LL * H1_ * kW);
      o_lb2 = take(4LL * H2_ * kW);
      o_lwo = take(int64_t(H2_) * kW);
      o_lbo = take(kW);
    }
    // Scratch comes uncleared from a per-thread buffer kept between calls (a fresh allocation of ~1 MB is an mmap
    // whose page faults, with a memset, cost more than a small tensor's whole step): everything else is written
    // before it is read (staged rows are zero-padded by stage_in), so only the zero row and the backward's lane
    // accumulators are cleared.
    float* m = thread_scratch(floats, backward_);
    if (backward_) std::memset(m + o_zero, 0, sizeof(float) * (floats - o_zero));
    wp1_ = m + o_wp1; bp1_ = m + o_bp1; wp2_ = m + o_wp2; bp2_ = m + o_bp2;
    in1_ = m + o_in1; in2_ = m + o_in2; gbuf_ = m + o_gbuf;
    gs_ = m + o_gs; sts_ = m + o_sts; us_ = m + o_us; nss_ = m + o_nss;
    act1_ = m + o_act1;
    pack(W1_, b1_, H1_, K1_, wp1_, bp1_);
    pack(W2_, b2_, H2_, K2_, wp2_, bp2_);
    // GEMM input rows (stage_inputs sets the h rows): x and h1' in scratch; the weight gradient's padding rows
    // (K..Kw, backward only: the gate GEMMs read rows < K) read the zero row.
    u1_.assign(size_t(K1w_), nullptr);
    u2_.assign(size_t(K2w_), nullptr);
    for (int k = 0; k < D_; ++k) u1_[size_t(k)] = in1_ + int64_t(k) * kLd;
    for (int k = 0; k < H1_; ++k) u2_[size_t(k)] = in2_ + int64_t(k) * kLd;
    if (backward_) {
      wt1_ = m + o_wt1; wt2_ = m + o_wt2;
      if (!bf16) { dz1_ = m + o_dz1; dz2_ = m + o_dz2; }
      tc1_ = m + o_tc1;
      dh1_ = m + o_dh1; dx_ = m + o_dx; dy_ = m + o_dy; junk_ = m + o_junk; zero_ = m + o_zero;
      for (int k = K1_; k < K1w_; ++k) u1_[size_t(k)] = zero_;
      for (int k = K2_; k < K2w_; ++k) u2_[size_t(k)] = zero_;
      lw1_ = m + o_lw1; lw2_ = m + o_lw2; lb1_ = m + o_lb1; lb2_ = m + o_lb2; lwo_ = m + o_lwo; lbo_ = m + o_lbo;
      for (int64_t g = 0; g < 4LL * H1_; ++g)
        std::memcpy(wt1_ + g * K1u_, W1_ + g * K1_, sizeof(float) * K1_);
      for (int64_t g = 0; g < 4LL * H2_; ++g)
        std::memcpy(wt2_ + g * K2u_, W2_ + g * K2_, sizeof(float) * K2_);
      urow1_.resize(K1u_);
      urow2_.resize(K2u_);
      rows_.resize(std::max(K1u_, K2u_));
    }
    if (bf16) {
      bf16_ = true;
      auto u32 = [m](int64_t at) { return reinterpret_cast<uint32_t*>(m + at); };
      wpair1_ = u32(o_wpair1); wpair2_ = u32(o_wpair2); xb_ = m + o_xb;
      pack_bf16_gates(wp1_, H1_, K1_, wpair1_);
      pack_bf16_gates(wp2_, H2_, K2_, wpair2_);
      if (backward_) {
        wtpair1_ = u32(o_wtpair1); wtpair2_ = u32(o_wtpair2); db_ = m + o_db; ab_ = m + o_ab; bb_ = m + o_bb;
        dzt_ = u32(o_dzt);
        bbrows_.resize(size_t(std::max(K1w_, K2w_)));
        for (size_t k = 0; k < bbrows_.size(); ++k) bbrows_[k] = u32(o_bb) + k * (kChunk / 2);
        pack_bf16_transposed(W1_, H1_, K1_, K1u_, wtpair1_);
        pack_bf16_transposed(W2_, H2_, K2_, K2u_, wtpair2_);
        dz16_2_ = reinterpret_cast<uint16_t*>(ab_);
        dz16_1_ = dz16_2_ + int64_t(Gp2_) * kChunk;
        // The padding rows (cell_backward writes rows < 4 H), so that the padding lanes of the transposed dz are 0.
        std::memset(dz16_2_ + 4LL * H2_ * kChunk, 0, 2LL * (Gp2_ - 4 * H2_) * kChunk);
        std::memset(dz16_1_ + 4LL * H1_ * kChunk, 0, 2LL * (Gp1_ - 4 * H1_) * kChunk);
      }
    }
  }

  // ---- forward over [begin, end)
  void forward(const float* grad, const float* state, int64_t n, int64_t begin, int64_t end, float* update,
               float* new_state, float* act = nullptr) {
    const bool nt = n % 16 == 0 && begin % 16 == 0 && aligned64(update) && aligned64(new_state);
    const bool nt_act = act && aligned64(act);  // blocks start at multiples of 64 A floats
    const int64_t A = cfg_.activation_rows();
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t cnt = std::min<int64_t>(kChunk, end - c0);
      const int64_t next = c0 + kChunk, ncols = std::min<int64_t>(kChunk, end - next);
      pf_.clear();
      pf_.add(grad + next, 0, 1, ncols, false);
      pf_.add(state + next, n, S_, ncols, false);
      if (!nt && new_state != state) pf_.add(new_state + next, n, S_, ncols, true);
      if (act && !nt_act) pf_.add(act + A * next, 0, 1, A * ncols, true);  // one range in the saved layout
      pf_.plan(forward_steps());
      if (cnt == kChunk) {
        nt_ = nt;
        if (act) {
          // Straight into the saved layout where the chunk is whole blocks, else through act1_.
          const bool direct = direct_act(n, c0);
          nt_act_ = direct && nt_act;
          fwd_chunk<kSave>(grad + c0, state + c0, n, update + c0, new_state + c0, n, kChunk,
                           direct ? blocked_act(act, c0) : staged_act());
          if (!direct) move_act<true>(act, n, c0, kChunk);
        } else {
          fwd_chunk<kOut>(grad + c0, state + c0, n, update + c0, new_state + c0, n);
        }
        nt_ = nt_act_ = false;
      } else {
        // A partial chunk: only the sub-blocks holding its columns (a call for a 20-coordinate bias then costs
        // one sub-block, not a whole chunk), through the staging rows (the activations through act1_).
        const int cols = int(round_up(cnt, kSub));
        stage_in(grad + c0, state + c0, n, cnt, cols);
        if (act) fwd_chunk<kSave>(gs_, sts_, kLd, us_, nss_, kLd, cols, staged_act());
        else fwd_chunk<kOut>(gs_, sts_, kLd, us_, nss_, kLd, cols);
        unstage_rows(update + c0, n, us_, 1, cnt);
        unstage_rows(new_state + c0, n, nss_, S_, cnt);
        if (act) move_act<true>(act, n, c0, cnt);
      }
    }
    store_fence();
  }

  // ---- backward over [begin, end); its d_phi goes to the lane accumulators (finish() adds them to d_phi).
  void backward(const float* grad, const float* state, int64_t n, int64_t begin, int64_t end,
                const float* d_update, const float* d_new_state, float* d_grad, float* d_state,
                const float* act = nullptr) {
    const int64_t A = cfg_.activation_rows();
    // Read only: ActView holds a float* for the forward's sake.
    float* const saved = const_cast<float*>(act);
    const bool nt = n % 16 == 0 && begin % 16 == 0 && (!d_grad || aligned64(d_grad)) && aligned64(d_state);
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t cnt = std::min<int64_t>(kChunk, end - c0);
      const int64_t next = c0 + kChunk, ncols = std::min<int64_t>(kChunk, end - next);
      pf_.clear();
      pf_.add(grad + next, 0, 1, ncols, false);
      pf_.add(d_update + next, 0, 1, ncols, false);
      pf_.add(state + next, n, S_, ncols, false);
      if (d_new_state) pf_.add(d_new_state + next, n, S_, ncols, false);
      if (act) pf_.add(act + A * next, 0, 1, A * ncols, false);  // one range in the saved layout
      if (!nt && d_state != d_new_state) pf_.add(d_state + next, n, S_, ncols, true);
      pf_.plan(backward_steps(act != nullptr));
      if (cnt == kChunk) {
        const float* dns = d_new_state ? d_new_state + c0 : zero_;
        ActView av;  // none: recompute
        if (act && direct_act(n, c0)) {
          av = blocked_act(saved, c0);
        } else if (act) {
          move_act<false>(saved, n, c0, kChunk, kChunk);
          av = staged_act();
        }
        nt_ = nt;
        bwd_chunk(grad + c0, state + c0, n, d_update + c0, dns, d_new_state ? n : 0, d_grad ? d_grad + c0 : nullptr,
                  d_state + c0, n, kChunk, av);
        nt_ = false;
      } else {
        // A partial chunk: only the sub-blocks holding its columns (a 20-coordinate bias costs one sub-block, not a
        // whole chunk). Padded columns: zero gradient, state and upstream gradients, so every dz there is 0 and
        // they add nothing to d_phi.
        const int cols = int(round_up(cnt, kSub));
        stage_in(grad + c0, state + c0, n, cnt, cols);
        float* dus = us_;
        float* dnss = nss_;
        stage_rows(dus, d_update + c0, n, 1, cnt, cols);
        stage_rows(dnss, d_new_state ? d_new_state + c0 : nullptr, n, S_, cnt, cols);
        // Saved activations: staged in act1_, zero-padded (the padded columns' dz are 0 either way).
        if (act) move_act<false>(saved, n, c0, cnt, cols);
        // Outputs go to the same staging buffers (d_grad over d_update, d_state over d_new_state: allowed).
        bwd_chunk(gs_, sts_, kLd, dus, dnss, kLd, d_grad ? dus : nullptr, dnss, kLd, cols,
                  act ? staged_act() : ActView{});
        if (d_grad) unstage_rows(d_grad + c0, n, dus, 1, cnt);
        unstage_rows(d_state + c0, n, dnss, S_, cnt);
      }
    }
    store_fence();
  }

  // Adds the d_phi of every backward() so far to d_phi_partial.
  void finish(float* d_phi_partial) {
    mark(kPhaseStage);
    reduce_lanes(d_phi_partial);
    mark(kPhaseFinish);
  }

 private:
  // W [4H][K] row-major, b [4H] -> wp [H][K][4] (the 4 gates of unit j for input k next to each other).
  static void pack(const float* W, const float* b, int H, int K, float* wp, float* bp) {
    for (int j = 0; j < H; ++j) {
      for (int k = 0; k < K; ++k)
        for (int q = 0; q < 4; ++q) wp[(int64_t(j) * K + k) * 4 + q] = W[(int64_t(q) * H + j) * K + k];
      for (int q = 0; q < 4; ++q) bp[4 * j + q] = b[q * H + j];
    }
  }

  // Copies cnt columns of grad and state into the staging rows, zero-padded to `pad` columns.
  void stage_in(const float* g, const float* st, int64_t ld, int64_t cnt, int64_t pad = kLd) {
    stage_rows(gs_, g, ld, 1, cnt, pad);
    stage_rows(sts_, st, ld, S_, cnt, pad);
  }

  // rows rows of src (ld apart; nullptr: zeros) into staging rows at stride kLd: cnt columns, zero-padded to pad.
  static void stage_rows(float* dst, const float* src, int64_t ld, int rows, int64_t cnt, int64_t pad) {
    for (int r = 0; r < rows; ++r) {
      float* row = dst + int64_t(r) * kLd;
      std::memset(row, 0, sizeof(float) * pad);
      if (src) std::memcpy(row, src + r * ld, sizeof(float) * cnt);
    }
  }

  // The first cnt columns of rows staging rows (stride kLd) back to dst (rows ld apart).
  static void unstage_rows(float* dst, int64_t ld, const float* src, int rows, int64_t cnt) {
    for (int r = 0; r < rows; ++r) std::memcpy(dst + r * ld, src + int64_t(r) * kLd, sizeof(float) * cnt);
  }

  ActView staged_act() const { return {act1_, kLd, kActivationGroup}; }
  ActView blocked_act(float* act, int64_t c0) const {
    const int64_t A = cfg_.activation_rows();
    return {act + A * c0, kActivationGroup, A * kActivationGroup};
  }
  // True when the whole chunk at c0 is full-width blocks of the saved layout (read and written in place).
  static bool direct_act(int64_t n, int64_t c0) {
    return c0 % kActivationGroup == 0 && c0 + kChunk <= n / kActivationGroup * kActivationGroup;
  }

  // Columns [c0, c0 + cnt) between the saved layout and act1_: kToSaved writes them out, else reads them in and
  // zero-pads act1_ to `pad` columns.
  template <bool kToSaved>
  void move_act(float* act, int64_t n, int64_t c0, int64_t cnt, int64_t pad = 0) {
    const int64_t A = cfg_.activation_rows();
    if (!kToSaved && pad > cnt)
      for (int64_t r = 0; r < A; ++r) std::memset(act1_ + r * kLd + cnt, 0, sizeof(float) * (pad - cnt));
    for (int64_t lo = c0, hi; lo < c0 + cnt; lo = hi) {
      const int64_t first = lo / kActivationGroup * kActivationGroup;
      const int64_t w = std::min<int64_t>(kActivationGroup, n - first);
      hi = std::min(c0 + cnt, first + w);
      for (int64_t r = 0; r < A; ++r) {
        float* block = act + A * first + r * w + (lo - first);
        float* staged = act1_ + r * kLd + (lo - c0);
        if (kToSaved) std::memcpy(block, staged, sizeof(float) * (hi - lo));
        else std::memcpy(staged, block, sizeof(float) * (hi - lo));
      }
    }
  }

  // Prefetcher::step() calls in a whole chunk's forward and backward: one per unit in the gate GEMMs and the
  // pointwise math, per row tile of the input gradients, per tile of the weight gradients (the next chunk's lines
  // spread over all of them, so that no phase waits on memory alone).
  int forward_steps() const { return (kChunk / kSub) * 2 * (H1_ + H2_); }
  int backward_steps(bool saved) const {
    const int per_sub = (saved ? 0 : 2 * (H1_ + H2_)) + H1_ + H2_ + (K1u_ + K2u_) / kKR;
    return (kChunk / kSub) * per_sub + weight_grad_steps(H1_, K1w_) + weight_grad_steps(H2_, K2w_);
  }
  // Prefetcher::step() calls of one layer's weight gradient in a whole chunk: weight_grad_gates (bf16), one per
  // kPairsPerStep coordinate pairs of each tile (the tiles are few and long); weight_grad, one per tile.
  int weight_grad_steps(int H, int Kw) const {
    if (bf16_) return int(round_up(4LL * H, kW * kWG) / (kW * kWG)) * (Kw / kKC) * (kChunk / 2 / kPairsPerStep);
    return (4 * H / kGR) * (Kw / kKC);
  }

  // Attributes the ticks since the previous mark to `phase` (when a PhaseCycles is installed on this thread).
  L2L_INLINE void mark(int phase) {
    if (prof_) {
      const uint64_t t = ticks_now();
      prof_->ticks[phase] += t - last_;
      last_ = t;
    }
  }

  L2L_INLINE void store_out(float* p, vf v) const {
    if (nt_) stream(p, v);
    else storeu(p, v);
  }

  // The 4 gate activations of one unit (rows st4 apart): to a kernel output (streaming when aligned) or to scratch.
  L2L_INLINE void store_act4(float* a, int64_t st4, vf ig, vf fg, vf gg, vf og, bool output) const {
    const vf four[4] = {ig, fg, gg, og};
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      if (output && nt_act_) stream(a + q * st4, four[q]);
      else if (output) storeu(a + q * st4, four[q]);
      else store(a + q * st4, four[q]);
    }
  }

  // tanh(c') of a unit from its saved gates and c: c' = f c + i g and its tanh exactly as the forward computed them
  // (bit for bit), so that tanh(c') need not be saved (a fifth of the activations' bytes, each way).
  L2L_INLINE static vf tanh_cell(const float* a, int64_t lda, vf cold) {
    return tanh_(vfma(loadu(a + lda), cold, loadu(a) * loadu(a + 2 * lda)));
  }

  // ---- preprocessing
  // +-inf -> +-FLT_MAX (the largest finite gradient of that sign); finite values and NaN unchanged, bit for bit. A
  // select, not min/max: under TensorFlow the threads run with denormals-are-zero, which min/max would apply to a
  // subnormal gradient (the comparison sees 0 too, but only picks which operand to keep). NaN compares false.
  L2L_INLINE static vi is_infinite(vf g) { return vabs(g) > splat(FLT_MAX); }
  L2L_INLINE static vf clamp_infinities(vf g) {
    const vf signed_max = (vf)(((vi)g & int32_t(0x80000000)) | 0x7f7fffff);  // FLT_MAX with the sign of g
    return is_infinite(g) ? signed_max : g;
  }

  L2L_INLINE void preprocess(vf g, vf* f0, vf* f1) const {
    g = clamp_infinities(g);
    if (pre_ == Preprocess::kNone) {
      *f0 = g;
      *f1 = splat(0.0f);
      return;
    }
    const vf a = vabs(g);
    if (pre_ == Preprocess::kPaper) {
      vi big = a >= splat(thr_);
      vf l = log_(big ? a : splat(1.0f)) / splat(param_);
      *f0 = big ? l : splat(-1.0f);
      *f1 = big ? vsign(g) : splat(ep_) * g;
    } else {
      vf l = log_(a + splat(FLT_EPSILON)) / splat(param_);
      *f0 = vmax(splat(-1.0f), l);
      *f1 = vmax(splat(-1.0f), vmin(splat(1.0f), g * splat(ep_)));
    }
  }

  // d(loss)/d(grad) from d(loss)/d(features); derivatives as listed in lstm_step.h, at the clamped gradient; 0 at
  // +-inf (the clamp is flat there).
  L2L_INLINE vf preprocess_backward(vf g_in, vf d0, vf d1) const {
    const vi infinite = is_infinite(g_in);  // false for NaN
    const vf g = clamp_infinities(g_in);
    vf r;
    if (pre_ == Preprocess::kNone) {
      r = d0;
    } else if (pre_ == Preprocess::kPaper) {
      const vf a = vabs(g);
      vi big = a >= splat(thr_);
      r = big ? d0 / (splat(param_) * g) : d1 * splat(ep_);
    } else {
      const vf ae = vabs(g) + splat(FLT_EPSILON);
      vf l = log_(ae) / splat(param_);
      vf t0 = l > splat(-1.0f) ? d0 * vsign(g) / (splat(param_) * ae) : splat(0.0f);
      vf t1 = vabs(g * splat(ep_)) < splat(1.0f) ? d1 * splat(ep_) : splat(0.0f);
      r = t0 + t1;
      r = g != g ? g : r;  // NaN propagates (both comparisons above are false for NaN)
    }
    return infinite ? splat(0.0f) : r;
  }

  // ---- bfloat16 GEMMs (cfg_.bf16_matmul). vdpbf16ps adds to each float32 lane the products of a pair of bf16
  // values: the pairs run along the reduction (k for the gates, gates for the input gradient, two adjacent
  // coordinates for the weight gradient), so the inputs are converted (round to nearest even) into pair order.
  static constexpr float kBf16Max = 3.38953139e38f;  // largest finite bfloat16 (0x7f7f0000): see stage_inputs
  static uint32_t bf16_bits(float f) {  // round to nearest even (finite f; NaN stays NaN: its top bits are kept)
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  }
  static uint32_t bf16_pair(float lo, float hi) { return bf16_bits(lo) | (bf16_bits(hi) << 16); }
  // Gates: for unit j, input pair p and gate q, (W[q][2p], W[q][2p+1]) from the packed wp (zero past K).
  static void pack_bf16_gates(const float* wp, int H, int K, uint32_t* out) {
    const int Kp = (K + 1) / 2;
    for (int j = 0; j < H; ++j) {
      const float* wpj = wp + int64_t(j) * K * 4;
      for (int p = 0; p < Kp; ++p)
        for (int q = 0; q < 4; ++q)
          out[(int64_t(j) * Kp + p) * 4 + q] =
              bf16_pair(wpj[4 * (2 * p) + q], 2 * p + 1 < K ? wpj[4 * (2 * p + 1) + q] : 0.0f);
    }
  }
  // Input gradient: the gate pairs of unit j are (i, f) = rows (j, H + j) and (g, o) = rows (2 H + j, 3 H + j) (the
  // order in which cell_backward has them), pair 2 j and 2 j + 1; for input k, (W[first][k], W[second][k]). W is
  // [4 H, K]; rows of out ldw apart.
  static void pack_bf16_transposed(const float* W, int H, int K, int ldw, uint32_t* out) {
    for (int j = 0; j < H; ++j)
      for (int half = 0; half < 2; ++half) {
        const float* first = W + (int64_t(2 * half) * H + j) * K;
        const float* second = first + int64_t(H) * K;
        uint32_t* o = out + (2LL * j + half) * ldw;
        for (int k = 0; k < ldw; ++k) o[k] = k < K ? bf16_pair(first[k], second[k]) : 0;
      }
  }
#if L2L_HAS_BF16
  using vb = __m512i;
  // 16 columns of rows r0 and r1 as 32 bf16 values in pair order: (r0[c], r1[c]) for c = 0..15.
  static L2L_INLINE vb interleave_bf16(vf r0, vf r1) {
    const vb idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                                    20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(idx, (vb)_mm512_cvtne2ps_pbh((__m512)r1, (__m512)r0));  // r0 low, r1 high
  }
  static L2L_INLINE __m512 dot_bf16(__m512 acc, vb a, vb b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

  // cell_backward's dz of unit j, vector v of the sub-block (chunk columns off..off+15), as the bf16 GEMMs read them:
  // rows q H + j of dz16 (bf16 rows of kChunk columns, in column order: the weight gradient pairs columns 2c, 2c+1)
  // and the sub-block's gate pairs 2 j = (i, f), 2 j + 1 = (g, o) in db_ (the input gradient's pair order).
  L2L_INLINE void store_dz_bf16(uint16_t* dz16, int H, int j, int off, int v, vf dzi, vf dzf, vf dzg, vf dzo) {
    uint16_t* d = dz16 + int64_t(j) * kChunk + off;
    const int64_t sz = int64_t(H) * kChunk;
    const vf q[4] = {dzi, dzf, dzg, dzo};
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g)
      _mm256_store_si256(reinterpret_cast<__m256i*>(d + g * sz), (__m256i)_mm512_cvtneps_pbh((__m512)q[g]));
    vb* p = reinterpret_cast<vb*>(db_) + int64_t(2 * j) * kNV + v;
    p[0] = interleave_bf16(dzi, dzf);
    p[kNV] = interleave_bf16(dzg, dzo);
  }

  // gates() with bf16 inputs: the sub-block's input rows converted once (pairs of rows), then per unit and pair one
  // broadcast W pair per gate.
  __attribute__((noinline)) static void gates_bf16(const uint32_t* __restrict wpair, const float* __restrict bp,
                                                   const float* const* in, int s, int K, int H, float* __restrict out,
                                                   vb* __restrict xb, Prefetcher* pf) {
    const int Kp = (K + 1) / 2;
    for (int p = 0; p < Kp; ++p) {
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) {
        const vf r1 = 2 * p + 1 < K ? load_reg(in[2 * p + 1] + s + v * kW) : splat(0.0f);
        xb[p * kNV + v] = interleave_bf16(load_reg(in[2 * p] + s + v * kW), r1);
      }
    }
    for (int j = 0; j < H; ++j) {
      pf->step();
      const uint32_t* wj = wpair + int64_t(j) * Kp * 4;
      __m512 acc[4][kNV];
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q)
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[q][v] = _mm512_set1_ps(bp[4 * j + q]);
      for (int p = 0; p < Kp; ++p) {
        vb x[kNV];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) x[v] = xb[p * kNV + v];
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          const vb w = _mm512_set1_epi32(int(wj[4 * p + q]));
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) acc[q][v] = dot_bf16(acc[q][v], x[v], w);
        }
      }
      float* o = out + int64_t(j) * 4 * kSub;
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q)
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) store(o + (q * kNV + v) * kW, (vf)acc[q][v]);
    }
  }

  // input_grad()'s bf16 policy: the sub-block's dz in gate pairs, as cell_backward stored them (store_dz_bf16), one
  // 32-bit W^T pair per gate pair; vdpbf16ps.
  struct InputGradBf16 {
    using Acc = __m512;
    using Dz = vb;
    using X = vb;
    using W = uint32_t;
    static constexpr int kPerStep = 2;  // gates per reduction step
    static L2L_INLINE Acc zero() { return _mm512_setzero_ps(); }
    static L2L_INLINE Dz dz_at(const Dz* db, int gp, int v) { return db[gp * kNV + v]; }
    static L2L_INLINE vb weight(W w) { return _mm512_set1_epi32(int(w)); }
    static L2L_INLINE Acc madd(Acc acc, Dz x, vb w) { return dot_bf16(acc, x, w); }
  };

  // The weight gradient's input rows of one chunk in bf16 (rows kChunk / 2 pairs apart): coordinates in order, so
  // that a 32-bit element is a coordinate pair, as in cell_backward's dz rows (store_dz_bf16).
  static void bf16_rows(const float* const* u, int Kw, int cols, vb* __restrict bb) {
    constexpr int kRow = kChunk / (2 * kW);  // vectors per bf16 row
    for (int k = 0; k < Kw; ++k)
      for (int c = 0; c < cols / (2 * kW); ++c) {
        const float* row = u[k] + 2 * kW * c;
        bb[int64_t(k) * kRow + c] = (vb)_mm512_cvtne2ps_pbh((__m512)loadu(row + kW), (__m512)loadu(row));
      }
  }

  // The transpose of a 16 x 16 block of 32-bit elements: rows r[i] -> out + i * ldo (16 elements each).
  static L2L_INLINE void transpose16(vb (&r)[16], uint32_t* out, int64_t ldo) {
    vb t[16], u[16];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {  // 32-bit interleave of row pairs
      t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {  // 64-bit: u[4 i + c] holds, in 128-bit lane L, column 4 L + c of rows 4 i..4 i + 3
      u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
      u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
      u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
      u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {  // 128-bit lanes: column 4 L + c is lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
      const vb v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
      const vb w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
      const vb w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
      _mm512_store_si512(out + int64_t(c) * ldo, _mm512_shuffle_i32x4(v0, w0, 0x88));
      _mm512_store_si512(out + int64_t(4 + c) * ldo, _mm512_shuffle_i32x4(v1, w1, 0x88));
      _mm512_store_si512(out + int64_t(8 + c) * ldo, _mm512_shuffle_i32x4(v0, w0, 0xdd));
      _mm512_store_si512(out + int64_t(12 + c) * ldo, _mm512_shuffle_i32x4(v1, w1, 0xdd));
    }
  }

  // One register tile of weight_grad_gates: sums[k][g] += sum over the chunk's coordinate pairs p of
  // dzt[p][g] . x[k][p] (vdpbf16ps: two products per lane), for NG vectors of gates from gv0 and kKC inputs from k0.
  template <int NG>
  __attribute__((noinline)) static void weight_grad_tile(float* __restrict sums, int Gp, int gv0, int k0,
                                                         const uint32_t* __restrict dzt, const uint32_t* const* x,
                                                         int npairs, Prefetcher* pf) {
    __m512 acc[NG][kKC];
#pragma GCC unroll 8
    for (int g = 0; g < NG; ++g)
#pragma GCC unroll 8
      for (int c = 0; c < kKC; ++c) acc[g][c] = _mm512_setzero_ps();
    const uint32_t* xk[kKC];
#pragma GCC unroll 8
    for (int c = 0; c < kKC; ++c) xk[c] = x[k0 + c];
    for (int p = 0; p < npairs; ++p) {
      if (p % kPairsPerStep == 0) pf->step();
      const uint32_t* d = dzt + int64_t(p) * Gp + gv0 * kW;
      vb a[NG];
#pragma GCC unroll 8
      for (int g = 0; g < NG; ++g) a[g] = _mm512_load_si512(d + g * kW);
#pragma GCC unroll 8
      for (int c = 0; c < kKC; ++c) {
        const vb b = _mm512_set1_epi32(int(xk[c][p]));
#pragma GCC unroll 8
        for (int g = 0; g < NG; ++g) acc[g][c] = dot_bf16(acc[g][c], a[g], b);
      }
    }
#pragma GCC unroll 8
    for (int c = 0; c < kKC; ++c)
#pragma GCC unroll 8
      for (int g = 0; g < NG; ++g) {
        float* s = sums + int64_t(k0 + c) * Gp + (gv0 + g) * kW;
        store(s, load(s) + (vf)acc[g][c]);
      }
  }

  // The bf16 weight gradient of one layer and chunk as a GEMM whose vectors run over the gates: every lane
  // accumulates a whole sum, so per chunk nothing is reduced and only the [Kw][Gp] sums are read and written once per
  // tile (the coordinate-lane form, weight_grad, re-reads kW partial sums per output from L2 every chunk: in bf16
  // that cost half the phase; in float32 this form measured no faster, its transposes costing what it saves). dz
  // comes as bf16 rows (Gp of them, ldz pairs apart; rows past G are 0), a 32-bit element a coordinate pair,
  // transposed here into dzt [pairs][Gp]; x: Kw input rows of bf16 pairs (bf16_rows), broadcast one at a time.
  __attribute__((noinline)) static void weight_grad_gates(float* __restrict sums, int G, int Kw,
                                                          const uint32_t* __restrict dz, int64_t ldz,
                                                          const uint32_t* const* x, int npairs,
                                                          uint32_t* __restrict dzt, Prefetcher* pf) {
    const int Gp = int(round_up(G, kW)), Gv = Gp / kW;
    for (int gv = 0; gv < Gv; ++gv)
      for (int p = 0; p < npairs; p += kW) {
        vb r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(dz + int64_t(gv * kW + i) * ldz + p);
        transpose16(r, dzt + int64_t(p) * Gp + gv * kW, Gp);
      }
    for (int gv0 = 0; gv0 < Gv; gv0 += kWG)
      for (int k0 = 0; k0 < Kw; k0 += kKC) {
        switch (std::min(kWG, Gv - gv0)) {
          case 5: weight_grad_tile<5>(sums, Gp, gv0, k0, dzt, x, npairs, pf); break;
          case 4: weight_grad_tile<4>(sums, Gp, gv0, k0, dzt, x, npairs, pf); break;
          case 3: weight_grad_tile<3>(sums, Gp, gv0, k0, dzt, x, npairs, pf); break;
          case 2: weight_grad_tile<2>(sums, Gp, gv0, k0, dzt, x, npairs, pf); break;
          default: weight_grad_tile<1>(sums, Gp, gv0, k0, dzt, x, npairs, pf); break;
        }
      }
  }
#endif

  // The GEMMs in the configured precision (float32, or bf16 inputs: cfg_.bf16_matmul).
  void gates_gemm(const float* wp, const uint32_t* wpair, const float* bp, const float* const* in, int s, int K,
                  int H) {
#if L2L_HAS_BF16
    if (bf16_) return gates_bf16(wpair, bp, in, s, K, H, gbuf_, reinterpret_cast<vb*>(xb_), &pf_);
#endif
    gates(wp, bp, in, s, K, H, gbuf_, &pf_);
  }
  // dz: the float32 dz rows (null in bf16), read from column s.
  void input_grad_gemm(const float* wt, const uint32_t* wtpair, int ldw, int Ku, int G, const float* dz, int s,
                       float* const* rows, int out_lo, int out_hi) {
#if L2L_HAS_BF16
    if (bf16_) {  // dz: cell_backward's gate pairs of this sub-block in db_
      return input_grad<InputGradBf16>(wtpair, ldw, Ku, G, reinterpret_cast<const vb*>(db_), rows, out_lo, out_hi, nt_,
                                       &pf_);
    }
#endif
    input_grad<InputGradF32>(wt, ldw, Ku, G, dz + s, rows, out_lo, out_hi, nt_, &pf_);
  }
  // sums: [Kw][Gp] whole sums in bf16 (weight_grad_gates), else [G][Kw] lanes of kW partial sums.
  void weight_grad_gemm(float* sums, int G, int Kw, const float* dz, const uint16_t* dz16, const float* const* u,
                        int cols) {
#if L2L_HAS_BF16
    if (bf16_) {
      bf16_rows(u, Kw, cols, reinterpret_cast<vb*>(bb_));
      return weight_grad_gates(sums, G, Kw, reinterpret_cast<const uint32_t*>(dz16), kChunk / 2,
                               bbrows_.data(), cols / 2, dzt_, &pf_);
    }
#endif
    (void)dz16;
    weight_grad(sums, G, Kw, dz, u, cols, &pf_);
  }

  // ---- gate GEMM of one layer on one sub-block: for every unit j, out[j][q][v] = b[q j] + sum_k W[q j][k] in[k][v]
  // (q: gate i, f, g, o; v: the kNV vectors of the sub-block). Register tile: the 4 gates of one unit x kNV
  // vectors (16 accumulators with AVX-512). Not inlined and separate from the pointwise math, so that the
  // accumulators own the registers and the FMA stream runs uninterrupted across units.
  __attribute__((noinline)) static void gates(const float* __restrict wp, const float* __restrict bp,
                                              const float* const* in, int s, int K, int H, float* __restrict out,
                                              Prefetcher* pf) {
    for (int j = 0; j < H; ++j) {
      pf->step();
      const float* wpj = wp + int64_t(j) * K * 4;
      vf acc[4][kNV];
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const vf b = splat(bp[4 * j + q]);
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[q][v] = b;
      }
      for (int k = 0; k < K; ++k) {
        const float* u = in[k] + s;
        vf x[kNV];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) x[v] = load_reg(u + v * kW);
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          const vf w = splat(wpj[4 * k + q]);
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) acc[q][v] = vfma(w, x[v], acc[q][v]);
        }
      }
      float* o = out + int64_t(j) * 4 * kSub;
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q)
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) store(o + (q * kNV + v) * kW, acc[q][v]);
    }
  }

  // The GEMM inputs of one chunk's first `cols` columns, as rows u1_ (layer 1: the preprocessed gradient, in in1_,
  // then h1) and u2_ (layer 2: h1', which the forward writes to in2_, then h2). The h rows are the state's own where
  // they are aligned rows (the GEMMs' aligned loads; no copy), else copies in in1_ / in2_.
  void stage_inputs(const float* __restrict g, const float* st, int64_t lds, int cols) {
    // bfloat16 GEMMs: the raw gradient ("none") saturates at bfloat16's largest finite value; rounded to nearest,
    // |g| above it (+-FLT_MAX, as +-inf acts) would become +-inf and make 0 * inf = NaN in d_phi. The reference
    // saturates its GEMM inputs alike. The other features and the h rows are bounded by 1 (NaN propagates).
    const bool saturate = bf16_ && D_ == 1;
    for (int col = 0; col < cols; col += kW) {
      vf f0, f1;
      preprocess(loadu(g + col), &f0, &f1);
      if (saturate) f0 = vmax(splat(-kBf16Max), vmin(splat(kBf16Max), f0));
      store(in1_ + col, f0);
      if (D_ == 2) store(in1_ + kLd + col, f1);
    }
    const bool direct = reinterpret_cast<uintptr_t>(st) % sizeof(vf) == 0 && lds % kW == 0;
    // count state rows from `first` as GEMM input rows `at` on of table u (copies in scratch rows `at` on of buf).
    auto h_rows = [&](int64_t first, int count, int at, const float** u, float* buf) {
      for (int r = 0; r < count; ++r) {
        const float* row = st + (first + r) * lds;
        float* copy = buf + int64_t(at + r) * kLd;
        if (!direct) std::memcpy(copy, row, sizeof(float) * cols);
        u[at + r] = direct ? row : copy;
      }
    };
    h_rows(0, H1_, D_, u1_.data(), in1_);                  // h1: state rows 0..H1-1
    h_rows(2 * int64_t(H1_), H2_, H1_, u2_.data(), in2_);  // h2: state rows 2 H1..
  }

  // ---- forward of one chunk of kChunk coordinates (of its first `cols`, a multiple of kSub). st/ns: first row of
  // the chunk, rows lds/ldn apart. kOut: write the outputs. kRecompute (the backward's): keep the activations in
  // act1_ (and h1' in in2_) instead. kSave: write the outputs and the activations (to `av`, in the row order of the
  // saved layout of lstm_step.h); the activations are those kRecompute computes, bit for bit, and the outputs are
  // computed from them (within an ulp or two of kOut's, which fuses sigmoid * tanh).
  template <int kMode>
  void fwd_chunk(const float* __restrict g, const float* st, int64_t lds, float* up, float* ns, int64_t ldn,
                 int cols = kChunk, ActView av = {}) {
    constexpr bool kSep = kMode != kOut;  // activations computed one by one
    if (kMode == kRecompute) av = staged_act();
    const int64_t lda = av.lda;
    stage_inputs(g, st, lds, cols);
    mark(kPhaseStage);

    for (int s = 0; s < cols; s += kSub) {
      float* const as = av.at(s);  // this sub-block's activation rows (kSep)
      // Layer 1.
      gates_gemm(wp1_, wpair1_, bp1_, u1_.data(), s, K1_, H1_);
      mark(kPhaseGates1);
      for (int j = 0; j < H1_; ++j) {
        pf_.step();
        const float* acc = gbuf_ + int64_t(j) * 4 * kSub;
        const float* cold = st + (int64_t(H1_) + j) * lds + s;
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) {
          const int off = s + v * kW;
          const vf zi = load(acc + (0 * kNV + v) * kW), zf = load(acc + (1 * kNV + v) * kW);
          const vf zg = load(acc + (2 * kNV + v) * kW), zo = load(acc + (3 * kNV + v) * kW);
          if (kSep) {
            vf ig = sigmoid(zi), fg = sigmoid(zf), gg = tanh_(zg), og = sigmoid(zo);
            vf cn = vfma(fg, loadu(cold + v * kW), ig * gg);
            vf tc = tanh_(cn);
            const vf h = og * tc;
            store(in2_ + int64_t(j) * kLd + off, h);
            if (kMode == kRecompute) store(tc1_ + int64_t(j) * kLd + off, tc);
            store_act4(as + 4LL * j * lda + v * kW, lda, ig, fg, gg, og, kMode == kSave);
            if (kMode == kSave) {
              store_out(ns + int64_t(j) * ldn + off, h);
              store_out(ns + (int64_t(H1_) + j) * ldn + off, cn);
            }
          } else {
            vf cn = vfma(sigmoid(zf), loadu(cold + v * kW), sigmoid_times_tanh(zi, zg));
            vf h = sigmoid_times_tanh(zo, cn);
            store(in2_ + int64_t(j) * kLd + off, h);
            store_out(ns + int64_t(j) * ldn + off, h);
            store_out(ns + (int64_t(H1_) + j) * ldn + off, cn);
          }
        }
      }
      mark(kPhaseCell1);
      // Layer 2 and the output.
      vf ua[kNV];
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) ua[v] = splat(0.0f);
      gates_gemm(wp2_, wpair2_, bp2_, u2_.data(), s, K2_, H2_);
      mark(kPhaseGates2);
      for (int j = 0; j < H2_; ++j) {
        pf_.step();
        const float* acc = gbuf_ + int64_t(j) * 4 * kSub;
        const float* cold = st + (2 * int64_t(H1_) + H2_ + j) * lds + s;
        const vf wo = splat(wo_[j]);
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) {
          const int off = s + v * kW;
          const vf zi = load(acc + (0 * kNV + v) * kW), zf = load(acc + (1 * kNV + v) * kW);
          const vf zg = load(acc + (2 * kNV + v) * kW), zo = load(acc + (3 * kNV + v) * kW);
          if (kSep) {
            vf ig = sigmoid(zi), fg = sigmoid(zf), gg = tanh_(zg), og = sigmoid(zo);
            vf cn = vfma(fg, loadu(cold + v * kW), ig * gg);
            store_act4(as + (4LL * H1_ + 4LL * j) * lda + v * kW, lda, ig, fg, gg, og, kMode == kSave);
            if (kMode == kSave) {
              const vf h = og * tanh_(cn);
              store_out(ns + (2 * int64_t(H1_) + j) * ldn + off, h);
              store_out(ns + (2 * int64_t(H1_) + H2_ + j) * ldn + off, cn);
              ua[v] = vfma(wo, h, ua[v]);
            }
          } else {
            vf cn = vfma(sigmoid(zf), loadu(cold + v * kW), sigmoid_times_tanh(zi, zg));
            vf h = sigmoid_times_tanh(zo, cn);
            store_out(ns + (2 * int64_t(H1_) + j) * ldn + off, h);
            store_out(ns + (2 * int64_t(H1_) + H2_ + j) * ldn + off, cn);
            ua[v] = vfma(wo, h, ua[v]);
          }
        }
      }
      if (kMode != kRecompute) {
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) store_out(up + s + v * kW, splat(scale_) * (ua[v] + splat(bo_)));
      }
      mark(kPhaseCell2);
    }
  }

  // Backward of the pointwise LSTM math of unit j of one layer, one vector: its 4 gate activations (at a, lda apart)
  // and tanh(c'), dh (into h'), the upstream dc', c_old; writes the dz rows and d c_old; adds the dz to sb
  // (bias-gradient partial sums of the 4 gates).
  L2L_INLINE void cell_backward(const float* a, int64_t lda, vf tc, int H, int j, int off, int v, vf dh, vf dc_in,
                                vf cold, float* dz, uint16_t* dz16, float* dcold_out, vf (&sb)[4]) {
    vf ig = loadu(a), fg = loadu(a + lda), gg = loadu(a + 2 * lda), og = loadu(a + 3 * lda);
    const vf one = splat(1.0f);
    vf dc = vfma(dh * og, one - tc * tc, dc_in);
    vf dzo = dh * tc * og * (one - og);
    vf dzi = dc * gg * ig * (one - ig);
    vf dzg = dc * ig * (one - gg * gg);
    vf dzf = dc * cold * fg * (one - fg);
    store_out(dcold_out, dc * fg);
#if L2L_HAS_BF16
    if (bf16_) {  // the bf16 GEMMs' inputs straight from the registers (no float32 dz rows)
      store_dz_bf16(dz16, H, j, off, v, dzi, dzf, dzg, dzo);
    } else
#endif
    {
      float* d = dz + int64_t(j) * kLd + off;
      const int64_t sz = int64_t(H) * kLd;  // the dz rows are scratch at stride kLd
      store(d, dzi); store(d + sz, dzf); store(d + 2 * sz, dzg); store(d + 3 * sz, dzo);
    }
    (void)dz16; (void)v;
    sb[0] = sb[0] + dzi;
    sb[1] = sb[1] + dzf;
    sb[2] = sb[2] + dzg;
    sb[3] = sb[3] + dzo;
  }

  // lanes of the bias gradient of unit j (gate q at row q H + j) += sb.
  L2L_INLINE static void add_bias_lanes(float* lb, int H, int j, const vf (&sb)[4]) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      float* l = lb + (int64_t(q) * H + j) * kW;
      store(l, load(l) + sb[q]);
    }
  }

  // out rows k (pointers already at the sub-block): sum_g wt[g][k] dz[g][sub-block], for k < Ku.
  // Rows [out_lo, out_hi) are kernel outputs (d_state rows), the others local buffers.
  // (wt rows ldw apart; Ku a multiple of kKR.) The policy P says what dz and wt hold: float32 (InputGradF32: dz rows
  // kLd apart, one W^T value per gate) or bf16 (InputGradBf16: gate pairs, one W^T pair per pair of gates).
  template <class P>
  __attribute__((noinline)) static void input_grad(const typename P::W* __restrict wt, int ldw, int Ku, int G,
                                                   const typename P::Dz* __restrict dz, float* const* rows,
                                                   int out_lo, int out_hi, bool nt, Prefetcher* pf) {
    const int steps = G / P::kPerStep;
    for (int k0 = 0; k0 < Ku; k0 += kKR) {
      pf->step();
      typename P::Acc acc[kKR][kNV];
#pragma GCC unroll 4
      for (int r = 0; r < kKR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[r][v] = P::zero();
      for (int g = 0; g < steps; ++g) {
        typename P::X x[kNV];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) x[v] = P::dz_at(dz, g, v);
        const typename P::W* w = wt + int64_t(g) * ldw + k0;
#pragma GCC unroll 4
        for (int r = 0; r < kKR; ++r) {
          const auto wv = P::weight(w[r]);
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) acc[r][v] = P::madd(acc[r][v], x[v], wv);
        }
      }
      write_rows(rows, k0, acc, out_lo, out_hi, nt);
    }
  }
  // input_grad()'s float32 policy: dz rows kLd floats apart, kept in registers (load_reg), one W^T value per gate.
  struct InputGradF32 {
    using Acc = vf;
    using Dz = float;  // what dz points to
    using X = vf;      // a vector of it in registers
    using W = float;
    static constexpr int kPerStep = 1;
    static L2L_INLINE Acc zero() { return splat(0.0f); }
    static L2L_INLINE vf dz_at(const float* dz, int g, int v) { return load_reg(dz + int64_t(g) * kLd + v * kW); }
    static L2L_INLINE vf weight(W w) { return splat(w); }
    static L2L_INLINE Acc madd(Acc acc, vf x, vf w) { return vfma(w, x, acc); }
  };

  // The kKR output rows of an input-gradient tile: streamed where they are outputs (rows [out_lo, out_hi) with nt),
  // else stored.
  template <class V>
  static L2L_INLINE void write_rows(float* const* rows, int k0, const V (&acc)[kKR][kNV], int out_lo, int out_hi,
                                    bool nt) {
#pragma GCC unroll 4
    for (int r = 0; r < kKR; ++r) {
      float* row = rows[k0 + r];
      if (nt && k0 + r >= out_lo && k0 + r < out_hi) {
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) stream(row + v * kW, (vf)acc[r][v]);
      } else {
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) storeu(row + v * kW, (vf)acc[r][v]);
      }
    }
  }

  // lanes[g0 + r][k0 + c] += acc[r][c] (a weight-gradient tile's partial sums).
  template <class V>
  static L2L_INLINE void add_lanes(float* lanes, int Kw, int g0, int k0, const V (&acc)[kGR][kKC]) {
#pragma GCC unroll 8
    for (int r = 0; r < kGR; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < kKC; ++c) {
        float* l = lanes + (int64_t(g0 + r) * Kw + k0 + c) * kW;
        store(l, load(l) + (vf)acc[r][c]);
      }
  }

  // lanes[g][k] (kW partial sums each) += sum over the chunk of dz[g][:] * u[k][:].
  __attribute__((noinline)) static void weight_grad(float* __restrict lanes, int G, int Kw, const float* __restrict dz,
                          const float* const* u, int cols, Prefetcher* pf) {
    for (int g0 = 0; g0 < G; g0 += kGR) {
      for (int k0 = 0; k0 < Kw; k0 += kKC) {
        pf->step();
        vf acc[kGR][kKC];
#pragma GCC unroll 8
        for (int r = 0; r < kGR; ++r)
#pragma GCC unroll 8
          for (int c = 0; c < kKC; ++c) acc[r][c] = splat(0.0f);
        for (int col = 0; col < cols; col += kW) {
          vf a[kGR], b[kKC];
#pragma GCC unroll 8
          for (int r = 0; r < kGR; ++r) a[r] = load_reg(dz + int64_t(g0 + r) * kLd + col);
#pragma GCC unroll 8
          for (int c = 0; c < kKC; ++c) b[c] = load_reg(u[k0 + c] + col);
#pragma GCC unroll 8
          for (int r = 0; r < kGR; ++r)
#pragma GCC unroll 8
            for (int c = 0; c < kKC; ++c) acc[r][c] = vfma(a[r], b[c], acc[r][c]);
        }
        add_lanes(lanes, Kw, g0, k0, acc);
      }
    }
  }

  // ---- backward of one chunk: with the activations the forward saved (`av`), else (av.p null) recomputing them
  // (the forward's two gate GEMMs and pointwise math again).
  void bwd_chunk(const float* g, const float* st, int64_t lds, const float* du, const float* dns, int64_t lddn,
                 float* dg, float* ds, int64_t ldd, int cols = kChunk, ActView av = {}) {
    if (av.p) {
      stage_inputs(g, st, lds, cols);
      // tanh(c1') and h1' = o1 * tanh(c1'), as the forward computed them (h1': the input of layer 2's weight
      // gradient).
      for (int s = 0; s < cols; s += kSub) {
        const float* as = av.at(s);
        for (int j = 0; j < H1_; ++j) {
          const float* a = as + 4LL * j * av.lda;
          const float* cold = st + (H1_ + int64_t(j)) * lds + s;
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) {
            const int64_t at = int64_t(j) * kLd + s + v * kW;
            const vf tc = tanh_cell(a + v * kW, av.lda, loadu(cold + v * kW));
            store(tc1_ + at, tc);
            store(in2_ + at, loadu(a + 3 * av.lda + v * kW) * tc);
          }
        }
      }
    } else {
      fwd_chunk<kRecompute>(g, st, lds, nullptr, nullptr, 0, cols);
      av = staged_act();
    }
    const int64_t lda = av.lda;
    for (int col = 0; col < cols; col += kW) store(dy_ + col, splat(scale_) * loadu(du + col));
    const int64_t H1 = H1_, H2 = H2_;
    // Row pointers of the input-gradient outputs (at column 0 of the chunk).
    for (int k = 0; k < K2u_; ++k) {
      if (k < H1) urow2_[k] = dh1_ + int64_t(k) * kLd;
      else if (k < K2_) urow2_[k] = ds + (H1 + k) * ldd;  // h2 row k - H1 is state row 2 H1 + k - H1
      else urow2_[k] = junk_ + int64_t(k - K2_) * kLd;
    }
    for (int k = 0; k < K1u_; ++k) {
      if (k < D_) urow1_[k] = dx_ + int64_t(k) * kLd;
      else if (k < K1_) urow1_[k] = ds + int64_t(k - D_) * ldd;
      else urow1_[k] = junk_ + int64_t(k - K1_) * kLd;
    }
    float** rows = rows_.data();
    mark(kPhaseStage);
    for (int s = 0; s < cols; s += kSub) {
      const float* const as = av.at(s);
      // Layer 2 (and the output layer).
      for (int j = 0; j < H2_; ++j) {
        pf_.step();
        const vf wo = splat(wo_[j]);
        vf dwo = load(lwo_ + int64_t(j) * kW);
        vf sb[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) {
          const int off = s + v * kW;
          const vf dyv = load(dy_ + off);
          const float* a = as + (4 * H1 + 4LL * j) * lda + v * kW;
          const vf cold = loadu(st + (2 * H1 + H2 + j) * lds + off);
          const vf tc = tanh_cell(a, lda, cold);
          dwo = vfma(dyv, loadu(a + 3 * lda) * tc, dwo);
          vf dh = vfma(dyv, wo, loadu(dns + (2 * H1 + j) * lddn + off));
          cell_backward(a, lda, tc, H2_, j, off, v, dh, loadu(dns + (2 * H1 + H2 + j) * lddn + off), cold, dz2_,
                        dz16_2_, ds + (2 * H1 + H2 + j) * ldd + off, sb);
        }
        store(lwo_ + int64_t(j) * kW, dwo);
        add_bias_lanes(lb2_, H2_, j, sb);
      }
      {
        vf dbo = load(lbo_);
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) dbo = dbo + load(dy_ + s + v * kW);
        store(lbo_, dbo);
      }
      mark(kPhaseCellBackward2);
      for (int k = 0; k < K2u_; ++k) rows[k] = urow2_[k] + s;
      input_grad_gemm(wt2_, wtpair2_, K2u_, K2u_, 4 * H2_, dz2_, s, rows, H1_, K2_);
      mark(kPhaseInputGrad2);
      // Layer 1.
      for (int j = 0; j < H1_; ++j) {
        pf_.step();
        vf sb[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) {
          const int off = s + v * kW;
          vf dh = load(dh1_ + int64_t(j) * kLd + off) + loadu(dns + int64_t(j) * lddn + off);
          cell_backward(as + 4LL * j * lda + v * kW, lda, load(tc1_ + int64_t(j) * kLd + off), H1_, j, off, v, dh,
                        loadu(dns + (H1 + j) * lddn + off), loadu(st + (H1 + j) * lds + off), dz1_, dz16_1_,
                        ds + (H1 + j) * ldd + off, sb);
        }
        add_bias_lanes(lb1_, H1_, j, sb);
      }
      mark(kPhaseCellBackward1);
      for (int k = 0; k < K1u_; ++k) rows[k] = urow1_[k] + s;
      if (dg) {
        input_grad_gemm(wt1_, wtpair1_, K1u_, int(round_up(K1_, kKR)), 4 * H1_, dz1_, s, rows, D_, K1_);
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) {
          const int off = s + v * kW;
          store_out(dg + off, preprocess_backward(loadu(g + off), load(dx_ + off), load(dx_ + kLd + off)));
        }
      } else {  // no d_grad wanted: the h1 rows only
        input_grad_gemm(wt1_ + D_, wtpair1_ ? wtpair1_ + D_ : nullptr, K1u_, int(round_up(H1_, kKR)), 4 * H1_,
                        dz1_, s, rows + D_, 0, H1_);
      }
      mark(kPhaseInputGrad1);
    }
    weight_grad_gemm(lw2_, 4 * H2_, K2w_, dz2_, dz16_2_, u2_.data(), cols);
    weight_grad_gemm(lw1_, 4 * H1_, K1w_, dz1_, dz16_1_, u1_.data(), cols);
    mark(kPhaseWeightGrad);
  }

  static float hsum(const float* lane) {
    float s = 0.0f;
    for (int i = 0; i < kW; ++i) s += lane[i];
    return s;
  }

  void reduce_lanes(float* d_phi) {
    float* dw1 = d_phi + cfg_.w1_offset();
    float* dw2 = d_phi + cfg_.w2_offset();
    if (bf16_) {  // whole sums, [Kw][Gp] (weight_grad_gates)
      for (int64_t g = 0; g < 4LL * H1_; ++g)
        for (int k = 0; k < K1_; ++k) dw1[g * K1_ + k] += lw1_[k * Gp1_ + g];
      for (int64_t g = 0; g < 4LL * H2_; ++g)
        for (int k = 0; k < K2_; ++k) dw2[g * K2_ + k] += lw2_[k * Gp2_ + g];
    } else {
      for (int64_t g = 0; g < 4LL * H1_; ++g)
        for (int k = 0; k < K1_; ++k) dw1[g * K1_ + k] += hsum(lw1_ + (g * K1w_ + k) * kW);
      for (int64_t g = 0; g < 4LL * H2_; ++g)
        for (int k = 0; k < K2_; ++k) dw2[g * K2_ + k] += hsum(lw2_ + (g * K2w_ + k) * kW);
    }
    for (int64_t g = 0; g < 4LL * H1_; ++g) d_phi[cfg_.b1_offset() + g] += hsum(lb1_ + g * kW);
    for (int64_t g = 0; g < 4LL * H2_; ++g) d_phi[cfg_.b2_offset() + g] += hsum(lb2_ + g * kW);
    for (int64_t j = 0; j < H2_; ++j) d_phi[cfg_.wo_offset() + j] += hsum(lwo_ + j * kW);
    d_phi[cfg_.bo_offset()] += hsum(lbo_);
  }

  const StepConfig cfg_;
  const int D_, H1_, H2_, S_, K1_, K2_;
  const float scale_;
  const bool backward_;
  const float *W1_, *b1_, *W2_, *b2_, *wo_;
  float bo_;
  Preprocess pre_;
  float param_ = 1.0f, thr_ = 0.0f, ep_ = 1.0f;
  int K1w_, K2w_, K1u_, K2u_;
  float *wp1_, *bp1_, *wp2_, *bp2_, *in1_, *in2_, *gbuf_, *gs_, *sts_, *us_, *nss_;
  float *wt1_ = nullptr, *wt2_ = nullptr, *act1_ = nullptr, *dz1_ = nullptr, *dz2_ = nullptr;
  float *tc1_ = nullptr;  // tanh(c1') of the chunk (backward)
  float *dh1_ = nullptr, *dx_ = nullptr, *dy_ = nullptr, *junk_ = nullptr, *zero_ = nullptr;
  float *lw1_ = nullptr, *lw2_ = nullptr, *lb1_ = nullptr, *lb2_ = nullptr, *lwo_ = nullptr, *lbo_ = nullptr;
  std::vector<float*> urow1_, urow2_, rows_;
  bool bf16_ = false;  // cfg_.bf16_matmul
  uint32_t *wpair1_ = nullptr, *wpair2_ = nullptr, *wtpair1_ = nullptr, *wtpair2_ = nullptr;
  float *xb_ = nullptr, *db_ = nullptr, *ab_ = nullptr, *bb_ = nullptr;  // bf16 GEMM inputs (scratch)
  uint16_t *dz16_1_ = nullptr, *dz16_2_ = nullptr;  // the chunk's dz as bf16 rows (in ab_), layers 1 and 2
  std::vector<const uint32_t*> bbrows_;  // the rows of bb_
  uint32_t* dzt_ = nullptr;  // one layer's dz transposed into coordinate pairs (weight_grad_gates)
  int Gp1_ = 0, Gp2_ = 0;    // 4 H1, 4 H2 rounded up to a vector (bf16)
  std::vector<const float*> u1_, u2_;  // GEMM input rows of the current chunk (stage_inputs)
  Prefetcher pf_;
  bool nt_ = false;  // outputs of the current chunk are 64-byte aligned rows: use streaming stores
  bool nt_act_ = false;  // the same for the saved activations
  PhaseCycles* prof_ = nullptr;
  uint64_t last_ = 0;
};

}  // namespace

void lstm_step_forward_cpu(const StepConfig& cfg, const float* phi, const float* grad, const float* state,
                           float scale, int64_t n, int64_t begin, int64_t end, float* update, float* new_state,
                           float* activations) {
  if (end <= begin) return;
  Kernel k(cfg, phi, scale, /*backward=*/false);
  k.forward(grad, state, n, begin, end, update, new_state, activations);
}

void lstm_step_backward_cpu(const StepConfig& cfg, const float* phi, const float* grad, const float* state,
                            float scale, int64_t n, int64_t begin, int64_t end, const float* d_update,
                            const float* d_new_state, float* d_phi_partial, float* d_grad, float* d_state,
                            const float* activations) {
  if (end <= begin) return;
  Kernel k(cfg, phi, scale, /*backward=*/true);
  k.backward(grad, state, n, begin, end, d_update, d_new_state, d_grad, d_state, activations);
  k.finish(d_phi_partial);
}

void lstm_step_forward_cpu_slices(const StepConfig& cfg, const float* phi, float scale, const TensorArgs* tensors,
                                  const Slice* slices, int count) {
  if (count <= 0) return;
  Kernel k(cfg, phi, scale, /*backward=*/false);
  for (int i = 0; i < count; ++i) {
    const TensorArgs& t = tensors[slices[i].tensor];
    if (slices[i].end > slices[i].begin)
      k.forward(t.grad, t.state, t.n, slices[i].begin, slices[i].end, t.update, t.new_state, t.activations_out);
  }
}

void lstm_step_backward_cpu_slices(const StepConfig& cfg, const float* phi, float scale, const TensorArgs* tensors,
                                   const Slice* slices, int count, float* d_phi_partial) {
  if (count <= 0) return;
  Kernel k(cfg, phi, scale, /*backward=*/true);
  for (int i = 0; i < count; ++i) {
    const TensorArgs& t = tensors[slices[i].tensor];
    if (slices[i].end > slices[i].begin)
      k.backward(t.grad, t.state, t.n, slices[i].begin, slices[i].end, t.d_update, t.d_new_state, t.d_grad,
                 t.d_state, t.activations);
  }
  k.finish(d_phi_partial);
}

double fma_peak_per_second(double seconds) {
  // 12 independent chains (4-cycle FMA latency x 2-3 FMA pipes), no loads or stores in the loop.
  constexpr int kChains = 12;
  constexpr int64_t kBurst = 20000;
  vf acc[kChains];
  for (int k = 0; k < kChains; ++k) acc[k] = splat(1.0f + 1e-7f * float(k));
  const vf a = splat(0.9999999f), b = splat(1e-7f);
  double best = 0.0;
  const auto start = std::chrono::steady_clock::now();
  do {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < kBurst; ++i) {
#pragma GCC unroll 12
      for (int k = 0; k < kChains; ++k) acc[k] = vfma(acc[k], a, b);
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt > 0) best = std::max(best, double(kChains) * kW * kBurst / dt);
  } while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds);
  float sink = 0.0f;
  for (int k = 0; k < kChains; ++k) sink += acc[k][0];
  if (sink == 12345.0f) best += 1e-30;  // keeps the chains alive
  return best;
}

int sub_block_size() { return kSub; }

std::vector<std::vector<Slice>> plan_shards(const int64_t* n, int count, int threads) {
  threads = std::max(threads, 1);
  // The chunks, in tensor order, with their cost in sub-blocks.
  struct Chunk {
    int32_t tensor;
    int64_t begin, end, cost;
  };
  std::vector<Chunk> chunks;
  int64_t remaining = 0;
  for (int t = 0; t < count; ++t) {
    for (int64_t b = 0; b < n[t]; b += kChunk) {
      const int64_t e = std::min<int64_t>(n[t], b + kChunk);
      chunks.push_back(Chunk{t, b, e, (e - b + kSub - 1) / kSub});
      remaining += chunks.back().cost;
    }
  }
  // Guided self-scheduling: each shard takes 1/threads of the cost not yet planned, but at least two full chunks (a
  // shard's fixed cost, packing the weights and reducing its d_phi, then stays small), and a remainder below that
  // joins the shard before it. Threads taking the shards in order start on large ones and end on small ones together.
  constexpr int64_t kMinShardCost = 2 * (kChunk / kSub);
  std::vector<std::vector<Slice>> shards;
  for (size_t c = 0; c < chunks.size();) {
    const int64_t want = std::max<int64_t>(kMinShardCost, remaining / threads);
    std::vector<Slice> shard;
    int64_t cost = 0;
    while (c < chunks.size() && (cost < want || remaining - cost < kMinShardCost)) {
      const Chunk& k = chunks[c++];
      if (!shard.empty() && shard.back().tensor == k.tensor && shard.back().end == k.begin) shard.back().end = k.end;
      else shard.push_back(Slice{k.tensor, k.begin, k.end});
      cost += k.cost;
    }
    remaining -= cost;
    shards.push_back(std::move(shard));
  }
  return shards;
}

}  // namespace l2l
