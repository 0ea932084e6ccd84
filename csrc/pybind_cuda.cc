// pybind11 bindings of the CUDA entry points (compiled with -DL2L_WITH_CUDA into l2l_tf._kernels; see
// pybind_module.cc, which calls register_cuda_bindings). Pointers are device addresses passed as Python
// ints (CuPy `.data.ptr`, torch `.data_ptr()`); the stream is a cudaStream_t as an int (0 = legacy default).
// No CUDA headers here: the kernels are in lstm_step_cuda.cu.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lstm_step_cuda.h"
#include "pybind_config.h"

namespace py = pybind11;

namespace l2l {

// Internal tuning hook defined in lstm_step_cuda.cu (not part of lstm_step_cuda.h): the TF32 kernel with an
// explicit tile shape, for tools/gpu_check.py.
const char* lstm_step_forward_cuda_variant(const StepConfig& cfg, int m_tiles, int stages, int act, int warps,
                                           const float* phi, const float* grad, const float* state, float scale,
                                           int64_t n, float* update, float* new_state, void* stream);

namespace {

GpuMath parse_math(const std::string& name) {
  if (name == "fp32") return GpuMath::kFP32;
  if (name == "tf32") return GpuMath::kTF32;
  throw py::value_error("math must be 'fp32' or 'tf32', got '" + name + "'");
}


template <typename T>
T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void raise_if(const char* message) {
  if (message != nullptr) throw std::runtime_error(message);
}

}  // namespace

void register_cuda_bindings(py::module_& m) {
  m.def(
      "forward_cuda",
      [](std::uintptr_t phi, std::uintptr_t grad, std::uintptr_t state, float scale, int64_t n,
         std::uintptr_t update, std::uintptr_t new_state, int hidden1, int hidden2, const std::string& preprocess,
         double preprocess_param, const std::string& math, std::uintptr_t stream) {
        const StepConfig cfg = parse_step_config(hidden1, hidden2, preprocess, preprocess_param);
        const GpuMath gm = parse_math(math);
        const char* msg;
        {
          py::gil_scoped_release release;
          msg = lstm_step_forward_cuda(cfg, gm, as_ptr<const float>(phi), as_ptr<const float>(grad),
                                       as_ptr<const float>(state), scale, n, as_ptr<float>(update),
                                       as_ptr<float>(new_state), reinterpret_cast<void*>(stream));
        }
        raise_if(msg);
      },
      py::arg("phi_ptr"), py::arg("grad_ptr"), py::arg("state_ptr"), py::arg("scale"), py::arg("n"),
      py::arg("update_ptr"), py::arg("new_state_ptr"), py::arg("hidden1") = 20, py::arg("hidden2") = 20,
      py::arg("preprocess") = "none", py::arg("preprocess_param") = 10.0, py::arg("math") = "fp32",
      py::arg("stream") = 0,
      "Queue the forward step on the GPU. Device pointers as ints: phi [P], grad [N], state [S, N] -> update [N], "
      "new_state [S, N] (float32). math: 'fp32' (accurate) or 'tf32' (tensor cores, hidden 20/20; other sizes "
      "run the fp32 kernel). Raises RuntimeError on a bad config or a launch error.");

  m.def(
      "backward_cuda",
      [](std::uintptr_t phi, std::uintptr_t grad, std::uintptr_t state, float scale, int64_t n,
         std::uintptr_t d_update, std::uintptr_t d_new_state, std::uintptr_t d_phi, std::uintptr_t d_grad,
         std::uintptr_t d_state, int hidden1, int hidden2, const std::string& preprocess, double preprocess_param,
         std::uintptr_t stream) {
        const StepConfig cfg = parse_step_config(hidden1, hidden2, preprocess, preprocess_param);
        const char* msg;
        {
          py::gil_scoped_release release;
          msg = lstm_step_backward_cuda(cfg, as_ptr<const float>(phi), as_ptr<const float>(grad),
                                        as_ptr<const float>(state), scale, n, as_ptr<const float>(d_update),
                                        as_ptr<const float>(d_new_state), as_ptr<float>(d_phi),
                                        as_ptr<float>(d_grad), as_ptr<float>(d_state),
                                        reinterpret_cast<void*>(stream));
        }
        raise_if(msg);
      },
      py::arg("phi_ptr"), py::arg("grad_ptr"), py::arg("state_ptr"), py::arg("scale"), py::arg("n"),
      py::arg("d_update_ptr"), py::arg("d_new_state_ptr"), py::arg("d_phi_ptr"), py::arg("d_grad_ptr"),
      py::arg("d_state_ptr"), py::arg("hidden1") = 20, py::arg("hidden2") = 20, py::arg("preprocess") = "none",
      py::arg("preprocess_param") = 10.0, py::arg("stream") = 0,
      "Queue the backward step on the GPU. d_new_state_ptr = 0 means a zero upstream state gradient. d_phi [P] "
      "is overwritten (zeroed on the stream, then accumulated with atomics). Raises RuntimeError on error.");

  m.def(
      "_forward_cuda_variant",
      [](std::uintptr_t phi, std::uintptr_t grad, std::uintptr_t state, float scale, int64_t n,
         std::uintptr_t update, std::uintptr_t new_state, int hidden1, int hidden2, const std::string& preprocess,
         double preprocess_param, int m_tiles, int stages, int act, int warps, std::uintptr_t stream) {
        const StepConfig cfg = parse_step_config(hidden1, hidden2, preprocess, preprocess_param);
        const char* msg;
        {
          py::gil_scoped_release release;
          msg = lstm_step_forward_cuda_variant(cfg, m_tiles, stages, act, warps, as_ptr<const float>(phi),
                                               as_ptr<const float>(grad), as_ptr<const float>(state), scale, n,
                                               as_ptr<float>(update), as_ptr<float>(new_state),
                                               reinterpret_cast<void*>(stream));
        }
        raise_if(msg);
      },
      py::arg("phi_ptr"), py::arg("grad_ptr"), py::arg("state_ptr"), py::arg("scale"), py::arg("n"),
      py::arg("update_ptr"), py::arg("new_state_ptr"), py::arg("hidden1") = 20, py::arg("hidden2") = 20,
      py::arg("preprocess") = "none", py::arg("preprocess_param") = 10.0, py::arg("m_tiles") = 2,
      py::arg("stages") = 2, py::arg("act") = 1, py::arg("warps") = 0, py::arg("stream") = 0,
      "Internal (tools/gpu_check.py): the TF32 forward with an explicit variant: m_tiles 1|2 (16*m_tiles "
      "coordinates per warp tile), stages 2|3, act 1 (ex2/rcp approx) | 0 (tanh.approx), warps per block (0: "
      "as many as fit). Instantiated (m_tiles, stages, act): (2,2,1) = the default, (2,2,0), (2,3,0), (1,2,1).");
}

}  // namespace l2l
