// //csrc:kernels_test: the CPU kernels (lstm_step_cpu.cc) against a scalar double-precision reference of lstm_step.h,
// forward and backward, on zero, subnormal, tiny, huge, infinite, NaN and random gradients. No TensorFlow, no Python,
// no test framework: prints one line per case and exits non-zero when a check fails.
//
// The tolerance is a running error bound, not a fixed rtol/atol. The reference computes every quantity in double
// together with a first-order bound on how far the kernels' float32 value of it may lie from the exact one, from the
// accuracies the kernels document (lstm_step_cpu.cc) and float32 rounding:
//   u = 2^-24 per float32 operation (plus 2^-150 absolute, the rounding in the subnormal range; fused multiply-adds
//   round less, which only helps); a sum of n terms, in any order: gamma_n * sum |term| with gamma_n = n u / (1 - n u);
//   exp(-x): relative 1.1e-6 for |x| < 22, 4e-6 beyond (the AVX-512 version; the others are more accurate);
//   sigmoid = 1 / (1 + exp(-x)): that exp error times (1 - sigmoid), + 3u (the add and the reciprocal, rcp14 + Newton),
//   + 3e-35 absolute where x may be above -80 (the exp is capped/clamped near x = -80); below -80 it is exactly 0,
//   so its error there is the exact value (an allowance of 3e-35 would admit d_phi errors of ~1e4 at |g| ~ FLT_MAX);
//   tanh: relative 5e-7 + 2u; log (preprocessing): relative 5e-7;
//   errors of inputs propagate with the largest derivative over the input's error interval (mean-value bound).
// A kernel output passes when |kernel - reference| <= bound; every line reports the largest |kernel - reference| /
// bound seen (so 1.0 would be exactly at the bound). Where a preprocessing kink could be on either side within the
// error (the 'clamped' derivative's branches), the bound covers both branches. Where p g overflows float32 in d_grad
// ('paper'/'clamped', |g| > FLT_MAX / p) the kernels give 0 for an exact value below 3e-39 |upstream|: allowed, and
// counted apart from the ratio. Ratios of 1.000 are outputs the kernels flush to 0 (a sigmoid below x = -80), whose
// error is the exact value itself, the whole of their bound. For scale: an error of 2e-6 relative in the kernels'
// exp or tanh fails this test.
//
// Also checked exactly: +-inf gradients give the update and new state of +-FLT_MAX bit for bit and d_grad = 0; a NaN
// gradient gives a NaN update, new-state column, d_grad and d_state column (and NaN d_phi), other coordinates are
// bitwise unaffected; splitting [0, n) into ranges changes no per-coordinate output; d_new_state = nullptr equals
// zeros; validate_config. The reference's own backward is checked against central finite differences of its forward.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "lstm_step.h"

namespace {

using l2l::Preprocess;
using l2l::StepConfig;

// ---------------------------------------------------------------------------------------------------------------
// Values with error bounds.
constexpr double kU = 0x1p-24;           // float32 unit roundoff
constexpr double kTiny = 0x1p-150;       // absolute rounding error in the float32 subnormal range
constexpr double kExpRel = 1.1e-6;       // exp(-x), |x| < 22
constexpr double kExpRelFar = 4e-6;      // exp(-x), |x| >= 22
constexpr double kSigmoidAbs = 3e-35;    // sigmoid where exp(-x) is capped (x < -79.7) or clamped (x < -80)
constexpr double kTanhRel = 5e-7 + 2 * kU;
constexpr double kLogRel = 5e-7;

struct B {
  double v;  // the exact value (of the exact math on the float32 inputs)
  double e;  // bound on |kernel's float32 value - v|
};

B exact(double v) { return {v, 0.0}; }
double rnd(double r) { return kU * std::fabs(r) + kTiny; }

B operator+(B a, B b) {
  const double r = a.v + b.v;
  return {r, a.e + b.e + rnd(r)};
}
B operator-(B a, B b) {
  const double r = a.v - b.v;
  return {r, a.e + b.e + rnd(r)};
}
// Product without its own rounding (a term of a sum, whose rounding the sum's gamma_n covers).
B mul_nr(B a, B b) { return {a.v * b.v, std::fabs(a.v) * b.e + std::fabs(b.v) * a.e + a.e * b.e}; }
B operator*(B a, B b) {
  B r = mul_nr(a, b);
  r.e += rnd(r.v);
  return r;
}
B operator/(B a, B b) {  // |b.v| > b.e
  const double r = a.v / b.v;
  return {r, (a.e + std::fabs(r) * b.e) / (std::fabs(b.v) - b.e) + rnd(r)};
}
// a / b where the kernel's float32 b may overflow to inf (the quotient is then 0, where the exact one is below
// |a| / FLT_MAX): the bound admits 0 too, and *overflow says so.
B div_may_overflow(B a, B b, bool* overflow) {
  if (std::fabs(b.v) + b.e < double(FLT_MAX)) return a / b;
  *overflow = true;
  const double r = a.v / b.v;
  return {r, std::fabs(r) + a.e / (std::fabs(b.v) - b.e) + kTiny};
}
// Either of two values (a branch decided within the error): a's value, a bound covering b.
B either(B a, B b) { return {a.v, std::max(a.e, std::fabs(a.v - b.v) + b.e)}; }

// A sum of float32 terms in any order (and any mix of FMAs): sum of the terms' errors + gamma_n * sum |term|.
struct Sum {
  double v = 0, e = 0, mag = 0;
  int64_t n = 0;
  void add(B t) {
    v += t.v;
    e += t.e;
    mag += std::fabs(t.v) + t.e;
    ++n;
  }
  B result(int64_t extra_roundings = 0) const {
    const double m = double(n + extra_roundings);
    return {v, e + m * kU / (1 - m * kU) * mag + 2 * m * kTiny};
  }
};

// The point of [x - e, x + e] nearest to 0 (where sigmoid' and tanh' are largest).
double nearest_zero(B x) { return std::min(std::max(0.0, x.v - x.e), x.v + x.e); }

double sigmoid_d(double x) { return 1.0 / (1.0 + std::exp(-x)); }

B sigmoid(B x) {
  const double s = sigmoid_d(x.v);
  // Below x = -80 the kernels return exactly 0: their error there is the exact value itself (< 1.9e-35), not the
  // absolute allowance of the cap band near -80, which d_phi's input column would multiply by up to FLT_MAX.
  if (x.v + x.e < double(-80.0f)) return {s, s};
  const double s0 = sigmoid_d(nearest_zero(x));
  const double rel_exp = std::fabs(x.v) + x.e < 22.0 ? kExpRel : kExpRelFar;
  return {s, s0 * (1 - s0) * x.e + s * ((1 - s) * rel_exp + 3 * kU) + kSigmoidAbs};
}

B tanh_b(B x) {
  const double t = std::tanh(x.v);
  const double t0 = std::tanh(nearest_zero(x));
  return {t, (1 - t0 * t0) * x.e + std::fabs(t) * kTanhRel + kTiny};
}

B log_b(B x) {  // x.v - x.e > 0
  const double r = std::log(x.v);
  return {r, x.e / (x.v - x.e) + std::fabs(r) * kLogRel + kTiny};
}

B max_minus1(B x) {  // max(-1, x): 1-Lipschitz
  if (x.v + x.e < -1) return exact(-1);
  return {std::max(-1.0, x.v), x.e};
}
B clamp1(B x) {  // clamp(x, -1, 1): 1-Lipschitz
  if (x.v - x.e > 1) return exact(1);
  if (x.v + x.e < -1) return exact(-1);
  return {std::min(1.0, std::max(-1.0, x.v)), x.e};
}

double sign_of(double g) { return g > 0 ? 1.0 : (g < 0 ? -1.0 : 0.0); }

// ---------------------------------------------------------------------------------------------------------------
// The reference step of lstm_step.h for one coordinate, with bounds. φ, gradient and state as doubles (the float32
// inputs, or perturbations of them for the finite-difference check of the reference itself).
struct Layer {
  std::vector<B> i, f, g, o, c, tc, h;
  void resize(int H) {
    for (auto* v : {&i, &f, &g, &o, &c, &tc, &h}) v->assign(H, exact(0));
  }
};

class Reference {
 public:
  Reference(const StepConfig& cfg, std::vector<double> phi, double scale)
      : cfg_(cfg), phi_(std::move(phi)), scale_(scale), D_(cfg.input_size()), H1_(cfg.hidden1), H2_(cfg.hidden2),
        K1_(D_ + H1_), K2_(H1_ + H2_) {
    const double p = cfg.preprocess_param;
    thr_ = double(float(std::exp(-p)));  // the kernels' threshold, float32 as they compare with it
    ep_ = {std::exp(p), rnd(std::exp(p))};
    l1_.resize(H1_);
    l2_.resize(H2_);
    dz1_.assign(4 * H1_, exact(0));
    dz2_.assign(4 * H2_, exact(0));
    dh1_.assign(H1_, exact(0));
    in1_.assign(K1_, exact(0));
    in2_.assign(K2_, exact(0));
  }

  // Forward of one coordinate: st = its S state values; writes the update and the S new-state values.
  void forward(double g_in, const double* st, B* update, B* new_state) {
    g_ = std::min(double(FLT_MAX), std::max(-double(FLT_MAX), g_in));  // +-inf act as +-FLT_MAX
    infinite_ = std::isinf(g_in);
    features(g_, in1_.data());
    for (int k = 0; k < H1_; ++k) in1_[D_ + k] = exact(st[k]);
    layer(cfg_.w1_offset(), cfg_.b1_offset(), H1_, K1_, in1_.data(), st + H1_, l1_);
    for (int k = 0; k < H1_; ++k) in2_[k] = l1_.h[k];
    for (int k = 0; k < H2_; ++k) in2_[H1_ + k] = exact(st[2 * H1_ + k]);
    layer(cfg_.w2_offset(), cfg_.b2_offset(), H2_, K2_, in2_.data(), st + 2 * H1_ + H2_, l2_);
    Sum s;
    s.add(exact(phi_[cfg_.bo_offset()]));
    for (int j = 0; j < H2_; ++j) s.add(mul_nr(exact(phi_[cfg_.wo_offset() + j]), l2_.h[j]));
    *update = exact(scale_) * s.result();
    for (int j = 0; j < H1_; ++j) {
      new_state[j] = l1_.h[j];
      new_state[H1_ + j] = l1_.c[j];
    }
    for (int j = 0; j < H2_; ++j) {
      new_state[2 * H1_ + j] = l2_.h[j];
      new_state[2 * H1_ + H2_ + j] = l2_.c[j];
    }
  }

  // True when the last backward()'s d_grad divides by a p g that overflows float32 (|g| > FLT_MAX / p): the kernels
  // give 0 there, the exact value is below 3e-39 |upstream| (a float32 subnormal), and the bound admits both.
  bool d_grad_overflow() const { return overflow_; }

  // Backward of the coordinate last passed to forward(): upstream du and dns (S values), writes d_grad and d_state
  // (S values) and adds the coordinate's share of d_phi to d_phi (P sums).
  void backward(const double* st, double du, const double* dns, B* d_grad, B* d_state, std::vector<Sum>& d_phi) {
    overflow_ = false;
    const B dy = exact(scale_) * exact(du);
    const int64_t wo = cfg_.wo_offset();
    for (int j = 0; j < H2_; ++j) {
      d_phi[wo + j].add(mul_nr(dy, l2_.h[j]));
      const B dh = dy * exact(phi_[wo + j]) + exact(dns[2 * H1_ + j]);
      cell_backward(l2_, H2_, j, dh, exact(dns[2 * H1_ + H2_ + j]), st[2 * H1_ + H2_ + j], dz2_.data(),
                    &d_state[2 * H1_ + H2_ + j]);
    }
    d_phi[cfg_.bo_offset()].add(dy);
    for (int k = 0; k < K2_; ++k) {
      const B v = input_grad(cfg_.w2_offset(), H2_, K2_, k, dz2_.data());
      if (k < H1_) dh1_[k] = v;
      else d_state[2 * H1_ + (k - H1_)] = v;
    }
    weight_grad(cfg_.w2_offset(), cfg_.b2_offset(), H2_, K2_, dz2_.data(), in2_.data(), d_phi);
    for (int j = 0; j < H1_; ++j) {
      const B dh = dh1_[j] + exact(dns[j]);
      cell_backward(l1_, H1_, j, dh, exact(dns[H1_ + j]), st[H1_ + j], dz1_.data(), &d_state[H1_ + j]);
    }
    B dx[2] = {exact(0), exact(0)};
    for (int k = 0; k < K1_; ++k) {
      const B v = input_grad(cfg_.w1_offset(), H1_, K1_, k, dz1_.data());
      if (k < D_) dx[k] = v;
      else d_state[k - D_] = v;
    }
    weight_grad(cfg_.w1_offset(), cfg_.b1_offset(), H1_, K1_, dz1_.data(), in1_.data(), d_phi);
    *d_grad = preprocess_backward(dx[0], dx[1]);
  }

 private:
  void features(double g, B* x) const {
    const double a = std::fabs(g), p = cfg_.preprocess_param;
    switch (cfg_.preprocess) {
      case Preprocess::kNone:
        x[0] = exact(g);
        return;
      case Preprocess::kPaper:
        if (a >= thr_) {
          x[0] = log_b(exact(a)) / exact(p);
          x[1] = exact(sign_of(g));
        } else {
          x[0] = exact(-1);
          x[1] = ep_ * exact(g);
        }
        return;
      case Preprocess::kClamped:
        x[0] = max_minus1(log_b(exact(a) + exact(FLT_EPSILON)) / exact(p));
        x[1] = clamp1(exact(g) * ep_);
        return;
    }
  }

  B preprocess_backward(B d0, B d1) {
    if (infinite_) return exact(0);  // the clamp of +-inf is flat
    const double g = g_, a = std::fabs(g), p = cfg_.preprocess_param;
    switch (cfg_.preprocess) {
      case Preprocess::kNone:
        return d0;
      case Preprocess::kPaper:
        if (a >= thr_) return div_may_overflow(d0, exact(p) * exact(g), &overflow_);
        return d1 * ep_;
      case Preprocess::kClamped: {
        const B ae = exact(a) + exact(FLT_EPSILON);
        const B l = log_b(ae) / exact(p);
        const B on0 = div_may_overflow({d0.v * sign_of(g), d0.e}, exact(p) * ae, &overflow_);
        B t0 = l.v > -1 ? on0 : exact(0);
        if (std::fabs(l.v + 1) <= l.e) t0 = either(t0, l.v > -1 ? exact(0) : on0);
        const B ge = exact(g) * ep_;
        const B on1 = d1 * ep_;
        B t1 = std::fabs(ge.v) < 1 ? on1 : exact(0);
        if (std::fabs(std::fabs(ge.v) - 1) <= ge.e) t1 = either(t1, std::fabs(ge.v) < 1 ? exact(0) : on1);
        return t0 + t1;
      }
    }
    return exact(0);
  }

  // One LSTM layer: z = W [in] + b (gate rows q H + j), the cell, as lstm_step.h.
  void layer(int64_t w_off, int64_t b_off, int H, int K, const B* in, const double* c_old, Layer& L) const {
    for (int j = 0; j < H; ++j) {
      B z[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t row = int64_t(q) * H + j;
        Sum s;
        s.add(exact(phi_[b_off + row]));
        for (int k = 0; k < K; ++k) s.add(mul_nr(exact(phi_[w_off + row * K + k]), in[k]));
        z[q] = s.result();
      }
      L.i[j] = sigmoid(z[0]);
      L.f[j] = sigmoid(z[1]);
      L.g[j] = tanh_b(z[2]);
      L.o[j] = sigmoid(z[3]);
      L.c[j] = L.f[j] * exact(c_old[j]) + L.i[j] * L.g[j];
      L.tc[j] = tanh_b(L.c[j]);
      L.h[j] = L.o[j] * L.tc[j];
    }
  }

  // Backward of the cell of unit j (the kernels' formulas): dz rows q H + j, d c_old.
  static void cell_backward(const Layer& L, int H, int j, B dh, B dc_in, double c_old, B* dz, B* dc_old) {
    const B one = exact(1), ig = L.i[j], fg = L.f[j], gg = L.g[j], og = L.o[j], tc = L.tc[j];
    const B dc = (dh * og) * (one - tc * tc) + dc_in;
    dz[3 * H + j] = ((dh * tc) * og) * (one - og);
    dz[0 * H + j] = ((dc * gg) * ig) * (one - ig);
    dz[2 * H + j] = (dc * ig) * (one - gg * gg);
    dz[1 * H + j] = ((dc * exact(c_old)) * fg) * (one - fg);
    *dc_old = dc * fg;
  }

  B input_grad(int64_t w_off, int H, int K, int k, const B* dz) const {
    Sum s;
    for (int64_t g = 0; g < 4LL * H; ++g) s.add(mul_nr(exact(phi_[w_off + g * K + k]), dz[g]));
    return s.result();
  }

  static void weight_grad(int64_t w_off, int64_t b_off, int H, int K, const B* dz, const B* in,
                          std::vector<Sum>& d_phi) {
    for (int64_t g = 0; g < 4LL * H; ++g) {
      for (int k = 0; k < K; ++k) d_phi[w_off + g * K + k].add(mul_nr(dz[g], in[k]));
      d_phi[b_off + g].add(dz[g]);
    }
  }

  const StepConfig cfg_;
  const std::vector<double> phi_;
  const double scale_;
  const int D_, H1_, H2_, K1_, K2_;
  double thr_;
  B ep_;
  double g_ = 0;
  bool infinite_ = false, overflow_ = false;
  Layer l1_, l2_;
  std::vector<B> dz1_, dz2_, dh1_, in1_, in2_;
};

// ---------------------------------------------------------------------------------------------------------------
// Test data and the kernels' calls.
struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<float, AlignedFree>;

Buffer buffer(size_t count) {  // 64-byte aligned (TF's alignment: the kernels then use streaming stores)
  void* p = nullptr;
  if (posix_memalign(&p, 64, std::max<size_t>(count, 1) * sizeof(float)) != 0) std::abort();
  std::memset(p, 0, std::max<size_t>(count, 1) * sizeof(float));
  return Buffer(static_cast<float*>(p));
}

std::string name_of(const StepConfig& c) {
  const char* pre = c.preprocess == Preprocess::kNone ? "none" : c.preprocess == Preprocess::kPaper ? "paper" : "clamped";
  char buf[96];
  std::snprintf(buf, sizeof buf, "%d/%d %s(%g)", c.hidden1, c.hidden2, pre, double(c.preprocess_param));
  return buf;
}

StepConfig config(int h1, int h2, Preprocess pre, float param) {
  StepConfig c;
  c.hidden1 = h1;
  c.hidden2 = h2;
  c.preprocess = pre;
  c.preprocess_param = param;
  return c;
}

constexpr float kInf = INFINITY;

struct Problem {
  StepConfig cfg;
  int64_t n;
  float scale;
  std::vector<float> phi, grad, state, du, dns;  // state, dns: [S, n] row-major
};

// Gradients: "extreme" = the special values first (zeros, tiny, subnormal down to the smallest, huge up to FLT_MAX,
// +-inf next to +-FLT_MAX, the two sides of the preprocessing kinks), then random magnitudes 10^U(-12, 4) with random
// signs; "typical" = 10^U(-6, 1) only (where the bounds are tight everywhere). Random values within 1e-4 of a kink
// are redrawn (the kinks are tested with the special values).
std::vector<float> gradients(std::mt19937_64& rng, int64_t n, float param, bool extreme) {
  std::vector<float> special = {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-40f, -1e-42f, 1.4e-45f, FLT_MIN,
                                1e30f, -1e30f, 3e38f, -3e38f, 1.0f, -1.0f,
                                kInf, FLT_MAX, -kInf, -FLT_MAX};  // +-inf at 14, 16 next to +-FLT_MAX at 15, 17
  for (double p : {double(param), 10.0, 5.0}) {
    const double edge = std::exp(-p);
    for (double f : {1.001, 0.999}) {
      special.push_back(float(edge * f));
      special.push_back(float(-edge * f));
    }
  }
  std::uniform_real_distribution<double> lg(extreme ? -12.0 : -6.0, extreme ? 4.0 : 1.0);
  std::vector<float> g(n);
  for (int64_t i = 0; i < n; ++i) {
    double v;
    do {
      v = std::pow(10.0, lg(rng)) * ((rng() & 1) ? 1.0 : -1.0);
    } while (std::fabs(std::log(std::fabs(v)) + param) < 1e-4 || std::fabs(std::log(std::fabs(v)) + 10) < 1e-4 ||
             std::fabs(std::log(std::fabs(v)) + 5) < 1e-4);
    g[i] = float(v);
  }
  if (extreme)
    for (size_t i = 0; i < special.size() && int64_t(i) < n; ++i) g[i] = special[i];
  return g;
}

Problem make_problem(const StepConfig& cfg, int64_t n, float scale, uint64_t seed, bool extreme) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  Problem p{cfg, n, scale, {}, {}, {}, {}, {}};
  p.phi.resize(cfg.num_params());
  for (auto& w : p.phi) w = float(0.4 * normal(rng));
  p.grad = gradients(rng, n, cfg.preprocess_param, extreme);
  const int64_t S = cfg.state_rows();
  p.state.resize(S * n);
  for (auto& s : p.state) s = float(0.6 * normal(rng));
  p.du.resize(n);
  for (auto& d : p.du) d = float(normal(rng));
  p.dns.resize(S * n);
  for (auto& d : p.dns) d = float(normal(rng));
  if (extreme && n > 17)  // +-inf coordinates get the state and upstream gradients of their +-FLT_MAX partner
    for (int64_t r = 0; r < S; ++r)
      for (int64_t a : {14, 16}) {
        p.state[r * n + a] = p.state[r * n + a + 1];
        p.dns[r * n + a] = p.dns[r * n + a + 1];
        p.du[a] = p.du[a + 1];
      }
  return p;
}

struct Outputs {
  Buffer update, new_state, d_phi, d_grad, d_state;
};

// Runs both kernels over [0, n), split at `cuts` (ranges called one after the other, as threads would; the backward
// at `bwd_cuts` when given). `saved`: the forward writes its activations and the backward reads them instead of
// recomputing them. `no_d_grad`: the backward is asked for no d_grad (left zero).
Outputs run_kernels(const Problem& p, const std::vector<int64_t>& cuts = {}, bool null_dns = false,
                    bool saved = false, const std::vector<int64_t>* bwd_cuts = nullptr, bool no_d_grad = false) {
  const int64_t n = p.n, S = p.cfg.state_rows(), P = p.cfg.num_params();
  Outputs o{buffer(n), buffer(S * n), buffer(P), buffer(n), buffer(S * n)};
  Buffer act = buffer(saved ? p.cfg.activation_rows() * n : 1);
  Buffer grad = buffer(n), state = buffer(S * n), du = buffer(n), dns = buffer(S * n);
  std::copy(p.grad.begin(), p.grad.end(), grad.get());
  std::copy(p.state.begin(), p.state.end(), state.get());
  std::copy(p.du.begin(), p.du.end(), du.get());
  std::copy(p.dns.begin(), p.dns.end(), dns.get());
  auto bounds_of = [n](const std::vector<int64_t>& at) {
    std::vector<int64_t> bounds = {0};
    for (int64_t c : at) bounds.push_back(c);
    bounds.push_back(n);
    return bounds;
  };
  const std::vector<int64_t> fb = bounds_of(cuts), bb = bounds_of(bwd_cuts ? *bwd_cuts : cuts);
  for (size_t r = 0; r + 1 < fb.size(); ++r)
    l2l::lstm_step_forward_cpu(p.cfg, p.phi.data(), grad.get(), state.get(), p.scale, n, fb[r], fb[r + 1],
                               o.update.get(), o.new_state.get(), saved ? act.get() : nullptr);
  for (size_t r = 0; r + 1 < bb.size(); ++r)
    l2l::lstm_step_backward_cpu(p.cfg, p.phi.data(), grad.get(), state.get(), p.scale, n, bb[r], bb[r + 1],
                                du.get(), null_dns ? nullptr : dns.get(), o.d_phi.get(),
                                no_d_grad ? nullptr : o.d_grad.get(),
                                o.d_state.get(), saved ? act.get() : nullptr);
  return o;
}

// ---------------------------------------------------------------------------------------------------------------
// Checks.
int g_failures = 0;

void fail(const std::string& msg) {
  ++g_failures;
  std::printf("  FAIL %s\n", msg.c_str());
}

// Largest |got - ref| / bound over a set of outputs; a failure message for the first output beyond its bound.
// `in_ratio` false: checked against the bound but left out of the reported ratio (the overflow cases of d_grad,
// whose bound is the exact value itself).
struct Worst {
  const char* what;
  double ratio = 0;
  int64_t count = 0, failed = 0;
  void check(float got, B ref, const std::string& where, bool in_ratio = true) {
    ++count;
    const double err = std::fabs(double(got) - ref.v);
    const bool ok = std::isfinite(double(got)) && err <= ref.e;
    if (ref.e > 0 && in_ratio) ratio = std::max(ratio, err / ref.e);
    if (!ok && failed++ < 5) {
      char buf[256];
      std::snprintf(buf, sizeof buf, "%s %s: kernel %.9g, reference %.12g, |difference| %.3g > bound %.3g", what,
                    where.c_str(), double(got), ref.v, err, ref.e);
      fail(buf);
    }
  }
};

bool bitwise_equal(const float* a, const float* b, int64_t count) {
  return std::memcmp(a, b, sizeof(float) * size_t(count)) == 0;
}

// The kernels over [0, n) in one call, and in ranges (per-coordinate outputs bitwise the same; d_phi, summed in another
// order, within the same bound), against the reference.
void check_against_reference(const Problem& p, const char* label) {
  const int64_t n = p.n, S = p.cfg.state_rows(), P = p.cfg.num_params();
  const Outputs o = run_kernels(p);
  std::vector<int64_t> cuts;
  for (int64_t c : {int64_t(100), int64_t(256), int64_t(333), int64_t(768)})
    if (c < n) cuts.push_back(c);
  const Outputs split = run_kernels(p, cuts);
  if (!bitwise_equal(split.update.get(), o.update.get(), n) ||
      !bitwise_equal(split.new_state.get(), o.new_state.get(), S * n) ||
      !bitwise_equal(split.d_grad.get(), o.d_grad.get(), n) ||
      !bitwise_equal(split.d_state.get(), o.d_state.get(), S * n))
    fail(name_of(p.cfg) + " " + label + ": splitting [0, n) into ranges changed a per-coordinate output");
  // The backward reading the forward's saved activations is the recomputing backward, bit for bit; also when the
  // forward and the backward split [0, n) differently (the saved layout is the same whatever the ranges).
  const Outputs read = run_kernels(p, cuts, false, /*saved=*/true);
  if (!bitwise_equal(read.d_phi.get(), split.d_phi.get(), P) ||
      !bitwise_equal(read.d_grad.get(), split.d_grad.get(), n) ||
      !bitwise_equal(read.d_state.get(), split.d_state.get(), S * n))
    fail(name_of(p.cfg) + " " + label + ": the backward with saved activations differs from the recomputing one");
  const std::vector<int64_t> none;
  const Outputs read_whole = run_kernels(p, cuts, false, /*saved=*/true, &none);
  const Outputs whole = run_kernels(p);
  if (!bitwise_equal(read_whole.d_phi.get(), whole.d_phi.get(), P) ||
      !bitwise_equal(read_whole.d_grad.get(), whole.d_grad.get(), n) ||
      !bitwise_equal(read_whole.d_state.get(), whole.d_state.get(), S * n))
    fail(name_of(p.cfg) + " " + label + ": activations saved over ranges, read over [0, n), differ");
  // Without d_grad (a first-order meta-gradient): d_phi and d_state unchanged, bit for bit, saved or recomputed.
  for (bool with_saved : {false, true}) {
    const Outputs no_dg = run_kernels(p, cuts, false, with_saved, nullptr, /*no_d_grad=*/true);
    if (!bitwise_equal(no_dg.d_phi.get(), split.d_phi.get(), P) ||
        !bitwise_equal(no_dg.d_state.get(), split.d_state.get(), S * n))
      fail(name_of(p.cfg) + " " + label + ": the backward without d_grad changed d_phi or d_state" +
           (with_saved ? " (saved activations)" : ""));
  }
  Reference ref(p.cfg, std::vector<double>(p.phi.begin(), p.phi.end()), p.scale);
  Worst fu{"update"}, fs{"new_state"}, dg{"d_grad"}, ds{"d_state"}, dp{"d_phi"}, dps{"d_phi (ranges)"};
  int64_t overflows = 0;
  std::vector<Sum> d_phi(P);
  std::vector<double> st(S), dns(S);
  std::vector<B> new_state(S), d_state(S);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t r = 0; r < S; ++r) {
      st[r] = p.state[r * n + i];
      dns[r] = p.dns[r * n + i];
    }
    B update, d_grad;
    ref.forward(p.grad[i], st.data(), &update, new_state.data());
    ref.backward(st.data(), p.du[i], dns.data(), &d_grad, d_state.data(), d_phi);
    const std::string at = "[" + std::to_string(i) + "] (grad " + std::to_string(p.grad[i]) + ")";
    fu.check(o.update.get()[i], update, at);
    overflows += ref.d_grad_overflow();
    dg.check(o.d_grad.get()[i], d_grad, at, !ref.d_grad_overflow());
    for (int64_t r = 0; r < S; ++r) {
      fs.check(o.new_state.get()[r * n + i], new_state[r], "row " + std::to_string(r) + " " + at);
      ds.check(o.d_state.get()[r * n + i], d_state[r], "row " + std::to_string(r) + " " + at);
    }
  }
  // The kernels sum d_phi over coordinates in vector lanes, then the lanes, then the ranges: any order of n terms.
  for (int64_t k = 0; k < P; ++k) {
    dp.check(o.d_phi.get()[k], d_phi[k].result(64), "[" + std::to_string(k) + "]");
    dps.check(split.d_phi.get()[k], d_phi[k].result(64), "[" + std::to_string(k) + "]");
  }
  std::printf("  %-22s %-8s n=%-5lld max |kernel - ref| / bound: update %.3f, new_state %.3f, d_grad %.3f%s, "
              "d_state %.3f, d_phi %.3f (ranges %.3f)\n",
              name_of(p.cfg).c_str(), label, (long long)n, fu.ratio, fs.ratio, dg.ratio,
              overflows ? (" (+" + std::to_string(overflows) + " p*g overflows)").c_str() : "", ds.ratio, dp.ratio,
              dps.ratio);
}

// +-inf act as +-FLT_MAX (bitwise), d_grad 0 there; d_new_state = nullptr is zeros (bitwise).
void check_exact_properties(const Problem& p) {
  const int64_t n = p.n, S = p.cfg.state_rows(), P = p.cfg.num_params();
  const Outputs o = run_kernels(p);
  const std::string name = name_of(p.cfg) + " n=" + std::to_string(n);
  for (int64_t a : {14, 16}) {
    bool same = o.update.get()[a] == o.update.get()[a + 1];
    for (int64_t r = 0; r < S; ++r) {
      same = same && o.new_state.get()[r * n + a] == o.new_state.get()[r * n + a + 1];
      same = same && o.d_state.get()[r * n + a] == o.d_state.get()[r * n + a + 1];
    }
    if (!same) fail(name + ": the " + (a == 14 ? "+inf" : "-inf") + " coordinate differs from its FLT_MAX partner");
    if (o.d_grad.get()[a] != 0.0f) fail(name + ": d_grad at an infinite gradient is not 0");
  }
  if (o.update.get()[14] == o.update.get()[16]) fail(name + ": +inf and -inf give the same update");
  Problem zeros = p;
  std::fill(zeros.dns.begin(), zeros.dns.end(), 0.0f);
  const Outputs z = run_kernels(zeros), nul = run_kernels(p, {}, /*null_dns=*/true);
  if (!bitwise_equal(z.d_phi.get(), nul.d_phi.get(), P) || !bitwise_equal(z.d_grad.get(), nul.d_grad.get(), n) ||
      !bitwise_equal(z.d_state.get(), nul.d_state.get(), S * n))
    fail(name + ": d_new_state = nullptr differs from zeros");
}

// NaN propagates to its own coordinate only (lstm_step.h): NaN update, new-state column, d_grad, d_state column, and
// NaN in d_phi; the other coordinates' outputs bitwise those of a run with 0 in place of the NaNs.
void check_nan(const StepConfig& cfg) {
  const int64_t n = 300, S = cfg.state_rows(), P = cfg.num_params();
  Problem p = make_problem(cfg, n, 0.3f, 99, true);
  const std::vector<int64_t> nans = {5, 290};  // in a whole chunk and in the partial last one
  for (int64_t i : nans) p.grad[i] = 0.0f;
  const Outputs clean = run_kernels(p);
  for (int64_t i : nans) p.grad[i] = NAN;
  const Outputs o = run_kernels(p);
  const std::string name = name_of(cfg) + " NaN gradient";
  auto column = [&](const Buffer& x, const Buffer& ref, int64_t i, bool want_nan) {
    for (int64_t r = 0; r < S; ++r) {
      const float v = x.get()[r * n + i];
      if (want_nan ? !std::isnan(v) : std::memcmp(&v, &ref.get()[r * n + i], sizeof(float)) != 0) return false;
    }
    return true;
  };
  int failed = 0;
  for (int64_t i = 0; i < n && failed < 5; ++i) {
    const bool is_nan = std::find(nans.begin(), nans.end(), i) != nans.end();
    const std::string at = " at coordinate " + std::to_string(i) + (is_nan ? " (NaN): not NaN" : ": changed by another's NaN");
    auto scalar_ok = [&](const Buffer& x, const Buffer& ref) {
      return is_nan ? std::isnan(x.get()[i]) : std::memcmp(&x.get()[i], &ref.get()[i], sizeof(float)) == 0;
    };
    if (!scalar_ok(o.update, clean.update)) failed++, fail(name + ": update" + at);
    if (!column(o.new_state, clean.new_state, i, is_nan)) failed++, fail(name + ": new_state" + at);
    if (!scalar_ok(o.d_grad, clean.d_grad)) failed++, fail(name + ": d_grad" + at);
    if (!column(o.d_state, clean.d_state, i, is_nan)) failed++, fail(name + ": d_state" + at);
  }
  bool any_nan = false;
  for (int64_t k = 0; k < P; ++k) any_nan = any_nan || std::isnan(o.d_phi.get()[k]);
  if (!any_nan) failed++, fail(name + ": d_phi has no NaN");
  if (!failed)
    std::printf("  %-22s NaN gradients at %lld, %lld: NaN update, new-state column, d_grad, d_state column and d_phi; "
                "the other coordinates bitwise unchanged\n", name_of(cfg).c_str(), (long long)nans[0], (long long)nans[1]);
}

// The reference's backward against central differences of its forward (double), for L = du . update + dns . state.
void check_reference_gradients(const StepConfig& cfg) {
  const int64_t n = 6, S = cfg.state_rows(), P = cfg.num_params();
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal(0.0, 1.0);
  const Problem p = make_problem(cfg, n, 0.7f, 11, false);
  auto loss = [&](const std::vector<double>& phi, const std::vector<double>& g, const std::vector<double>& state) {
    Reference ref(cfg, phi, p.scale);
    std::vector<double> st(S);
    std::vector<B> ns(S);
    double L = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t r = 0; r < S; ++r) st[r] = state[r * n + i];
      B u;
      ref.forward(g[i], st.data(), &u, ns.data());
      L += p.du[i] * u.v;
      for (int64_t r = 0; r < S; ++r) L += p.dns[r * n + i] * ns[r].v;
    }
    return L;
  };
  std::vector<double> phi(p.phi.begin(), p.phi.end()), g(p.grad.begin(), p.grad.end()),
      state(p.state.begin(), p.state.end());
  // Analytic directional derivative along random directions of phi, grad and state.
  std::vector<double> vphi(P), vg(n), vs(S * n);
  for (auto& v : vphi) v = normal(rng);
  for (int64_t i = 0; i < n; ++i) vg[i] = normal(rng) * std::fabs(g[i]);  // relative: the gradients span decades
  for (auto& v : vs) v = normal(rng);
  Reference ref(cfg, phi, p.scale);
  std::vector<Sum> d_phi(P);
  std::vector<double> st(S), dns(S);
  std::vector<B> ns(S), d_state(S);
  double analytic = 0, magnitude = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t r = 0; r < S; ++r) {
      st[r] = state[r * n + i];
      dns[r] = p.dns[r * n + i];
    }
    B u, dg;
    ref.forward(g[i], st.data(), &u, ns.data());
    ref.backward(st.data(), p.du[i], dns.data(), &dg, d_state.data(), d_phi);
    analytic += dg.v * vg[i];
    magnitude += std::fabs(dg.v * vg[i]);
    for (int64_t r = 0; r < S; ++r) {
      analytic += d_state[r].v * vs[r * n + i];
      magnitude += std::fabs(d_state[r].v * vs[r * n + i]);
    }
  }
  for (int64_t k = 0; k < P; ++k) {
    analytic += d_phi[k].v * vphi[k];
    magnitude += std::fabs(d_phi[k].v * vphi[k]);
  }
  const double h = 1e-6;
  auto moved = [&](double t) {
    std::vector<double> a = phi, b = g, c = state;
    for (int64_t k = 0; k < P; ++k) a[k] += t * vphi[k];
    for (int64_t i = 0; i < n; ++i) b[i] += t * vg[i];
    for (int64_t k = 0; k < S * n; ++k) c[k] += t * vs[k];
    return loss(a, b, c);
  };
  const double fd = (moved(h) - moved(-h)) / (2 * h);
  const bool ok = std::fabs(fd - analytic) <= 1e-6 * magnitude + 1e-9;
  std::printf("  %-22s reference backward vs finite differences: %.10g vs %.10g (%s)\n", name_of(cfg).c_str(),
              analytic, fd, ok ? "ok" : "MISMATCH");
  if (!ok) fail(name_of(cfg) + ": the reference's backward disagrees with its finite differences");
}

void check_validate_config() {
  const StepConfig good = config(20, 20, Preprocess::kPaper, 10.0f);
  bool ok = l2l::validate_config(good) == nullptr;
  for (const StepConfig& bad : {config(0, 20, Preprocess::kNone, 1.0f), config(20, 4097, Preprocess::kNone, 1.0f),
                                config(20, 20, Preprocess::kPaper, 0.0f), config(20, 20, Preprocess::kClamped, 80.5f),
                                config(20, 20, Preprocess::kPaper, NAN), config(20, 20, Preprocess(7), 1.0f)})
    ok = ok && l2l::validate_config(bad) != nullptr;
  ok = ok && l2l::validate_config(config(20, 20, Preprocess::kNone, NAN)) == nullptr;  // unused for kNone
  for (float edge : {l2l::kPreprocessParamMin, l2l::kPreprocessParamMax})
    ok = ok && l2l::validate_config(config(7, 5, Preprocess::kClamped, edge)) == nullptr;
  if (!ok) fail("validate_config accepts or rejects the wrong configurations");
}

}  // namespace

int main() {
  std::printf("CPU kernels (lstm_step_cpu.cc) vs the double reference with running error bounds\n");
  const std::vector<StepConfig> configs = {
      config(20, 20, Preprocess::kNone, 10.0f),    config(20, 20, Preprocess::kPaper, 10.0f),
      config(20, 20, Preprocess::kClamped, 5.0f),  config(7, 5, Preprocess::kNone, 10.0f),
      config(7, 5, Preprocess::kPaper, 3.0f),      config(7, 5, Preprocess::kClamped, 2.0f),
      config(7, 5, Preprocess::kPaper, 1e-3f),     config(7, 5, Preprocess::kPaper, 80.0f),
      config(7, 5, Preprocess::kClamped, 1e-3f),   config(7, 5, Preprocess::kClamped, 80.0f),
      // 108 and 12 gates: with AVX-512, weight-gradient tiles of 5 and 2 gate vectors, and padded gate lanes.
      config(27, 3, Preprocess::kPaper, 10.0f)};
  uint64_t seed = 1;
  for (const StepConfig& cfg : configs) {
    if (l2l::validate_config(cfg) != nullptr) {
      fail(name_of(cfg) + ": rejected by validate_config");
      continue;
    }
    const bool big = cfg.hidden1 == 20;
    // 1536: 64-byte aligned rows (streaming stores), whole chunks; 1000: unaligned rows and a partial last chunk.
    check_against_reference(make_problem(cfg, big ? 1536 : 1000, 0.1f, seed++, true), "extreme");
    check_against_reference(make_problem(cfg, big ? 1000 : 300, 0.7f, seed++, false), "typical");
    check_exact_properties(make_problem(cfg, 1000, 0.1f, seed++, true));
  }
  for (int64_t n : {1, 17, 256, 257}) check_against_reference(make_problem(configs[4], n, 0.5f, seed++, n > 20), "small");
  for (const StepConfig& cfg : {configs[0], configs[1], configs[2]}) check_nan(cfg);
  for (const StepConfig& cfg : {configs[0], configs[4], configs[5]}) check_reference_gradients(cfg);
  check_validate_config();
  if (g_failures) {
    std::printf("FAILED: %d check(s)\n", g_failures);
    return 1;
  }
  std::printf("PASSED\n");
  return 0;
}
