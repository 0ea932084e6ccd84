// pybind11 module l2l_tf._kernels: the CPU kernels of lstm_step.h on float32 NumPy arrays (no TensorFlow),
// for tests and tools. With -DL2L_WITH_CUDA the CUDA bindings (pybind_cuda.cc) are added too.
//
//   num_params(hidden1, hidden2, preprocess) -> int
//   forward_cpu(phi, grad, state, scale, hidden1=20, hidden2=20, preprocess="none", preprocess_param=10.0,
//               num_threads=0, save_activations=False, matmul_precision="float32") -> (update, new_state[, activations])
//       matmul_precision "bfloat16": the GEMMs take bf16-rounded inputs, float32 sums (StepConfig::bf16_matmul)
//   backward_cpu(phi, grad, state, scale, d_update, d_new_state_or_None, hidden1=20, hidden2=20,
//                preprocess="none", preprocess_param=10.0, num_threads=0, activations=None, input_gradient=True,
//                matmul_precision="float32")
//       -> (d_phi, d_grad, d_state)   (activations: what forward_cpu saved for the same inputs; None: recomputed;
//                                      input_gradient=False: d_grad is None, not computed)
//   plan_shards(sizes, threads) -> [[(tensor, begin, end), ...], ...]   (how the TF op splits a multi-tensor step)
//   sub_block_size() -> int   (coordinates per sub-block: plan_shards' unit of cost)
//   phase_ticks_cpu(phi, grad, state, scale, d_update, d_new_state_or_None, hidden1=20, hidden2=20,
//                   preprocess="none", preprocess_param=10.0, repeats=5, saved_activations=False,
//                   input_gradient=True, matmul_precision="float32")
//       -> {"phases": [names], "forward": [ticks], "backward": [ticks], "tsc_hz": float}
//       time-stamp-counter ticks per phase (lstm_step.h Phase) of one forward and one backward on this thread,
//       the minimum over `repeats` runs of each phase (a benchmark mode; see experiments/bench_step.py)
//   fma_peak(threads=0, seconds=0.3) -> float   multiply-adds per second of `threads` threads together (0: all
//       cores) in the kernels' vector width: the peak the arithmetic floor is measured against
//   bf16_matmul_available() -> bool   (the kernels were built with AVX512_BF16: matmul_precision="bfloat16" runs)
//   cuda_available() -> bool
//
// Arrays must be C-contiguous float32 of the right shapes (ValueError otherwise); preprocess_param must lie in
// [0.001, 80] for "paper" and "clamped" (ValueError). Gradients of +-inf act as +-FLT_MAX (d_grad 0 there), NaN
// gradients give NaN updates (lstm_step.h). Work is split over
// num_threads std::threads (0 = hardware concurrency) in ranges of whole 256-coordinate chunks; the GIL is
// released meanwhile. d_phi sums per-thread partial buffers in thread order (deterministic for a fixed
// thread count); every other output is independent of the thread count.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <chrono>
#include <thread>
#include <vector>

#include "lstm_step.h"
#include "pybind_config.h"

namespace py = pybind11;

namespace l2l {
#ifdef L2L_WITH_CUDA
void register_cuda_bindings(pybind11::module_& m);
#endif

namespace {

constexpr int64_t kSplitUnit = 256;  // thread ranges are multiples of this many coordinates

StepConfig make_config(int hidden1, int hidden2, const std::string& preprocess, double preprocess_param,
                       const std::string& matmul_precision = "float32") {
  const StepConfig cfg = parse_step_config(hidden1, hidden2, preprocess, preprocess_param, matmul_precision);
  if (const char* msg = validate_config(cfg)) throw py::value_error(msg);
  return cfg;
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks dtype, contiguity and shape (-1: any) of a float32 input.
const float* checked(const py::array& a, const char* name, std::vector<int64_t> shape) {
  if (!a.dtype().is(py::dtype::of<float>())) {
    throw py::value_error(std::string(name) + " must be a float32 array, got dtype " +
                          std::string(py::str(a.dtype())));
  }
  if (a.ndim() != py::ssize_t(shape.size())) {
    throw py::value_error(std::string(name) + " must have " + std::to_string(shape.size()) +
                          " dimension(s), got shape " + shape_str(a));
  }
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] >= 0 && a.shape(i) != shape[i]) {
      std::string want = "(";
      for (size_t j = 0; j < shape.size(); ++j) want += (j ? ", " : "") + std::to_string(shape[j]);
      want += shape.size() == 1 ? ",)" : ")";
      throw py::value_error(std::string(name) + " must have shape " + want + ", got " + shape_str(a));
    }
  }
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  return static_cast<const float*>(a.data());
}

// A new float32 array with 64-byte aligned data (the kernels then write whole cache lines with streaming
// stores when the row length is a multiple of 16).
py::array_t<float> aligned_array(std::vector<py::ssize_t> shape) {
  size_t count = 1;
  for (auto d : shape) count *= size_t(d);
  void* p = nullptr;
  if (posix_memalign(&p, 64, std::max<size_t>(count, 1) * sizeof(float)) != 0) throw std::bad_alloc();
  py::capsule owner(p, [](void* q) { std::free(q); });
  return py::array_t<float>(shape, static_cast<float*>(p), owner);
}

float checked_scale(double scale) {
  if (!std::isfinite(float(scale))) throw py::value_error("scale must be finite, got " + std::to_string(scale));
  return float(scale);
}

int resolve_threads(int num_threads, int64_t n) {
  if (num_threads < 0) throw py::value_error("num_threads must be >= 0");
  int t = num_threads == 0 ? int(std::max(1u, std::thread::hardware_concurrency())) : num_threads;
  const int64_t units = (n + kSplitUnit - 1) / kSplitUnit;
  return int(std::max<int64_t>(1, std::min<int64_t>(t, units)));
}

// Calls fn(thread index, begin, end) on `threads` ranges of [0, n), the last one on this thread.
template <class Fn>
void run_split(int threads, int64_t n, Fn fn) {
  const int64_t units = (n + kSplitUnit - 1) / kSplitUnit;
  auto range = [&](int t) {
    const int64_t b = std::min(n, units * t / threads * kSplitUnit);
    const int64_t e = std::min(n, units * (t + 1) / threads * kSplitUnit);
    return std::make_pair(b, e);
  };
  std::vector<std::thread> pool;
  for (int t = 0; t + 1 < threads; ++t) {
    auto r = range(t);
    pool.emplace_back([=, &fn] { fn(t, r.first, r.second); });
  }
  auto r = range(threads - 1);
  fn(threads - 1, r.first, r.second);
  for (auto& th : pool) th.join();
}

// An optional float32 input (None: nullptr), checked as `checked` does; `keep` holds the converted array alive.
const float* checked_optional(const py::object& a, const char* name, std::vector<int64_t> shape, py::array* keep) {
  if (a.is_none()) return nullptr;
  if (!py::isinstance<py::array>(a)) throw py::value_error(std::string(name) + " must be a float32 array or None");
  *keep = a.cast<py::array>();
  return checked(*keep, name, std::move(shape));
}

// The checked arrays of a backward call (d_new_state None: nullptr, zero upstream gradient).
struct BackwardInputs {
  StepConfig cfg;
  const float *phi, *grad, *state, *d_update, *d_new_state;
  int64_t n;
  float scale;
  py::array d_new_state_array;  // keep converted optional inputs alive
  const float* activations = nullptr;
  py::array activations_array;
};

BackwardInputs checked_backward_inputs(const py::array& phi, const py::array& grad, const py::array& state,
                                       double scale, const py::array& d_update, const py::object& d_new_state,
                                       int hidden1, int hidden2, const std::string& preprocess,
                                       double preprocess_param, const std::string& matmul_precision,
                                       const py::object& activations = py::none()) {
  BackwardInputs in;
  in.cfg = make_config(hidden1, hidden2, preprocess, preprocess_param, matmul_precision);
  in.phi = checked(phi, "phi", {in.cfg.num_params()});
  in.grad = checked(grad, "grad", {-1});
  in.n = grad.shape(0);
  in.state = checked(state, "state", {in.cfg.state_rows(), in.n});
  in.d_update = checked(d_update, "d_update", {in.n});
  in.d_new_state = checked_optional(d_new_state, "d_new_state", {in.cfg.state_rows(), in.n}, &in.d_new_state_array);
  in.activations = checked_optional(activations, "activations", {in.cfg.activation_rows(), in.n},
                                    &in.activations_array);
  in.scale = checked_scale(scale);
  return in;
}

py::tuple forward_cpu(const py::array& phi, const py::array& grad, const py::array& state, double scale,
                      int hidden1, int hidden2, const std::string& preprocess, double preprocess_param,
                      int num_threads, bool save_activations, const std::string& matmul_precision) {
  const StepConfig cfg = make_config(hidden1, hidden2, preprocess, preprocess_param, matmul_precision);
  const float* phi_p = checked(phi, "phi", {cfg.num_params()});
  const float* grad_p = checked(grad, "grad", {-1});
  const int64_t n = grad.shape(0);
  const float* state_p = checked(state, "state", {cfg.state_rows(), n});
  py::array_t<float> update = aligned_array({n});
  py::array_t<float> new_state = aligned_array({cfg.state_rows(), n});
  float* up = update.mutable_data();
  float* ns = new_state.mutable_data();
  py::array_t<float> activations = aligned_array({save_activations ? cfg.activation_rows() : 0, n});
  float* act = save_activations ? activations.mutable_data() : nullptr;
  const int threads = resolve_threads(num_threads, n);
  const float sc = checked_scale(scale);
  {
    py::gil_scoped_release release;
    run_split(threads, n, [&](int, int64_t b, int64_t e) {
      lstm_step_forward_cpu(cfg, phi_p, grad_p, state_p, sc, n, b, e, up, ns, act);
    });
  }
  if (save_activations) return py::make_tuple(update, new_state, activations);
  return py::make_tuple(update, new_state);
}

py::tuple backward_cpu(const py::array& phi, const py::array& grad, const py::array& state, double scale,
                       const py::array& d_update, const py::object& d_new_state, int hidden1, int hidden2,
                       const std::string& preprocess, double preprocess_param, int num_threads,
                       const py::object& activations, bool input_gradient, const std::string& matmul_precision) {
  const BackwardInputs in = checked_backward_inputs(phi, grad, state, scale, d_update, d_new_state, hidden1, hidden2,
                                                    preprocess, preprocess_param, matmul_precision, activations);
  const StepConfig& cfg = in.cfg;
  const int64_t n = in.n, P = cfg.num_params();
  py::array_t<float> d_phi({P});
  py::array_t<float> d_grad = aligned_array({input_gradient ? n : 0});
  py::array_t<float> d_state = aligned_array({cfg.state_rows(), n});
  float* dphi_p = d_phi.mutable_data();
  float* dg_p = input_gradient ? d_grad.mutable_data() : nullptr;
  float* ds_p = d_state.mutable_data();
  const int threads = resolve_threads(num_threads, n);
  {
    py::gil_scoped_release release;
    std::vector<float> partial(size_t(threads) * size_t(P), 0.0f);
    run_split(threads, n, [&](int t, int64_t b, int64_t e) {
      lstm_step_backward_cpu(cfg, in.phi, in.grad, in.state, in.scale, n, b, e, in.d_update, in.d_new_state,
                             partial.data() + t * P, dg_p, ds_p, in.activations);
    });
    std::memcpy(dphi_p, partial.data(), sizeof(float) * P);
    for (int t = 1; t < threads; ++t)
      for (int64_t i = 0; i < P; ++i) dphi_p[i] += partial[size_t(t) * P + i];
  }
  if (!input_gradient) return py::make_tuple(d_phi, py::none(), d_state);
  return py::make_tuple(d_phi, d_grad, d_state);
}

py::list plan_shards_py(const std::vector<int64_t>& sizes, int threads) {
  for (int64_t n : sizes)
    if (n < 0) throw py::value_error("sizes must be >= 0");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  py::list out;
  for (const auto& shard : plan_shards(sizes.data(), int(sizes.size()), threads)) {
    py::list slices;
    for (const Slice& sl : shard) slices.append(py::make_tuple(sl.tensor, sl.begin, sl.end));
    out.append(slices);
  }
  return out;
}

// Time-stamp-counter ticks per second, measured against the steady clock over ~20 ms.
double tsc_hz() {
  const auto t0 = std::chrono::steady_clock::now();
#if defined(__x86_64__) || defined(__i386__)
  const uint64_t c0 = __builtin_ia32_rdtsc();
  while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(20)) {
  }
  const uint64_t c1 = __builtin_ia32_rdtsc();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return double(c1 - c0) / s;
#else
  return 0.0;
#endif
}

py::dict phase_ticks_cpu(const py::array& phi, const py::array& grad, const py::array& state, double scale,
                         const py::array& d_update, const py::object& d_new_state, int hidden1, int hidden2,
                         const std::string& preprocess, double preprocess_param, int repeats,
                         bool saved_activations, bool input_gradient, const std::string& matmul_precision) {
  const BackwardInputs in = checked_backward_inputs(phi, grad, state, scale, d_update, d_new_state, hidden1, hidden2,
                                                    preprocess, preprocess_param, matmul_precision);
  const StepConfig& cfg = in.cfg;
  const int64_t n = in.n;
  if (repeats < 1) throw py::value_error("repeats must be >= 1");
  py::array_t<float> update = aligned_array({n}), new_state = aligned_array({cfg.state_rows(), n});
  py::array_t<float> d_grad = aligned_array({n}), d_state = aligned_array({cfg.state_rows(), n});
  std::vector<float> d_phi(size_t(cfg.num_params()));
  py::array_t<float> activations = aligned_array({saved_activations ? cfg.activation_rows() : 0, n});
  float* act = saved_activations ? activations.mutable_data() : nullptr;
  std::vector<uint64_t> fwd(kNumPhases, UINT64_MAX), bwd(kNumPhases, UINT64_MAX);
  {
    py::gil_scoped_release release;
    for (int r = 0; r < repeats; ++r) {
      PhaseCycles f, b;
      PhaseCycles* previous = set_thread_phase_cycles(&f);
      lstm_step_forward_cpu(cfg, in.phi, in.grad, in.state, in.scale, n, 0, n, update.mutable_data(),
                            new_state.mutable_data(), act);
      set_thread_phase_cycles(&b);
      lstm_step_backward_cpu(cfg, in.phi, in.grad, in.state, in.scale, n, 0, n, in.d_update, in.d_new_state,
                             d_phi.data(), input_gradient ? d_grad.mutable_data() : nullptr, d_state.mutable_data(),
                             act);
      set_thread_phase_cycles(previous);
      for (int p = 0; p < kNumPhases; ++p) {
        fwd[p] = std::min(fwd[p], f.ticks[p]);
        bwd[p] = std::min(bwd[p], b.ticks[p]);
      }
    }
  }
  py::list names;
  for (int p = 0; p < kNumPhases; ++p) names.append(phase_name(p));
  py::dict out;
  out["phases"] = names;
  out["forward"] = fwd;
  out["backward"] = bwd;
  out["tsc_hz"] = tsc_hz();
  return out;
}

double fma_peak(int threads, double seconds) {
  if (threads < 0) throw py::value_error("threads must be >= 0");
  if (threads == 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<double> rates(size_t(threads), 0.0);
  {
    py::gil_scoped_release release;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { rates[size_t(t)] = fma_peak_per_second(seconds); });
    for (auto& th : pool) th.join();
  }
  double total = 0.0;
  for (double r : rates) total += r;
  return total;
}

}  // namespace
}  // namespace l2l

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "CPU (and, when built with CUDA, GPU) kernels of the coordinatewise LSTM optimizer step";
  m.def(
      "num_params",
      [](int hidden1, int hidden2, const std::string& preprocess) {
        return l2l::make_config(hidden1, hidden2, preprocess, 10.0).num_params();
      },
      py::arg("hidden1"), py::arg("hidden2"), py::arg("preprocess"),
      "Length of the flat phi vector for these sizes and preprocessing.");
  m.def(
      "bf16_matmul_available",
      []() {
        l2l::StepConfig cfg;
        cfg.bf16_matmul = true;
        return l2l::validate_config(cfg) == nullptr;
      },
      "True when the CPU kernels were built with AVX512_BF16, so matmul_precision='bfloat16' runs.");
  // The saved activations' block width (lstm_step.h: how forward_cpu(save_activations=True) lays them out).
  m.attr("activation_group") = l2l::kActivationGroup;
  m.def("forward_cpu", &l2l::forward_cpu, py::arg("phi"), py::arg("grad"), py::arg("state"), py::arg("scale"),
        py::arg("hidden1") = 20, py::arg("hidden2") = 20, py::arg("preprocess") = "none",
        py::arg("preprocess_param") = 10.0, py::arg("num_threads") = 0, py::arg("save_activations") = false,
        py::arg("matmul_precision") = "float32",
        "One LSTM step on float32 arrays: phi [P], grad [N], state [S, N] -> (update [N], new_state [S, N]), and "
        "with save_activations the activations (4 (H1 + H2) x N floats, shaped [4 (H1 + H2), N], in the blocked layout "
        "of lstm_step.h: activation_group coordinates per block) a backward can use instead of recomputing them.");
  m.def("backward_cpu", &l2l::backward_cpu, py::arg("phi"), py::arg("grad"), py::arg("state"), py::arg("scale"),
        py::arg("d_update"), py::arg("d_new_state"), py::arg("hidden1") = 20, py::arg("hidden2") = 20,
        py::arg("preprocess") = "none", py::arg("preprocess_param") = 10.0, py::arg("num_threads") = 0,
        py::arg("activations") = py::none(), py::arg("input_gradient") = true, py::arg("matmul_precision") = "float32",
        "Backward of forward_cpu (d_new_state may be None; activations: what forward_cpu saved for the same "
        "inputs, else None to recompute them) -> (d_phi [P], d_grad [N], d_state [S, N]); input_gradient=False: "
        "d_grad is None, not computed (d_phi and d_state are the same).");
  m.def("plan_shards", &l2l::plan_shards_py, py::arg("sizes"), py::arg("threads"),
        "How a multi-tensor step over tensors of these sizes is split into shards for `threads` threads: a list of "
        "shards, each a list of (tensor, begin, end).");
  m.def("sub_block_size", &l2l::sub_block_size,
        "Coordinates per register-tiled sub-block of the CPU kernels (64 with AVX-512, 16 with AVX2): plan_shards' "
        "unit of cost.");
  m.def("phase_ticks_cpu", &l2l::phase_ticks_cpu, py::arg("phi"), py::arg("grad"), py::arg("state"),
        py::arg("scale"), py::arg("d_update"), py::arg("d_new_state"), py::arg("hidden1") = 20,
        py::arg("hidden2") = 20, py::arg("preprocess") = "none", py::arg("preprocess_param") = 10.0,
        py::arg("repeats") = 5, py::arg("saved_activations") = false, py::arg("input_gradient") = true,
        py::arg("matmul_precision") = "float32",
        "Time-stamp-counter ticks per kernel phase of one forward and one backward on this thread (minimum over "
        "repeats): {'phases', 'forward', 'backward', 'tsc_hz'}.");
  m.def("fma_peak", &l2l::fma_peak, py::arg("threads") = 0, py::arg("seconds") = 0.3,
        "Multiply-adds per second of `threads` threads running together (0: all cores), in the kernels' vector "
        "width.");
  m.def(
      "cuda_available",
      []() {
#ifdef L2L_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the module was compiled with the CUDA kernels.");
#ifdef L2L_WITH_CUDA
  l2l::register_cuda_bindings(m);
#endif
}
