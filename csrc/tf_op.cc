// TensorFlow custom ops of the coordinatewise LSTM step (contract: lstm_step.h):
//
//   L2lLstmStep(phi [P], grad [N], state [S, N], scale []) -> (update [N], new_state [S, N])
//   L2lLstmStepGrad(phi, grad, state, scale, d_update [N], d_new_state [S, N]) -> (d_phi [P], d_grad [N],
//                                                                                  d_state [S, N])
//   attrs: hidden1, hidden2 (int >= 1), preprocess in {"none", "paper", "clamped"}, preprocess_param (float; in
//   [0.001, 80] for "paper" and "clamped", see lstm_step.h).
//
// float32 only. Every malformed input is an InvalidArgument error (shape functions at graph construction, the
// kernels again at run time for shapes unknown until then), never a crash. The Python wrapper (l2l_tf/ops) checks
// the same things first, with the messages the pure-TF reference gives. Non-finite gradients as in lstm_step.h:
// +-inf act as +-FLT_MAX (d_grad 0 there), NaN propagates to the coordinate's update and state.
//
// CPU kernels: the work is split into shards of whole 256-coordinate chunks run on TF's intra-op thread pool.
// The backward gives each shard its own d_phi buffer and sums them in shard order, so the result is
// deterministic for a given thread-pool size. The forward reuses the state (and grad) buffers for its outputs
// when TF lets it (the CPU kernel reads every element before writing it), so a state that is not needed
// afterwards is updated in place; the backward likewise reuses d_new_state and d_update.
//
// GPU kernels (compiled with -DGOOGLE_CUDA=1): call the entry points of lstm_step_cuda.h on the op's stream.
// The forward uses the TF32 path when TensorFlow allows TF32 execution
// (tf.config.experimental.enable_tensor_float_32_execution, on by default), else exact FP32. `scale` lives in
// host memory.
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "lstm_step.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"

#if GOOGLE_CUDA
#include "lstm_step_cuda.h"
#include "tsl/platform/tensor_float_32_utils.h"
#endif

namespace l2l_tf {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::TensorShapeUtils;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;
namespace errors = tensorflow::errors;

// ---- configuration from the attrs (shared by the shape functions and the kernels)
template <class Context>
absl::Status GetStepConfig(Context* c, l2l::StepConfig* cfg) {
  int64_t hidden1 = 0, hidden2 = 0;
  std::string preprocess;
  float param = 0.0f;
  TF_RETURN_IF_ERROR(c->GetAttr("hidden1", &hidden1));
  TF_RETURN_IF_ERROR(c->GetAttr("hidden2", &hidden2));
  TF_RETURN_IF_ERROR(c->GetAttr("preprocess", &preprocess));
  TF_RETURN_IF_ERROR(c->GetAttr("preprocess_param", &param));
  if (hidden1 < 1 || hidden1 > 4096 || hidden2 < 1 || hidden2 > 4096) {
    return errors::InvalidArgument("hidden1 and hidden2 must be in [1, 4096], got ", hidden1, " and ", hidden2);
  }
  cfg->hidden1 = int32_t(hidden1);
  cfg->hidden2 = int32_t(hidden2);
  if (preprocess == "none") {
    cfg->preprocess = l2l::Preprocess::kNone;
  } else if (preprocess == "paper") {
    cfg->preprocess = l2l::Preprocess::kPaper;
  } else if (preprocess == "clamped") {
    cfg->preprocess = l2l::Preprocess::kClamped;
  } else {
    return errors::InvalidArgument("preprocess must be 'none', 'paper' or 'clamped', got '", preprocess, "'");
  }
  cfg->preprocess_param = param;
  if (const char* msg = l2l::validate_config(*cfg)) {
    return errors::InvalidArgument(msg, " (preprocess_param=", param, ")");
  }
  return absl::OkStatus();
}

std::string ConfigString(const l2l::StepConfig& cfg) {
  const char* names[] = {"none", "paper", "clamped"};
  return "hidden1=" + std::to_string(cfg.hidden1) + ", hidden2=" + std::to_string(cfg.hidden2) +
         ", preprocess='" + names[int(cfg.preprocess)] + "'";
}

// ---- shape functions
absl::Status CommonShapes(InferenceContext* c, const l2l::StepConfig& cfg, DimensionHandle* n_out,
                          DimensionHandle* s_out) {
  ShapeHandle phi, grad, state, scale;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 1, &phi));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &grad));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &state));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &scale));
  DimensionHandle p;
  if (!c->WithValue(c->Dim(phi, 0), cfg.num_params(), &p).ok()) {
    return errors::InvalidArgument("phi must have ", cfg.num_params(), " elements for ", ConfigString(cfg),
                                   ", got shape ", c->DebugString(phi));
  }
  if (!c->WithValue(c->Dim(state, 0), cfg.state_rows(), s_out).ok()) {
    return errors::InvalidArgument("state must have ", cfg.state_rows(), " rows for ", ConfigString(cfg),
                                   ", got shape ", c->DebugString(state));
  }
  if (!c->Merge(c->Dim(grad, 0), c->Dim(state, 1), n_out).ok()) {
    return errors::InvalidArgument("grad [N] and state [S, N] disagree on N: ", c->DebugString(grad), " vs ",
                                   c->DebugString(state));
  }
  return absl::OkStatus();
}

absl::Status StepShape(InferenceContext* c) {
  l2l::StepConfig cfg;
  TF_RETURN_IF_ERROR(GetStepConfig(c, &cfg));
  DimensionHandle n, s;
  TF_RETURN_IF_ERROR(CommonShapes(c, cfg, &n, &s));
  c->set_output(0, c->Vector(n));
  c->set_output(1, c->Matrix(s, n));
  return absl::OkStatus();
}

absl::Status StepGradShape(InferenceContext* c) {
  l2l::StepConfig cfg;
  TF_RETURN_IF_ERROR(GetStepConfig(c, &cfg));
  DimensionHandle n, s;
  TF_RETURN_IF_ERROR(CommonShapes(c, cfg, &n, &s));
  ShapeHandle du, dns;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 1, &du));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 2, &dns));
  if (!c->Merge(c->Dim(du, 0), n, &n).ok()) {
    return errors::InvalidArgument("d_update must have shape [N] like grad, got ", c->DebugString(du));
  }
  if (!c->Merge(c->Dim(dns, 0), s, &s).ok() || !c->Merge(c->Dim(dns, 1), n, &n).ok()) {
    return errors::InvalidArgument("d_new_state must have the shape [S, N] of state, got ", c->DebugString(dns));
  }
  c->set_output(0, c->Vector(cfg.num_params()));
  c->set_output(1, c->Vector(n));
  c->set_output(2, c->Matrix(s, n));
  return absl::OkStatus();
}

REGISTER_OP("L2lLstmStep")
    .Input("phi: float")
    .Input("grad: float")
    .Input("state: float")
    .Input("scale: float")
    .Output("update: float")
    .Output("new_state: float")
    .Attr("hidden1: int = 20")
    .Attr("hidden2: int = 20")
    .Attr("preprocess: string = 'none'")
    .Attr("preprocess_param: float = 10.0")
    .SetShapeFn(StepShape);

REGISTER_OP("L2lLstmStepGrad")
    .Input("phi: float")
    .Input("grad: float")
    .Input("state: float")
    .Input("scale: float")
    .Input("d_update: float")
    .Input("d_new_state: float")
    .Output("d_phi: float")
    .Output("d_grad: float")
    .Output("d_state: float")
    .Attr("hidden1: int = 20")
    .Attr("hidden2: int = 20")
    .Attr("preprocess: string = 'none'")
    .Attr("preprocess_param: float = 10.0")
    .SetShapeFn(StepGradShape);

// ---- run-time validation (shapes may be unknown at graph construction)
absl::Status ValidateInputs(const l2l::StepConfig& cfg, OpKernelContext* ctx, bool grad_op, int64_t* n_out,
                            float* scale_out, bool scale_on_host) {
  const Tensor& phi = ctx->input(0);
  const Tensor& grad = ctx->input(1);
  const Tensor& state = ctx->input(2);
  const Tensor& scale = ctx->input(3);
  if (!TensorShapeUtils::IsVector(phi.shape()) || phi.dim_size(0) != cfg.num_params()) {
    return errors::InvalidArgument("phi must have shape [", cfg.num_params(), "] for ", ConfigString(cfg),
                                   ", got ", phi.shape().DebugString());
  }
  if (!TensorShapeUtils::IsVector(grad.shape())) {
    return errors::InvalidArgument("grad must be a vector [N], got shape ", grad.shape().DebugString());
  }
  const int64_t n = grad.dim_size(0);
  if (!TensorShapeUtils::IsMatrix(state.shape()) || state.dim_size(0) != cfg.state_rows() ||
      state.dim_size(1) != n) {
    return errors::InvalidArgument("state must have shape [", cfg.state_rows(), ", ", n,
                                   "] (S = 2*(hidden1+hidden2), N = len(grad)), got ", state.shape().DebugString());
  }
  if (!TensorShapeUtils::IsScalar(scale.shape())) {
    return errors::InvalidArgument("scale must be a scalar, got shape ", scale.shape().DebugString());
  }
  if (scale_on_host) {
    const float s = scale.scalar<float>()();
    if (!std::isfinite(s)) return errors::InvalidArgument("scale must be finite, got ", s);
    *scale_out = s;
  }
  if (grad_op) {
    const Tensor& du = ctx->input(4);
    const Tensor& dns = ctx->input(5);
    if (!TensorShapeUtils::IsVector(du.shape()) || du.dim_size(0) != n) {
      return errors::InvalidArgument("d_update must have shape [", n, "], got ", du.shape().DebugString());
    }
    if (dns.shape() != state.shape()) {
      return errors::InvalidArgument("d_new_state must have shape ", state.shape().DebugString(), ", got ",
                                     dns.shape().DebugString());
    }
  }
  *n_out = n;
  return absl::OkStatus();
}

// ---- CPU
constexpr int64_t kUnit = 256;          // shard boundaries are multiples of the kernels' chunk
constexpr int64_t kMinUnitsPerShard = 16;

struct Sharding {
  int64_t n, units;
  int shards;
  int64_t begin(int s) const { return std::min(n, units * s / shards * kUnit); }
  int64_t end(int s) const { return std::min(n, units * (s + 1) / shards * kUnit); }
};

Sharding MakeSharding(OpKernelContext* ctx, int64_t n) {
  const auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  const int64_t units = (n + kUnit - 1) / kUnit;
  // A few shards per thread balance the load when other work shares the cores.
  const int64_t want = std::max<int64_t>(1, 4LL * std::max(1, workers->num_threads));
  const int shards = int(std::max<int64_t>(1, std::min(want, units / kMinUnitsPerShard)));
  return Sharding{n, units, shards};
}

template <class Fn>
void RunShards(OpKernelContext* ctx, const Sharding& sh, Fn fn) {
  if (sh.shards == 1) {
    fn(0);
    return;
  }
  const auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  // A cost per shard this large makes the pool run every shard as its own task.
  const int64_t cost_per_shard = 1LL << 40;
  workers->workers->ParallelFor(sh.shards, cost_per_shard, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) fn(int(s));
  });
}

class LstmStepCpuOp : public OpKernel {
 public:
  explicit LstmStepCpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) { OP_REQUIRES_OK(ctx, GetStepConfig(ctx, &cfg_)); }

  void Compute(OpKernelContext* ctx) override {
    int64_t n = 0;
    float scale = 0.0f;
    OP_REQUIRES_OK(ctx, ValidateInputs(cfg_, ctx, false, &n, &scale, true));
    const Tensor& grad = ctx->input(1);
    const Tensor& state = ctx->input(2);
    Tensor* update = nullptr;
    Tensor* new_state = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1}, 0, grad.shape(), &update));
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({2}, 1, state.shape(), &new_state));
    if (n == 0) return;
    const float* phi_p = ctx->input(0).flat<float>().data();
    const float* grad_p = grad.flat<float>().data();
    const float* state_p = state.flat<float>().data();
    float* up = update->flat<float>().data();
    float* ns = new_state->flat<float>().data();
    const Sharding sh = MakeSharding(ctx, n);
    RunShards(ctx, sh, [&](int s) {
      l2l::lstm_step_forward_cpu(cfg_, phi_p, grad_p, state_p, scale, n, sh.begin(s), sh.end(s), up, ns);
    });
  }

 private:
  l2l::StepConfig cfg_;
};

class LstmStepGradCpuOp : public OpKernel {
 public:
  explicit LstmStepGradCpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, GetStepConfig(ctx, &cfg_));
  }

  void Compute(OpKernelContext* ctx) override {
    int64_t n = 0;
    float scale = 0.0f;
    OP_REQUIRES_OK(ctx, ValidateInputs(cfg_, ctx, true, &n, &scale, true));
    const int64_t P = cfg_.num_params();
    Tensor* d_phi = nullptr;
    Tensor* d_grad = nullptr;
    Tensor* d_state = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({P}), &d_phi));
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({4}, 1, ctx->input(1).shape(), &d_grad));
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({5}, 2, ctx->input(2).shape(), &d_state));
    float* dphi_p = d_phi->flat<float>().data();
    std::fill(dphi_p, dphi_p + P, 0.0f);
    if (n == 0) return;
    const float* phi_p = ctx->input(0).flat<float>().data();
    const float* grad_p = ctx->input(1).flat<float>().data();
    const float* state_p = ctx->input(2).flat<float>().data();
    const float* du_p = ctx->input(4).flat<float>().data();
    const float* dns_p = ctx->input(5).flat<float>().data();
    float* dg_p = d_grad->flat<float>().data();
    float* ds_p = d_state->flat<float>().data();
    const Sharding sh = MakeSharding(ctx, n);
    // Shard 0 accumulates straight into d_phi; the others into their own buffers, added in order below.
    std::vector<float> partial(size_t(sh.shards - 1) * size_t(P), 0.0f);
    RunShards(ctx, sh, [&](int s) {
      float* buf = s == 0 ? dphi_p : partial.data() + size_t(s - 1) * P;
      l2l::lstm_step_backward_cpu(cfg_, phi_p, grad_p, state_p, scale, n, sh.begin(s), sh.end(s), du_p, dns_p, buf,
                                  dg_p, ds_p);
    });
    for (int s = 1; s < sh.shards; ++s) {
      const float* buf = partial.data() + size_t(s - 1) * P;
      for (int64_t i = 0; i < P; ++i) dphi_p[i] += buf[i];
    }
  }

 private:
  l2l::StepConfig cfg_;
};

REGISTER_KERNEL_BUILDER(Name("L2lLstmStep").Device(DEVICE_CPU), LstmStepCpuOp);
REGISTER_KERNEL_BUILDER(Name("L2lLstmStepGrad").Device(DEVICE_CPU), LstmStepGradCpuOp);

// ---- GPU
#if GOOGLE_CUDA
using tensorflow::DEVICE_GPU;

void* OpStream(OpKernelContext* ctx) {
  return reinterpret_cast<void*>(ctx->eigen_device<Eigen::GpuDevice>().stream());
}

class LstmStepGpuOp : public OpKernel {
 public:
  explicit LstmStepGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) { OP_REQUIRES_OK(ctx, GetStepConfig(ctx, &cfg_)); }

  void Compute(OpKernelContext* ctx) override {
    int64_t n = 0;
    float scale = 0.0f;
    OP_REQUIRES_OK(ctx, ValidateInputs(cfg_, ctx, false, &n, &scale, true));
    Tensor* update = nullptr;
    Tensor* new_state = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(1).shape(), &update));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(2).shape(), &new_state));
    if (n == 0) return;
    const l2l::GpuMath math =
        tsl::tensor_float_32_execution_enabled() ? l2l::GpuMath::kTF32 : l2l::GpuMath::kFP32;
    const char* err = l2l::lstm_step_forward_cuda(
        cfg_, math, ctx->input(0).flat<float>().data(), ctx->input(1).flat<float>().data(),
        ctx->input(2).flat<float>().data(), scale, n, update->flat<float>().data(), new_state->flat<float>().data(),
        OpStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("L2lLstmStep CUDA kernel: ", err ? err : ""));
  }

 private:
  l2l::StepConfig cfg_;
};

class LstmStepGradGpuOp : public OpKernel {
 public:
  explicit LstmStepGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, GetStepConfig(ctx, &cfg_));
  }

  void Compute(OpKernelContext* ctx) override {
    int64_t n = 0;
    float scale = 0.0f;
    OP_REQUIRES_OK(ctx, ValidateInputs(cfg_, ctx, true, &n, &scale, true));
    Tensor* d_phi = nullptr;
    Tensor* d_grad = nullptr;
    Tensor* d_state = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({cfg_.num_params()}), &d_phi));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(), &d_grad));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, ctx->input(2).shape(), &d_state));
    if (n == 0) {  // nothing to launch: d_phi is all zeros
      ctx->eigen_device<Eigen::GpuDevice>().memset(d_phi->flat<float>().data(), 0, sizeof(float) * cfg_.num_params());
      return;
    }
    // The kernel zeroes d_phi itself.
    const char* err = l2l::lstm_step_backward_cuda(
        cfg_, ctx->input(0).flat<float>().data(), ctx->input(1).flat<float>().data(),
        ctx->input(2).flat<float>().data(), scale, n, ctx->input(4).flat<float>().data(),
        ctx->input(5).flat<float>().data(), d_phi->flat<float>().data(), d_grad->flat<float>().data(),
        d_state->flat<float>().data(), OpStream(ctx));
    OP_REQUIRES(ctx, err == nullptr, errors::Internal("L2lLstmStepGrad CUDA kernel: ", err ? err : ""));
  }

 private:
  l2l::StepConfig cfg_;
};

REGISTER_KERNEL_BUILDER(Name("L2lLstmStep").Device(DEVICE_GPU).HostMemory("scale"), LstmStepGpuOp);
REGISTER_KERNEL_BUILDER(Name("L2lLstmStepGrad").Device(DEVICE_GPU).HostMemory("scale"), LstmStepGradGpuOp);
#endif  // GOOGLE_CUDA

}  // namespace l2l_tf
