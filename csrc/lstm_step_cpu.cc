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
//   sigmoid(x) = 1 / (1 + exp(-x));
//   tanh: the [9/8] odd/even rational minimax approximation also used by Eigen (so by TensorFlow's own CPU
//     tanh), clamped where it evaluates to +-1;
//   in the forward pass sigmoid(a) * tanh(b) is formed as p_b / ((1 + exp(-a)) q_b): one reciprocal, not two;
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
#include <new>
#include <vector>

#include "lstm_step.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__SSE2__)
// GCC 12 warns about the deliberately undefined pass-through operand inside the AVX-512 min/max intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
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
      !(std::isfinite(cfg.preprocess_param) && cfg.preprocess_param > 0.0f)) {
    return "preprocess_param must be finite and > 0 for the 'paper' and 'clamped' preprocessing";
  }
  return nullptr;
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

L2L_INLINE vf sigmoid(vf x) { return rcp(splat(1.0f) + exp_neg(x)); }

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
  return p * rcp((splat(1.0f) + exp_neg(a)) * q);
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
static_assert(kChunk % kSub == 0, "chunk must hold whole sub-blocks");

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
  L2L_INLINE void step() {
    for (int c = per_call_; c > 0 && si_ < ns_; --c) {
      const Stream& st = s_[si_];
      const char* p = st.base + row_ * st.ld + int64_t(line_) * 64;
      if (st.write) __builtin_prefetch(p, 1, 2);
      else __builtin_prefetch(p, 0, 2);
      if (++line_ == st.lines) {
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

bool aligned64(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }

// Per-thread scratch of the forward Kernel (grow-only; one forward Kernel per thread at a time).
float* forward_scratch(int64_t floats) {
  thread_local std::unique_ptr<float, AlignedFree> buf;
  thread_local int64_t size = 0;
  if (floats > size) {
    buf.reset(aligned_floats(floats));
    size = floats;
  }
  return buf.get();
}

class Kernel {
 public:
  Kernel(const StepConfig& cfg, const float* phi, float scale, bool backward)
      : cfg_(cfg), D_(cfg.input_size()), H1_(cfg.hidden1), H2_(cfg.hidden2), S_(int(cfg.state_rows())),
        K1_(D_ + H1_), K2_(H1_ + H2_), scale_(scale), backward_(backward) {
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
    K1u_ = round_up(K1_, kKR);
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
    int64_t o_wt1 = 0, o_wt2 = 0, o_act1 = 0, o_act2 = 0, o_dz1 = 0, o_dz2 = 0, o_dh1 = 0, o_dx = 0, o_dy = 0,
            o_junk = 0, o_zero = 0, o_lw1 = 0, o_lw2 = 0, o_lb1 = 0, o_lb2 = 0, o_lwo = 0, o_lbo = 0;
    if (backward_) {
      o_wt1 = take(4LL * H1_ * K1u_);
      o_wt2 = take(4LL * H2_ * K2u_);
      o_act1 = take(5LL * H1_ * kLd);
      o_act2 = take(5LL * H2_ * kLd);
      o_dz1 = take(4LL * H1_ * kLd);
      o_dz2 = take(4LL * H2_ * kLd);
      o_dh1 = take(int64_t(H1_) * kLd);
      o_dx = take(2LL * kLd);
      o_dy = take(kLd);
      o_junk = take(int64_t(kKR) * kLd);
      o_zero = take(kLd);
      o_lw1 = take(4LL * H1_ * K1w_ * kW);
      o_lw2 = take(4LL * H2_ * K2w_ * kW);
      o_lb1 = take(4LL * H1_ * kW);
      o_lb2 = take(4LL * H2_ * kW);
      o_lwo = take(int64_t(H2_) * kW);
      o_lbo = take(kW);
    }
    float* m;
    if (backward_) {
      mem_.reset(aligned_floats(floats));
      m = mem_.get();
      std::memset(m, 0, sizeof(float) * floats);  // the lane accumulators, junk and zero rows must start at 0
    } else {
      // The forward writes every element it reads (staged rows are zero-padded by stage_in), so its ~265 KB (at
      // 20/20) come uncleared from a per-thread buffer kept between calls: a fresh allocation of that size is an
      // mmap whose page faults, with the memset, cost ~25 us per call, which dominated small N.
      m = forward_scratch(floats);
    }
    wp1_ = m + o_wp1; bp1_ = m + o_bp1; wp2_ = m + o_wp2; bp2_ = m + o_bp2;
    in1_ = m + o_in1; in2_ = m + o_in2; gbuf_ = m + o_gbuf;
    gs_ = m + o_gs; sts_ = m + o_sts; us_ = m + o_us; nss_ = m + o_nss;
    pack(W1_, b1_, H1_, K1_, wp1_, bp1_);
    pack(W2_, b2_, H2_, K2_, wp2_, bp2_);
    if (backward_) {
      wt1_ = m + o_wt1; wt2_ = m + o_wt2;
      act1_ = m + o_act1; act2_ = m + o_act2;
      dz1_ = m + o_dz1; dz2_ = m + o_dz2;
      dh1_ = m + o_dh1; dx_ = m + o_dx; dy_ = m + o_dy; junk_ = m + o_junk; zero_ = m + o_zero;
      lw1_ = m + o_lw1; lw2_ = m + o_lw2; lb1_ = m + o_lb1; lb2_ = m + o_lb2; lwo_ = m + o_lwo; lbo_ = m + o_lbo;
      for (int64_t g = 0; g < 4LL * H1_; ++g)
        std::memcpy(wt1_ + g * K1u_, W1_ + g * K1_, sizeof(float) * K1_);
      for (int64_t g = 0; g < 4LL * H2_; ++g)
        std::memcpy(wt2_ + g * K2u_, W2_ + g * K2_, sizeof(float) * K2_);
      urow1_.resize(K1u_);
      urow2_.resize(K2u_);
      rows_.resize(std::max(K1u_, K2u_));
    }
  }

  // ---- forward over [begin, end)
  void forward(const float* grad, const float* state, int64_t n, int64_t begin, int64_t end, float* update,
               float* new_state) {
    const bool nt = n % 16 == 0 && begin % 16 == 0 && aligned64(update) && aligned64(new_state);
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t cnt = std::min<int64_t>(kChunk, end - c0);
      const int64_t next = c0 + kChunk, ncols = std::min<int64_t>(kChunk, end - next);
      pf_.clear();
      pf_.add(grad + next, 0, 1, ncols, false);
      pf_.add(state + next, n, S_, ncols, false);
      if (!nt && new_state != state) pf_.add(new_state + next, n, S_, ncols, true);
      pf_.plan((kChunk / kSub) * (H1_ + H2_));
      if (cnt == kChunk) {
        nt_ = nt;
        fwd_chunk<false>(grad + c0, state + c0, n, update + c0, new_state + c0, n);
        nt_ = false;
      } else {
        stage_in(grad + c0, state + c0, n, cnt);
        fwd_chunk<false>(gs_, sts_, kLd, us_, nss_, kLd);
        std::memcpy(update + c0, us_, sizeof(float) * cnt);
        for (int r = 0; r < S_; ++r)
          std::memcpy(new_state + r * n + c0, nss_ + int64_t(r) * kLd, sizeof(float) * cnt);
      }
    }
    store_fence();
  }

  // ---- backward over [begin, end); d_phi_partial accumulated into.
  void backward(const float* grad, const float* state, int64_t n, int64_t begin, int64_t end,
                const float* d_update, const float* d_new_state, float* d_phi_partial, float* d_grad,
                float* d_state) {
    const bool nt = n % 16 == 0 && begin % 16 == 0 && aligned64(d_grad) && aligned64(d_state);
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t cnt = std::min<int64_t>(kChunk, end - c0);
      const int64_t next = c0 + kChunk, ncols = std::min<int64_t>(kChunk, end - next);
      pf_.clear();
      pf_.add(grad + next, 0, 1, ncols, false);
      pf_.add(d_update + next, 0, 1, ncols, false);
      pf_.add(state + next, n, S_, ncols, false);
      if (d_new_state) pf_.add(d_new_state + next, n, S_, ncols, false);
      if (!nt && d_state != d_new_state) pf_.add(d_state + next, n, S_, ncols, true);
      pf_.plan(2 * (kChunk / kSub) * (H1_ + H2_));
      if (cnt == kChunk) {
        const float* dns = d_new_state ? d_new_state + c0 : zero_;
        nt_ = nt;
        bwd_chunk(grad + c0, state + c0, n, d_update + c0, dns, d_new_state ? n : 0, d_grad + c0,
                  d_state + c0, n);
        nt_ = false;
      } else {
        // Padded columns: zero gradient, state and upstream gradients, so every dz there is 0 and they add
        // nothing to d_phi.
        stage_in(grad + c0, state + c0, n, cnt);
        float* dus = us_;
        float* dnss = nss_;
        std::memset(dus, 0, sizeof(float) * kLd);
        std::memcpy(dus, d_update + c0, sizeof(float) * cnt);
        for (int r = 0; r < S_; ++r) {
          float* row = dnss + int64_t(r) * kLd;
          std::memset(row, 0, sizeof(float) * kLd);
          if (d_new_state) std::memcpy(row, d_new_state + r * n + c0, sizeof(float) * cnt);
        }
        // Outputs go to the same staging buffers (d_grad over d_update, d_state over d_new_state: allowed).
        bwd_chunk(gs_, sts_, kLd, dus, dnss, kLd, dus, dnss, kLd);
        std::memcpy(d_grad + c0, dus, sizeof(float) * cnt);
        for (int r = 0; r < S_; ++r)
          std::memcpy(d_state + r * n + c0, dnss + int64_t(r) * kLd, sizeof(float) * cnt);
      }
    }
    store_fence();
    reduce_lanes(d_phi_partial);
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

  void stage_in(const float* g, const float* st, int64_t ld, int64_t cnt) {
    std::memset(gs_, 0, sizeof(float) * kLd);
    std::memcpy(gs_, g, sizeof(float) * cnt);
    for (int r = 0; r < S_; ++r) {
      float* row = sts_ + int64_t(r) * kLd;
      std::memset(row, 0, sizeof(float) * kLd);
      std::memcpy(row, st + r * ld, sizeof(float) * cnt);
    }
  }

  L2L_INLINE void store_out(float* p, vf v) const {
    if (nt_) stream(p, v);
    else storeu(p, v);
  }

  // ---- preprocessing
  L2L_INLINE void preprocess(vf g, vf* f0, vf* f1) const {
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

  // d(loss)/d(grad) from d(loss)/d(features); derivatives as listed in lstm_step.h.
  L2L_INLINE vf preprocess_backward(vf g, vf d0, vf d1) const {
    if (pre_ == Preprocess::kNone) return d0;
    const vf a = vabs(g);
    if (pre_ == Preprocess::kPaper) {
      vi big = a >= splat(thr_);
      return big ? d0 / (splat(param_) * g) : d1 * splat(ep_);
    }
    const vf ae = a + splat(FLT_EPSILON);
    vf l = log_(ae) / splat(param_);
    vf t0 = l > splat(-1.0f) ? d0 * vsign(g) / (splat(param_) * ae) : splat(0.0f);
    vf t1 = vabs(g * splat(ep_)) < splat(1.0f) ? d1 * splat(ep_) : splat(0.0f);
    return t0 + t1;
  }

  // ---- gate GEMM of one layer on one sub-block: for every unit j, out[j][q][v] = b[q j] + sum_k W[q j][k] in[k][v]
  // (q: gate i, f, g, o; v: the kNV vectors of the sub-block). Register tile: the 4 gates of one unit x kNV
  // vectors (16 accumulators with AVX-512). Not inlined and separate from the pointwise math, so that the
  // accumulators own the registers and the FMA stream runs uninterrupted across units.
  __attribute__((noinline)) static void gates(const float* __restrict wp, const float* __restrict bp,
                                              const float* __restrict in, int K, int H, float* __restrict out) {
    for (int j = 0; j < H; ++j) {
      const float* wpj = wp + int64_t(j) * K * 4;
      vf acc[4][kNV];
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const vf b = splat(bp[4 * j + q]);
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[q][v] = b;
      }
      for (int k = 0; k < K; ++k) {
        const float* u = in + int64_t(k) * kLd;
        vf x[kNV];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) x[v] = load(u + v * kW);
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

  // ---- forward of one chunk of kChunk coordinates. st/ns: first row of the chunk, rows lds/ldn apart.
  // kBwd: keep the activations in act1_/act2_ (and h1' in in2_) instead of writing outputs.
  template <bool kBwd>
  void fwd_chunk(const float* __restrict g, const float* st, int64_t lds, float* up, float* ns, int64_t ldn) {
    for (int col = 0; col < kChunk; col += kW) {
      vf f0, f1;
      preprocess(loadu(g + col), &f0, &f1);
      store(in1_ + col, f0);
      if (D_ == 2) store(in1_ + kLd + col, f1);
    }
    for (int r = 0; r < H1_; ++r) std::memcpy(in1_ + int64_t(D_ + r) * kLd, st + r * lds, sizeof(float) * kChunk);
    for (int r = 0; r < H2_; ++r)
      std::memcpy(in2_ + int64_t(H1_ + r) * kLd, st + (2 * int64_t(H1_) + r) * lds, sizeof(float) * kChunk);

    for (int s = 0; s < kChunk; s += kSub) {
      // Layer 1.
      gates(wp1_, bp1_, in1_ + s, K1_, H1_, gbuf_);
      for (int j = 0; j < H1_; ++j) {
        pf_.step();
        const float* acc = gbuf_ + int64_t(j) * 4 * kSub;
        const float* cold = st + (int64_t(H1_) + j) * lds + s;
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) {
          const int off = s + v * kW;
          const vf zi = load(acc + (0 * kNV + v) * kW), zf = load(acc + (1 * kNV + v) * kW);
          const vf zg = load(acc + (2 * kNV + v) * kW), zo = load(acc + (3 * kNV + v) * kW);
          if (kBwd) {
            vf ig = sigmoid(zi), fg = sigmoid(zf), gg = tanh_(zg), og = sigmoid(zo);
            vf cn = vfma(fg, loadu(cold + v * kW), ig * gg);
            vf tc = tanh_(cn);
            store(in2_ + int64_t(j) * kLd + off, og * tc);
            float* a = act1_ + int64_t(j) * kLd + off;
            const int64_t st5 = int64_t(H1_) * kLd;
            store(a, ig); store(a + st5, fg); store(a + 2 * st5, gg); store(a + 3 * st5, og); store(a + 4 * st5, tc);
          } else {
            vf cn = vfma(sigmoid(zf), loadu(cold + v * kW), sigmoid_times_tanh(zi, zg));
            vf h = sigmoid_times_tanh(zo, cn);
            store(in2_ + int64_t(j) * kLd + off, h);
            store_out(ns + int64_t(j) * ldn + off, h);
            store_out(ns + (int64_t(H1_) + j) * ldn + off, cn);
          }
        }
      }
      // Layer 2 and the output.
      vf ua[kNV];
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) ua[v] = splat(0.0f);
      gates(wp2_, bp2_, in2_ + s, K2_, H2_, gbuf_);
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
          if (kBwd) {
            vf ig = sigmoid(zi), fg = sigmoid(zf), gg = tanh_(zg), og = sigmoid(zo);
            vf cn = vfma(fg, loadu(cold + v * kW), ig * gg);
            vf tc = tanh_(cn);
            float* a = act2_ + int64_t(j) * kLd + off;
            const int64_t st5 = int64_t(H2_) * kLd;
            store(a, ig); store(a + st5, fg); store(a + 2 * st5, gg); store(a + 3 * st5, og); store(a + 4 * st5, tc);
          } else {
            vf cn = vfma(sigmoid(zf), loadu(cold + v * kW), sigmoid_times_tanh(zi, zg));
            vf h = sigmoid_times_tanh(zo, cn);
            store_out(ns + (2 * int64_t(H1_) + j) * ldn + off, h);
            store_out(ns + (2 * int64_t(H1_) + H2_ + j) * ldn + off, cn);
            ua[v] = vfma(wo, h, ua[v]);
          }
        }
      }
      if (!kBwd) {
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) store_out(up + s + v * kW, splat(scale_) * (ua[v] + splat(bo_)));
      }
    }
  }

  // Backward of the pointwise LSTM math of unit j of one layer, one vector: dh (into h'), the upstream dc',
  // c_old; writes the dz rows and d c_old; adds the dz to sb (bias-gradient partial sums of the 4 gates).
  L2L_INLINE void cell_backward(const float* act, int H, int j, int off, vf dh, vf dc_in, vf cold, float* dz,
                                float* dcold_out, vf (&sb)[4]) {
    const int64_t st5 = int64_t(H) * kLd;
    const float* a = act + int64_t(j) * kLd + off;
    vf ig = load(a), fg = load(a + st5), gg = load(a + 2 * st5), og = load(a + 3 * st5), tc = load(a + 4 * st5);
    const vf one = splat(1.0f);
    vf dc = vfma(dh * og, one - tc * tc, dc_in);
    vf dzo = dh * tc * og * (one - og);
    vf dzi = dc * gg * ig * (one - ig);
    vf dzg = dc * ig * (one - gg * gg);
    vf dzf = dc * cold * fg * (one - fg);
    store_out(dcold_out, dc * fg);
    float* d = dz + int64_t(j) * kLd + off;
    store(d, dzi); store(d + st5, dzf); store(d + 2 * st5, dzg); store(d + 3 * st5, dzo);
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
  __attribute__((noinline)) static void input_grad(const float* __restrict wt, int Ku, int G,
                                                   const float* __restrict dz, float* const* rows, int out_lo,
                                                   int out_hi, bool nt) {
    for (int k0 = 0; k0 < Ku; k0 += kKR) {
      vf acc[kKR][kNV];
#pragma GCC unroll 4
      for (int r = 0; r < kKR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[r][v] = splat(0.0f);
      for (int g = 0; g < G; ++g) {
        const float* d = dz + int64_t(g) * kLd;
        vf x[kNV];
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) x[v] = load(d + v * kW);
        const float* w = wt + int64_t(g) * Ku + k0;
#pragma GCC unroll 4
        for (int r = 0; r < kKR; ++r) {
          const vf wv = splat(w[r]);
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) acc[r][v] = vfma(wv, x[v], acc[r][v]);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < kKR; ++r) {
        float* row = rows[k0 + r];
        if (nt && k0 + r >= out_lo && k0 + r < out_hi) {
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) stream(row + v * kW, acc[r][v]);
        } else {
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) storeu(row + v * kW, acc[r][v]);
        }
      }
    }
  }

  // lanes[g][k] (kW partial sums each) += sum over the chunk of dz[g][:] * u[k][:].
  __attribute__((noinline)) static void weight_grad(float* __restrict lanes, int G, int Kw, const float* __restrict dz,
                          const float* __restrict u) {
    for (int g0 = 0; g0 < G; g0 += kGR) {
      for (int k0 = 0; k0 < Kw; k0 += kKC) {
        vf acc[kGR][kKC];
#pragma GCC unroll 8
        for (int r = 0; r < kGR; ++r)
#pragma GCC unroll 8
          for (int c = 0; c < kKC; ++c) acc[r][c] = splat(0.0f);
        for (int col = 0; col < kChunk; col += kW) {
          vf a[kGR], b[kKC];
#pragma GCC unroll 8
          for (int r = 0; r < kGR; ++r) a[r] = load(dz + int64_t(g0 + r) * kLd + col);
#pragma GCC unroll 8
          for (int c = 0; c < kKC; ++c) b[c] = load(u + int64_t(k0 + c) * kLd + col);
#pragma GCC unroll 8
          for (int r = 0; r < kGR; ++r)
#pragma GCC unroll 8
            for (int c = 0; c < kKC; ++c) acc[r][c] = vfma(a[r], b[c], acc[r][c]);
        }
#pragma GCC unroll 8
        for (int r = 0; r < kGR; ++r)
#pragma GCC unroll 8
          for (int c = 0; c < kKC; ++c) {
            float* l = lanes + (int64_t(g0 + r) * Kw + k0 + c) * kW;
            store(l, load(l) + acc[r][c]);
          }
      }
    }
  }

  // ---- backward of one chunk. Recomputes the forward activations (nothing is saved by the forward op: the
  // step is memory-bound, and recomputing from the state costs arithmetic, not memory traffic).
  void bwd_chunk(const float* g, const float* st, int64_t lds, const float* du, const float* dns, int64_t lddn,
                 float* dg, float* ds, int64_t ldd) {
    fwd_chunk<true>(g, st, lds, nullptr, nullptr, 0);
    for (int col = 0; col < kChunk; col += kW) store(dy_ + col, splat(scale_) * loadu(du + col));
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
    for (int s = 0; s < kChunk; s += kSub) {
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
          const float* a = act2_ + int64_t(j) * kLd + off;
          const int64_t st5 = H2 * kLd;
          dwo = vfma(dyv, load(a + 3 * st5) * load(a + 4 * st5), dwo);
          vf dh = vfma(dyv, wo, loadu(dns + (2 * H1 + j) * lddn + off));
          cell_backward(act2_, H2_, j, off, dh, loadu(dns + (2 * H1 + H2 + j) * lddn + off),
                        loadu(st + (2 * H1 + H2 + j) * lds + off), dz2_, ds + (2 * H1 + H2 + j) * ldd + off, sb);
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
      for (int k = 0; k < K2u_; ++k) rows[k] = urow2_[k] + s;
      input_grad(wt2_, K2u_, 4 * H2_, dz2_ + s, rows, H1_, K2_, nt_);
      // Layer 1.
      for (int j = 0; j < H1_; ++j) {
        pf_.step();
        vf sb[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) {
          const int off = s + v * kW;
          vf dh = load(dh1_ + int64_t(j) * kLd + off) + loadu(dns + int64_t(j) * lddn + off);
          cell_backward(act1_, H1_, j, off, dh, loadu(dns + (H1 + j) * lddn + off), loadu(st + (H1 + j) * lds + off),
                        dz1_, ds + (H1 + j) * ldd + off, sb);
        }
        add_bias_lanes(lb1_, H1_, j, sb);
      }
      for (int k = 0; k < K1u_; ++k) rows[k] = urow1_[k] + s;
      input_grad(wt1_, K1u_, 4 * H1_, dz1_ + s, rows, D_, K1_, nt_);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) {
        const int off = s + v * kW;
        store_out(dg + off, preprocess_backward(loadu(g + off), load(dx_ + off), load(dx_ + kLd + off)));
      }
    }
    weight_grad(lw2_, 4 * H2_, K2w_, dz2_, in2_);
    weight_grad(lw1_, 4 * H1_, K1w_, dz1_, in1_);
  }

  static float hsum(const float* lane) {
    float s = 0.0f;
    for (int i = 0; i < kW; ++i) s += lane[i];
    return s;
  }

  void reduce_lanes(float* d_phi) {
    float* dw1 = d_phi + cfg_.w1_offset();
    for (int64_t g = 0; g < 4LL * H1_; ++g)
      for (int k = 0; k < K1_; ++k) dw1[g * K1_ + k] += hsum(lw1_ + (g * K1w_ + k) * kW);
    float* dw2 = d_phi + cfg_.w2_offset();
    for (int64_t g = 0; g < 4LL * H2_; ++g)
      for (int k = 0; k < K2_; ++k) dw2[g * K2_ + k] += hsum(lw2_ + (g * K2w_ + k) * kW);
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
  std::unique_ptr<float, AlignedFree> mem_;
  float *wp1_, *bp1_, *wp2_, *bp2_, *in1_, *in2_, *gbuf_, *gs_, *sts_, *us_, *nss_;
  float *wt1_ = nullptr, *wt2_ = nullptr, *act1_ = nullptr, *act2_ = nullptr, *dz1_ = nullptr, *dz2_ = nullptr;
  float *dh1_ = nullptr, *dx_ = nullptr, *dy_ = nullptr, *junk_ = nullptr, *zero_ = nullptr;
  float *lw1_ = nullptr, *lw2_ = nullptr, *lb1_ = nullptr, *lb2_ = nullptr, *lwo_ = nullptr, *lbo_ = nullptr;
  std::vector<float*> urow1_, urow2_, rows_;
  Prefetcher pf_;
  bool nt_ = false;  // outputs of the current chunk are 64-byte aligned rows: use streaming stores
};

// =========================================================================================================
// AMX-BF16 forward (x86-64 CPUs with AMX-TILE, AMX-BF16 and AVX-512 F/DQ/BW/VL/BF16, e.g. Sapphire Rapids;
// chosen at run time, so the functions below carry their own target attributes and the file builds for any
// -march). The gate GEMMs run on the tile unit, everything else in AVX-512.
//
// Precision ("bf16x6"): a GEMM input u (fp32) is split exactly into three bf16 by truncation, u = u0 + u1 + u2
// (u0 = the top 16 bits of u, u1 = those of u - u0, u2 = the rest, at most 8 significant bits), a weight w
// (scaled, see below) into three by rounding to nearest, w = w0 + w1 + w2 (+ < 2^-26 |w|), and the gate sums are
// z = sum of w0 u0, w0 u1, w1 u0, w0 u2, w1 u1, w2 u0 (all products of order <= 2) with fp32 accumulation on the
// tile unit: the dropped products are < 2^-22 |w u|, so z is about as accurate as the fp32 GEMM of the portable
// kernel (bf16x3, two pieces each, would only give ~2^-17 relative per product: gate errors ~1e-4 at |z| ~ 4).
// The tile unit flushes bf16 and fp32 subnormals to zero: absolute errors < 1e-37.
// The six products are one GEMM over a concatenated K: with K' = K rounded up to even, B column (per coordinate)
// = [u0 | u1 | u2 | u0 | u1 | u0 | 1 1 1 0 | 0...], A row (per gate row) = [w0 | w0 | w0 | w1 | w1 | w2 |
// b0 b1 b2 0 | 0...], 3 K' + 2 bf16 pairs: 5 K tiles for layer 1 at 20/20 (K = D + H1 = 22), 8 for layer 2
// (K = 40); K' <= 42 fits 8. Gate rows are 16-row M tiles (80 rows = 5 tiles, at most 5), the 16 coordinates
// of a block the N dimension: a C tile stored to a scratch gives one zmm per gate row, read by the vector code.
//
// Activations: the weights and biases of the sigmoid gates (i, f, o) are pre-scaled by -log2(e) and those of
// the g gate by -2 log2(e), so the GEMM gives y = log2 of exp(-z) (exp(-2 z) for g) directly;
// E(y) = 2^min(y, 40) (vreduce + degree-5 polynomial + vscalef, relative error < 1.5e-7); then with
// a = 1 + E_f, b = (1 + E_i)(1 + E_g), r = 1 / (a b) (rcp14 + Newton):
//   c' = sigmoid(f) c + sigmoid(i) tanh(g) = c (b r) + (1 - E_g) (a r)          (one reciprocal for three)
//   h' = sigmoid(o) tanh(c') = (1 - E_c) / ((1 + E_o)(1 + E_c)),  E_c = E(-2 log2(e) c')
// The cap 40 bounds a b by 2^120 (no overflow for any c) and moves sigmoid / tanh by < 2e-12 absolute; tanh
// via exponentials is accurate to ~2e-7 absolute near 0 (relative there for the portable rational form).
//
// Opt-in only (CpuIsa::kAmx): slower than the portable kernel as it stands, see lstm_step_forward_cpu_isa.
//
// Work unit: blocks of 16 coordinates, software-pipelined so that the tile unit runs the GEMMs of other blocks
// while the vector units do activations: iteration i stages block i+1 (preprocessing, split of its layer-1
// inputs, check), then runs the layer-1 activations of block i (ending with the split of its layer-2 inputs)
// with the layer-2 GEMM of block i-1 issued a step at a time between the units, then the layer-2 activations of
// block i-1 with the layer-1 GEMM of block i+1 interleaved likewise. (Issued as one burst, the dependent tile
// operations hold the reorder buffer and the vector work waits behind them.) Non-finite GEMM inputs (x, h1, h2
// rows: a NaN / inf gradient or state) are found while staging, before anything of the block is written, and
// the portable kernel does that block: such inputs give exactly the portable results. A partial last block
// is staged through zero-padded local rows.
#if defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define L2L_HAVE_AMX 1
#else
#define L2L_HAVE_AMX 0
#endif

#if L2L_HAVE_AMX
#define L2L_AMX_TARGET \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma,bmi,bmi2")))
#define L2L_AMX_INLINE inline __attribute__((always_inline)) L2L_AMX_TARGET

constexpr int kAmxMaxK = 42;       // K' <= 42: 3 K' + 2 <= 128 bf16 pairs = 8 K tiles
constexpr int kAmxMaxGates = 80;   // 4 H <= 80: at most 5 M tiles (C tiles 0-4)
constexpr float kAmxCap = 40.0f;   // E(y) = 2^min(y, kAmxCap)

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// CPUID / XCR0 / Linux permission for the tile data. Called once.
bool amx_probe() {
  uint32_t a, b, c, d;
  auto cpuid = [&](uint32_t leaf, uint32_t sub) {
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaf), "c"(sub));
  };
  cpuid(0, 0);
  if (a < 7) return false;
  cpuid(1, 0);
  if (!(c & (1u << 27))) return false;  // OSXSAVE
  cpuid(7, 0);
  const uint32_t ebx7 = b, edx7 = d, max_sub = a;
  const bool avx512 = (ebx7 & (1u << 16)) && (ebx7 & (1u << 17)) && (ebx7 & (1u << 30)) && (ebx7 & (1u << 31));
  const bool amx = (edx7 & (1u << 24)) && (edx7 & (1u << 22));  // AMX-TILE, AMX-BF16
  if (!avx512 || !amx || max_sub < 1) return false;
  cpuid(7, 1);
  if (!(a & (1u << 5))) return false;  // AVX512_BF16
  uint32_t xlo, xhi;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const uint64_t xcr0 = (uint64_t(xhi) << 32) | xlo;
  const uint64_t need = (1u << 1) | (1u << 2) | (7u << 5) | (3u << 17);  // SSE, AVX, opmask/ZMM, XTILECFG/DATA
  if ((xcr0 & need) != need) return false;
#if defined(__linux__)
  // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): once per process, before any tile use.
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return false;
#endif
  return true;
}

bool amx_disabled_by_env() {
  const char* e = std::getenv("L2L_TF_DISABLE_AMX");
  return e && *e && std::strcmp(e, "0") != 0;
}

bool amx_usable() {
  static const bool ok = !amx_disabled_by_env() && amx_probe();
  return ok;
}

L2L_AMX_INLINE __m512 a1(float x) { return _mm512_set1_ps(x); }

// 2^min(y, cap) (NaN propagates; -inf -> 0).
L2L_AMX_INLINE __m512 amx_exp2(__m512 y) {
  y = _mm512_min_ps(a1(kAmxCap), y);
  const __m512 f = _mm512_reduce_ps(y, 0x01);
  __m512 p = _mm512_fmadd_ps(a1(1.8775736680e-03f), f, a1(8.9893480763e-03f));
  p = _mm512_fmadd_ps(p, f, a1(5.5826310068e-02f));
  p = _mm512_fmadd_ps(p, f, a1(2.4015362561e-01f));
  p = _mm512_fmadd_ps(p, f, a1(6.9315308332e-01f));
  p = _mm512_fmadd_ps(p, f, a1(9.9999994040e-01f));
  return _mm512_scalef_ps(p, y);
}

L2L_AMX_INLINE __m512 amx_rcp(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, a1(1.0f)), r);
}

// One LSTM cell on 16 coordinates from the pre-scaled gates (see above).
L2L_AMX_INLINE void amx_cell(__m512 yi, __m512 yf, __m512 yg, __m512 yo, __m512 c, __m512* c_out, __m512* h_out) {
  const __m512 one = a1(1.0f);
  const __m512 ei = amx_exp2(yi), ef = amx_exp2(yf), eg = amx_exp2(yg), eo = amx_exp2(yo);
  const __m512 a = _mm512_add_ps(one, ef);
  const __m512 t = _mm512_add_ps(one, eg);
  const __m512 b = _mm512_fmadd_ps(ei, t, t);
  const __m512 r = amx_rcp(_mm512_mul_ps(a, b));
  const __m512 cn =
      _mm512_fmadd_ps(c, _mm512_mul_ps(b, r), _mm512_mul_ps(_mm512_sub_ps(one, eg), _mm512_mul_ps(a, r)));
  const __m512 ec = amx_exp2(_mm512_mul_ps(cn, a1(-2.0f * 1.44269504088896341f)));
  const __m512 t2 = _mm512_add_ps(one, ec);
  *c_out = cn;
  *h_out = _mm512_mul_ps(_mm512_sub_ps(one, ec), amx_rcp(_mm512_fmadd_ps(eo, t2, t2)));
}

// Splits K' fp32 rows of 16 coordinates (row(k): pointer) into the VNNI bf16 B operand of one layer (pair
// row p of segment s at B + (s K'/2 + p) 32; the bias and zero pair rows after the six segments are constant).
// Returns acc + the sum of the first remainders: not finite iff some input is NaN or inf.
template <class RowFn>
L2L_AMX_INLINE __m512 amx_split_rows(uint16_t* B, int kp, RowFn row, __m512 acc) {
  const __m512i m = _mm512_set1_epi32(int32_t(0xffff0000u));
  const int half = kp / 2;
  for (int p = 0; p < half; ++p) {
    const __m512i x0 = _mm512_castps_si512(_mm512_loadu_ps(row(2 * p)));
    const __m512i x1 = _mm512_castps_si512(_mm512_loadu_ps(row(2 * p + 1)));
    const __m512i a0 = _mm512_and_si512(x0, m), b0 = _mm512_and_si512(x1, m);
    const __m512i p0 = _mm512_or_si512(b0, _mm512_srli_epi32(x0, 16));
    const __m512 ra = _mm512_sub_ps(_mm512_castsi512_ps(x0), _mm512_castsi512_ps(a0));
    const __m512 rb = _mm512_sub_ps(_mm512_castsi512_ps(x1), _mm512_castsi512_ps(b0));
    acc = _mm512_add_ps(acc, _mm512_add_ps(ra, rb));
    const __m512i a1i = _mm512_and_si512(_mm512_castps_si512(ra), m), b1i = _mm512_and_si512(_mm512_castps_si512(rb), m);
    const __m512i p1 = _mm512_or_si512(b1i, _mm512_srli_epi32(_mm512_castps_si512(ra), 16));
    const __m512 sa = _mm512_sub_ps(ra, _mm512_castsi512_ps(a1i));
    const __m512 sb = _mm512_sub_ps(rb, _mm512_castsi512_ps(b1i));
    // (sb & m) | (sa >> 16): imm 0xf8 = A | (B & C) with A = sa >> 16, B = sb, C = m.
    const __m512i p2 = _mm512_ternarylogic_epi32(_mm512_srli_epi32(_mm512_castps_si512(sa), 16),
                                                 _mm512_castps_si512(sb), m, 0xf8);
    _mm512_store_si512(B + p * 32, p0);
    _mm512_store_si512(B + (half + p) * 32, p1);
    _mm512_store_si512(B + (2 * half + p) * 32, p2);
    _mm512_store_si512(B + (3 * half + p) * 32, p0);
    _mm512_store_si512(B + (4 * half + p) * 32, p1);
    _mm512_store_si512(B + (5 * half + p) * 32, p0);
  }
  return acc;
}

// One GEMM of a layer, G (M tiles x 16 rows x 16 floats) = A (M x NK tiles) B (NK tiles), as a sequence of steps
// (one A tile load and one dot product each) in the order k outer, m inner. Tiles: C of M tile m in tmm m (<= 4),
// A in tmm 5 / 6 alternately, B in tmm 7.
struct AmxJob {
  const uint16_t* A = nullptr;
  const uint16_t* B = nullptr;
  float* G = nullptr;
  int M = 0, NK = 0, steps = 0, s = 0;
};

#define L2L_AMX_DP(C, AR)                                     \
  do {                                                        \
    if (k == 0) _tile_zero(C);                                \
    _tile_loadd(AR, a, 64);                                   \
    _tile_dpbf16ps(C, AR, 7);                                 \
    if (k == j.NK - 1) _tile_stored(C, j.G + (C) * 256, 64);  \
  } while (0)

L2L_AMX_TARGET __attribute__((noinline)) void amx_run(AmxJob& j, int upto) {
  upto = std::min(upto, j.steps);
  for (; j.s < upto; ++j.s) {
    const int k = j.s / j.M, mt = j.s - k * j.M;
    if (mt == 0) _tile_loadd(7, j.B + k * 512, 64);
    const uint16_t* a = j.A + (int64_t(mt) * j.NK + k) * 512;
    switch (mt * 2 + (j.s & 1)) {
      case 0: L2L_AMX_DP(0, 5); break;
      case 1: L2L_AMX_DP(0, 6); break;
      case 2: L2L_AMX_DP(1, 5); break;
      case 3: L2L_AMX_DP(1, 6); break;
      case 4: L2L_AMX_DP(2, 5); break;
      case 5: L2L_AMX_DP(2, 6); break;
      case 6: L2L_AMX_DP(3, 5); break;
      case 7: L2L_AMX_DP(3, 6); break;
      case 8: L2L_AMX_DP(4, 5); break;
      default: L2L_AMX_DP(4, 6); break;
    }
  }
}
#undef L2L_AMX_DP

class AmxForward {
 public:
  static bool fits(const StepConfig& cfg) {
    return cfg.input_size() + cfg.hidden1 <= kAmxMaxK && cfg.hidden1 + cfg.hidden2 <= kAmxMaxK &&
           4 * cfg.hidden1 <= kAmxMaxGates && 4 * cfg.hidden2 <= kAmxMaxGates;
  }

  L2L_AMX_TARGET AmxForward(const StepConfig& cfg, const float* phi, float scale)
      : cfg_(cfg), phi_(phi), D_(cfg.input_size()), H1_(cfg.hidden1), H2_(cfg.hidden2), S_(int(cfg.state_rows())),
        K1_(D_ + H1_), K2_(H1_ + H2_), scale_(scale) {
    K1p_ = int(round_up(K1_, 2));
    K2p_ = int(round_up(K2_, 2));
    nK1_ = int((3 * K1p_ + 2 + 15) / 16);
    nK2_ = int((3 * K2p_ + 2 + 15) / 16);
    M1_ = int((4 * H1_ + 15) / 16);
    M2_ = int((4 * H2_ + 15) / 16);
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
    // Buffers, in floats (two bf16 each); a tile is 1 KiB = 256 floats.
    int64_t floats = 0;
    auto take = [&floats](int64_t count) {
      int64_t at = floats;
      floats += round_up(count, 16);
      return at;
    };
    const int64_t o_a1 = take(256LL * M1_ * nK1_), o_a2 = take(256LL * M2_ * nK2_);
    int64_t o_b1[2], o_b2[2], o_g1[2], o_g2[2];
    for (int r = 0; r < 2; ++r) {
      o_b1[r] = take(256LL * nK1_);
      o_b2[r] = take(256LL * nK2_);
      o_g1[r] = take(256LL * M1_);
      o_g2[r] = take(256LL * M2_);
    }
    const int64_t o_x = take(32), o_h1 = take(16LL * H1_), o_z = take(16);
    const int64_t o_sg = take(16), o_sst = take(16LL * S_), o_sup = take(16), o_sns = take(16LL * S_);
    mem_.reset(aligned_floats(floats));
    float* m = mem_.get();
    A1_ = reinterpret_cast<uint16_t*>(m + o_a1);
    A2_ = reinterpret_cast<uint16_t*>(m + o_a2);
    for (int r = 0; r < 2; ++r) {
      B1_[r] = reinterpret_cast<uint16_t*>(m + o_b1[r]);
      B2_[r] = reinterpret_cast<uint16_t*>(m + o_b2[r]);
      G1_[r] = m + o_g1[r];
      G2_[r] = m + o_g2[r];
      init_b(B1_[r], K1p_, nK1_);
      init_b(B2_[r], K2p_, nK2_);
    }
    xbuf_ = m + o_x;
    h1buf_ = m + o_h1;
    zrow_ = m + o_z;
    std::memset(zrow_, 0, sizeof(float) * 16);
    sg_ = m + o_sg;
    sst_ = m + o_sst;
    sup_ = m + o_sup;
    sns_ = m + o_sns;
    usable_ = pack(phi + cfg.w1_offset(), phi + cfg.b1_offset(), H1_, K1_, K1p_, M1_, nK1_, A1_) &&
              pack(phi + cfg.w2_offset(), phi + cfg.b2_offset(), H2_, K2_, K2p_, M2_, nK2_, A2_) &&
              std::isfinite(bo_);
    for (int j = 0; j < H2_ && usable_; ++j) usable_ = std::isfinite(wo_[j]);
  }

  // False when phi has non-finite values (the portable kernel then runs the step).
  bool usable() const { return usable_; }

  L2L_AMX_TARGET void forward(const float* grad, const float* state, int64_t n, int64_t begin, int64_t end,
                              float* update, float* new_state) {
    grad_ = grad;
    state_ = state;
    n_ = n;
    begin_ = begin;
    end_ = end;
    update_ = update;
    new_state_ = new_state;
    nt_ = n % 16 == 0 && begin % 16 == 0 && aligned64(update) && aligned64(new_state);
    const int64_t nb = (end - begin + 15) / 16;
    TileConfig tc;
    std::memset(&tc, 0, sizeof(tc));
    tc.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      tc.colsb[t] = 64;
      tc.rows[t] = 16;
    }
    _tile_loadconfig(&tc);
    stage(0);
    if (!fb(0)) {
      AmxJob j = job1(0);
      amx_run(j, j.steps);
    }
    for (int64_t i = 0; i < nb; ++i) {
      if (i + 1 < nb) {
        prefetch(i + 1 + kPrefetchBlocks);
        stage(i + 1);
      }
      AmxJob j2 = (i >= 1 && !fb(i - 1)) ? job2(i - 1) : AmxJob();
      if (!fb(i)) act1(i, j2);
      amx_run(j2, j2.steps);
      AmxJob j1 = (i + 1 < nb && !fb(i + 1)) ? job1(i + 1) : AmxJob();
      if (i >= 1 && !fb(i - 1)) act2(i - 1, j1);
      amx_run(j1, j1.steps);
    }
    if (!fb(nb - 1)) {
      AmxJob j2 = job2(nb - 1);
      amx_run(j2, j2.steps);
      act2(nb - 1, AmxJob());
    }
    _tile_release();
    _mm_sfence();
  }

 private:
  static constexpr int kPrefetchBlocks = 4;

  // Constant pair rows of a B buffer: bias (1, 1), (1, 0) after the six segments, zeros after them.
  static void init_b(uint16_t* B, int kp, int nk) {
    std::memset(B, 0, sizeof(uint16_t) * 512 * nk);
    for (int j = 0; j < 16; ++j) {
      B[(3 * kp) * 32 + 2 * j] = 0x3f80;
      B[(3 * kp) * 32 + 2 * j + 1] = 0x3f80;
      B[(3 * kp + 1) * 32 + 2 * j] = 0x3f80;
    }
  }

  // A tiles of one layer: [M tiles][NK][16 rows][32 bf16]; row g = [w0 | w0 | w0 | w1 | w1 | w2 | b0 b1 b2 0 | 0]
  // (segments K' long) of gate row g scaled by -log2(e) (i, f, o) or -2 log2(e) (g). False if phi is not finite.
  L2L_AMX_TARGET static bool pack(const float* W, const float* b, int H, int K, int kp, int M, int nk, uint16_t* A) {
    alignas(64) uint16_t row[8 * 32 + 64];
    __mmask16 bad = 0;
    for (int g = 0; g < 16 * M; ++g) {
      std::memset(row, 0, sizeof(row));
      if (g < 4 * H) {
        const __m512 s = _mm512_set1_ps((g / H == 2) ? -2.0f * 1.44269504088896341f : -1.44269504088896341f);
        for (int k0 = 0; k0 <= K; k0 += 16) {
          // Elements k0..k0+15 of [W row g, b[g]] (the bias at k = K).
          const int cnt = std::min(16, K + 1 - k0);
          const __mmask16 lm = __mmask16((1u << std::min(16, K - k0 > 0 ? K - k0 : 0)) - 1u);
          __m512 w = _mm512_maskz_loadu_ps(lm, W + int64_t(g) * K + k0);
          if (K - k0 < 16) w = _mm512_mask_mov_ps(w, __mmask16(1u << (K - k0)), _mm512_set1_ps(b[g]));
          w = _mm512_mul_ps(w, s);
          bad |= _mm512_fpclass_ps_mask(w, 0x99);
          const __m256i w0 = (__m256i)_mm512_cvtneps_pbh(w);
          const __m512 r1 = _mm512_sub_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w0), 16)));
          const __m256i w1 = (__m256i)_mm512_cvtneps_pbh(r1);
          const __m512 r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w1), 16)));
          const __m256i w2 = (__m256i)_mm512_cvtneps_pbh(r2);
          alignas(32) uint16_t t0[16], t1[16], t2[16];
          _mm256_store_si256(reinterpret_cast<__m256i*>(t0), w0);
          _mm256_store_si256(reinterpret_cast<__m256i*>(t1), w1);
          _mm256_store_si256(reinterpret_cast<__m256i*>(t2), w2);
          for (int e = 0; e < cnt; ++e) {
            const int k = k0 + e;
            if (k < K) {
              row[k] = t0[e];
              row[kp + k] = t0[e];
              row[2 * kp + k] = t0[e];
              row[3 * kp + k] = t1[e];
              row[4 * kp + k] = t1[e];
              row[5 * kp + k] = t2[e];
            } else {
              row[6 * kp] = t0[e];
              row[6 * kp + 1] = t1[e];
              row[6 * kp + 2] = t2[e];
            }
          }
        }
      }
      const int mt = g / 16, r = g % 16;
      for (int t = 0; t < nk; ++t)
        std::memcpy(A + ((int64_t(mt) * nk + t) * 16 + r) * 32, row + 32 * t, 64);
    }
    return bad == 0;
  }

  struct View {
    const float* g;
    const float* st;
    int64_t lds;
    float* up;
    float* ns;
    int64_t ldn;
    bool nt;
    bool staged;
  };
  View view(int64_t i) const {
    const int64_t c0 = begin_ + 16 * i;
    if (end_ - c0 >= 16) return View{grad_ + c0, state_ + c0, n_, update_ + c0, new_state_ + c0, n_, nt_, false};
    return View{sg_, sst_, 16, sup_, sns_, 16, false, true};
  }
  bool& fb(int64_t i) { return fallback_[i % 3]; }

  AmxJob job1(int64_t i) const {
    AmxJob j;
    j.A = A1_; j.B = B1_[i & 1]; j.G = G1_[i & 1]; j.M = M1_; j.NK = nK1_; j.steps = M1_ * nK1_;
    return j;
  }
  AmxJob job2(int64_t i) const {
    AmxJob j;
    j.A = A2_; j.B = B2_[i & 1]; j.G = G2_[i & 1]; j.M = M2_; j.NK = nK2_; j.steps = M2_ * nK2_;
    return j;
  }
  // Steps of job j due after unit u of U (spread over the first U - 2 units).
  static int due(const AmxJob& j, int u, int U) {
    const int span = std::max(1, U - 2);
    return u + 1 >= span ? j.steps : (j.steps * (u + 1) + span - 1) / span;
  }

  L2L_AMX_INLINE void store_out(float* p, __m512 v, bool nt) const {
    if (nt) _mm512_stream_ps(p, v);
    else _mm512_storeu_ps(p, v);
  }

  void prefetch(int64_t i) const {
    const int64_t c0 = begin_ + 16 * i;
    if (c0 >= end_) return;
    __builtin_prefetch(grad_ + c0, 0, 2);
    const float* s = state_ + c0;
    for (int r = 0; r < S_; ++r) __builtin_prefetch(s + r * n_, 0, 2);
    if (!nt_ && new_state_ != state_) {
      float* o = new_state_ + c0;
      for (int r = 0; r < S_; ++r) __builtin_prefetch(o + r * n_, 1, 2);
    }
  }

  // Preprocessing, the split of the layer-1 inputs, and the finiteness check of all GEMM inputs of block i.
  L2L_AMX_TARGET void stage(int64_t i) {
    const int64_t c0 = begin_ + 16 * i;
    const int64_t cnt = std::min<int64_t>(16, end_ - c0);
    fb(i) = false;
    const View v = view(i);
    if (v.staged) {
      std::memset(sg_, 0, sizeof(float) * 16);
      std::memcpy(sg_, grad_ + c0, sizeof(float) * cnt);
      for (int r = 0; r < S_; ++r) {
        std::memset(sst_ + 16 * r, 0, sizeof(float) * 16);
        std::memcpy(sst_ + 16 * r, state_ + r * n_ + c0, sizeof(float) * cnt);
      }
    }
    for (int col = 0; col < 16; col += kW) {
      vf f0, f1;
      preprocess(loadu(v.g + col), &f0, &f1);
      storeu(xbuf_ + col, f0);
      storeu(xbuf_ + 16 + col, f1);
    }
    const int D = D_, K1 = K1_;
    const float* st = v.st;
    const int64_t lds = v.lds;
    const float* x = xbuf_;
    const float* z = zrow_;
    __m512 acc = amx_split_rows(
        B1_[i & 1], K1p_, [=](int k) { return k < D ? x + 16 * k : k < K1 ? st + (k - D) * lds : z; },
        _mm512_setzero_ps());
    // h2 (split after the layer-1 outputs of the block are written) must be finite too.
    const float* h2 = st + 2 * int64_t(H1_) * lds;
    for (int r = 0; r < H2_; ++r) acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(h2 + r * lds), _mm512_setzero_ps()));
    if (_mm512_fpclass_ps_mask(acc, 0x99) != 0) {  // NaN or +-inf
      fb(i) = true;
      if (!portable_) portable_.reset(new Kernel(cfg_, phi_, scale_, /*backward=*/false));
      portable_->forward(grad_, state_, n_, c0, c0 + cnt, update_, new_state_);
    }
  }

  L2L_AMX_INLINE void preprocess(vf g, vf* f0, vf* f1) const {  // as Kernel::preprocess
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

  // Layer-1 activations of block i (with the steps of job j between the units), then the split of the layer-2
  // inputs [h1'; h2].
  L2L_AMX_TARGET void act1(int64_t i, AmxJob& jb) {
    const View v = view(i);
    const float* G = G1_[i & 1];
    const int H = H1_;
    for (int j = 0; j < H; ++j) {
      amx_run(jb, due(jb, j, H));
      __m512 cn, h;
      amx_cell(_mm512_load_ps(G + 16 * j), _mm512_load_ps(G + 16 * (H + j)), _mm512_load_ps(G + 16 * (2 * H + j)),
               _mm512_load_ps(G + 16 * (3 * H + j)), _mm512_loadu_ps(v.st + (H + j) * v.lds), &cn, &h);
      store_out(v.ns + j * v.ldn, h, v.nt);
      store_out(v.ns + (H + j) * v.ldn, cn, v.nt);
      _mm512_store_ps(h1buf_ + 16 * j, h);
    }
    const float* hb = h1buf_;
    const float* h2 = v.st + 2 * int64_t(H1_) * v.lds;
    const int64_t lds = v.lds;
    const float* z = zrow_;
    const int K2 = K2_;
    amx_split_rows(
        B2_[i & 1], K2p_, [=](int k) { return k < H ? hb + 16 * k : k < K2 ? h2 + (k - H) * lds : z; },
        _mm512_setzero_ps());
  }

  // Layer-2 activations and the update of block i (with the steps of job j between the units).
  L2L_AMX_TARGET void act2(int64_t i, AmxJob jb) {
    const View v = view(i);
    const float* G = G2_[i & 1];
    const int H = H2_;
    const int64_t r0 = 2 * int64_t(H1_);
    __m512 u = _mm512_setzero_ps();
    for (int j = 0; j < H; ++j) {
      amx_run(jb, due(jb, j, H));
      __m512 cn, h;
      amx_cell(_mm512_load_ps(G + 16 * j), _mm512_load_ps(G + 16 * (H + j)), _mm512_load_ps(G + 16 * (2 * H + j)),
               _mm512_load_ps(G + 16 * (3 * H + j)), _mm512_loadu_ps(v.st + (r0 + H + j) * v.lds), &cn, &h);
      store_out(v.ns + (r0 + j) * v.ldn, h, v.nt);
      store_out(v.ns + (r0 + H + j) * v.ldn, cn, v.nt);
      u = _mm512_fmadd_ps(_mm512_set1_ps(wo_[j]), h, u);
    }
    store_out(v.up, _mm512_mul_ps(_mm512_set1_ps(scale_), _mm512_add_ps(u, _mm512_set1_ps(bo_))), v.nt);
    if (v.staged) {
      const int64_t c0 = begin_ + 16 * i;
      const int64_t cnt = end_ - c0;
      std::memcpy(update_ + c0, sup_, sizeof(float) * cnt);
      for (int r = 0; r < S_; ++r) std::memcpy(new_state_ + r * n_ + c0, sns_ + 16 * r, sizeof(float) * cnt);
    }
  }

  const StepConfig cfg_;
  const float* phi_;
  const int D_, H1_, H2_, S_, K1_, K2_;
  const float scale_;
  int K1p_, K2p_, nK1_, nK2_, M1_, M2_;
  const float* wo_;
  float bo_;
  Preprocess pre_;
  float param_ = 1.0f, thr_ = 0.0f, ep_ = 1.0f;
  bool usable_ = false;
  std::unique_ptr<float, AlignedFree> mem_;
  uint16_t *A1_, *A2_, *B1_[2], *B2_[2];
  float *G1_[2], *G2_[2], *xbuf_, *h1buf_, *zrow_, *sg_, *sst_, *sup_, *sns_;
  std::unique_ptr<Kernel> portable_;
  const float* grad_ = nullptr;
  const float* state_ = nullptr;
  float* update_ = nullptr;
  float* new_state_ = nullptr;
  int64_t n_ = 0, begin_ = 0, end_ = 0;
  bool nt_ = false;
  bool fallback_[3] = {false, false, false};
};
#endif  // L2L_HAVE_AMX

}  // namespace

bool lstm_step_cpu_amx_available() {
#if L2L_HAVE_AMX
  return amx_usable();
#else
  return false;
#endif
}

bool lstm_step_cpu_amx_supported(const StepConfig& cfg) {
#if L2L_HAVE_AMX
  return amx_usable() && AmxForward::fits(cfg);
#else
  (void)cfg;
  return false;
#endif
}

CpuIsa lstm_step_forward_cpu_isa(const StepConfig& cfg, CpuIsa isa, const float* phi, const float* grad,
                                 const float* state, float scale, int64_t n, int64_t begin, int64_t end,
                                 float* update, float* new_state) {
  if (end <= begin) return CpuIsa::kPortable;
#if L2L_HAVE_AMX
  // kAuto does not pick the AMX kernel: on the Sapphire-Rapids-class machine it was measured on (1 thread,
  // N = 2048 and 15910, 20/20, "paper") it took ~300 TSC cycles per coordinate against ~240-290 for the portable
  // kernel. Its vector part alone (no tile operations) costs ~125 (in L2) / ~170 (from memory) cycles, its 65
  // tile dot products per 16 coordinates ~60 (A tiles in L1) / ~95 (in L2) on their own, and in the kernel the
  // two add up instead of overlapping. bf16x3 (half the tile work) is not accurate enough (gate errors ~1e-4).
  if (isa == CpuIsa::kAmx && amx_usable() && AmxForward::fits(cfg)) {
    AmxForward k(cfg, phi, scale);
    if (k.usable()) {
      k.forward(grad, state, n, begin, end, update, new_state);
      return CpuIsa::kAmx;
    }
  }
#else
  (void)isa;
#endif
  Kernel k(cfg, phi, scale, /*backward=*/false);
  k.forward(grad, state, n, begin, end, update, new_state);
  return CpuIsa::kPortable;
}

void lstm_step_forward_cpu(const StepConfig& cfg, const float* phi, const float* grad, const float* state,
                           float scale, int64_t n, int64_t begin, int64_t end, float* update, float* new_state) {
  lstm_step_forward_cpu_isa(cfg, CpuIsa::kAuto, phi, grad, state, scale, n, begin, end, update, new_state);
}

void lstm_step_backward_cpu(const StepConfig& cfg, const float* phi, const float* grad, const float* state,
                            float scale, int64_t n, int64_t begin, int64_t end, const float* d_update,
                            const float* d_new_state, float* d_phi_partial, float* d_grad, float* d_state) {
  if (end <= begin) return;
  Kernel k(cfg, phi, scale, /*backward=*/true);
  k.backward(grad, state, n, begin, end, d_update, d_new_state, d_phi_partial, d_grad, d_state);
}

}  // namespace l2l
