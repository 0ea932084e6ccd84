// Shared by the pybind11 bindings (pybind_module.cc, pybind_cuda.cc): a StepConfig from Python arguments.
// Parses only; validation is the caller's (the CPU bindings raise ValueError, the CUDA kernels return a message).
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "lstm_step.h"

namespace l2l {

inline Preprocess parse_preprocess(const std::string& name) {
  if (name == "none") return Preprocess::kNone;
  if (name == "paper") return Preprocess::kPaper;
  if (name == "clamped") return Preprocess::kClamped;
  throw pybind11::value_error("preprocess must be 'none', 'paper' or 'clamped', got '" + name + "'");
}

inline bool parse_matmul_precision(const std::string& name) {  // true: bf16 GEMM inputs
  if (name == "float32") return false;
  if (name == "bfloat16") return true;
  throw pybind11::value_error("matmul_precision must be 'float32' or 'bfloat16', got '" + name + "'");
}

inline StepConfig parse_step_config(int hidden1, int hidden2, const std::string& preprocess,
                                    double preprocess_param, const std::string& matmul_precision = "float32") {
  StepConfig cfg;
  cfg.bf16_matmul = parse_matmul_precision(matmul_precision);
  cfg.hidden1 = hidden1;
  cfg.hidden2 = hidden2;
  cfg.preprocess = parse_preprocess(preprocess);
  cfg.preprocess_param = static_cast<float>(preprocess_param);
  return cfg;
}

}  // namespace l2l
