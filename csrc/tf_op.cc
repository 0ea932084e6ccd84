// TensorFlow custom ops of the coordinatewise LSTM step (contract: lstm_step.h):
//
//   L2lLstmStep(phi [P], grad [N], state [S, N], scale []) -> (update [N], new_state [S, N])
//   L2lLstmStepGrad(phi, grad, state, scale, d_update [N], d_new_state [S, N]) -> (d_phi [P], d_grad [N],
//                                                                                  d_state [S, N])
//   L2lLstmStepMulti(phi, grads: N x [N_i], states: N x [S, N_i], scale) -> (updates: N x [N_i],
//                                                                           new_states: N x [S, N_i])
//   L2lLstmStepMultiGrad(phi, grads, states, scale, d_updates: N x [N_i], d_new_states: N x ([S, N_i] or [0]))
//       -> (d_phi [P], d_grads: N x [N_i], d_states: N x [S, N_i])
//   attrs: hidden1, hidden2 (int >= 1), preprocess in {"none", "paper", "clamped"}, preprocess_param (float; in
//   [0.001, 80] for "paper" and "clamped", see lstm_step.h), matmul_precision in {"float32", "bfloat16"} (the CPU
//   kernels' GEMMs on bf16-rounded inputs with float32 sums; StepConfig::bf16_matmul; the GPU kernels reject it);
//   the Multi ops also N (>= 1).
// The Multi ops step all of a rule's tensors in one call (one optimizer step): one launch, one split of all their
// chunks over the threads, small tensors riding along with the big ones. In the Multi gradient a d_new_states
// entry of shape [0] stands for zeros (a state not used further, e.g. after the last step of an unroll), so no
// [S, N_i] zero tensor is made and read.
//
// float32 only. Every malformed input is an InvalidArgument error (shape functions at graph construction, the
// kernels again at run time for shapes unknown until then), never a crash. The Python wrapper (l2l_tf/ops) checks
// the same things first, with the messages the pure-TF reference gives. Non-finite gradients as in lstm_step.h:
// +-inf act as +-FLT_MAX (d_grad 0 there), NaN propagates to the coordinate's update and state.
//
// CPU kernels: the work is split into shards of whole 256-coordinate chunks (l2l::plan_shards: guided
// self-scheduling, shards shrinking towards the end) that the threads of TF's intra-op pool take in order. The
// backward gives each shard its own d_phi buffer and sums them in shard order, so the result is deterministic for a
// given thread-pool size. The forward reuses the state (and grad) buffers for its outputs when TF lets it (the CPU
// kernel reads every element before writing it), so a state that is not needed afterwards is updated in place; the
// backward likewise reuses d_new_state and d_update.
//
// GPU kernels (compiled with -DGOOGLE_CUDA=1): call the entry points of lstm_step_cuda.h on the op's stream.
// The forward uses the TF32 path when TensorFlow allows TF32 execution
// (tf.config.experimental.enable_tensor_float_32_execution, on by default), else exact FP32. `scale` lives in
// host memory.
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
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
  std::string precision;
  TF_RETURN_IF_ERROR(c->GetAttr("matmul_precision", &precision));
  if (precision != "float32" && precision != "bfloat16") {
    return errors::InvalidArgument("matmul_precision must be 'float32' or 'bfloat16', got '", precision, "'");
  }
  cfg->bf16_matmul = precision == "bfloat16";
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

// Input and output positions. The single-tensor ops are the Multi layout with N = 1: phi 0, grads 1..N, states
// N+1..2N, scale 2N+1, d_updates 2N+2..3N+1, d_new_states 3N+2..4N+1; outputs updates 0..N-1 and new_states
// N..2N-1 (forward), d_phi 0, d_grads 1..N and d_states N+1..2N (gradient). The Multi ops also have the saved
// activations: forward outputs 2N..3N-1, gradient inputs 4N+2..5N+1.
struct OpLayout {
  int N = 1;
  bool multi = false;  // names tensors in messages, accepts the [0] stand-in for a zero d_new_state, has activations
  int grad(int i) const { return 1 + i; }
  int state(int i) const { return 1 + N + i; }
  int scale() const { return 2 * N + 1; }
  int d_update(int i) const { return 2 * N + 2 + i; }
  int d_new_state(int i) const { return 3 * N + 2 + i; }
  int activations_out(int i) const { return 2 * N + i; }
  int activations_in(int i) const { return 4 * N + 2 + i; }
  std::string which(int i) const { return multi ? " " + std::to_string(i) : ""; }
};

template <class Context>
absl::Status GetLayout(Context* ctx, bool multi, OpLayout* layout) {
  int64_t count = 1;
  if (multi) TF_RETURN_IF_ERROR(ctx->GetAttr("N", &count));
  *layout = OpLayout{int(count), multi};
  return absl::OkStatus();
}

// ---- shape functions
absl::Status PhiScaleShapes(InferenceContext* c, const l2l::StepConfig& cfg, int phi_index, int scale_index) {
  ShapeHandle phi, scale;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(phi_index), 1, &phi));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(scale_index), 0, &scale));
  DimensionHandle p;
  if (!c->WithValue(c->Dim(phi, 0), cfg.num_params(), &p).ok()) {
    return errors::InvalidArgument("phi must have ", cfg.num_params(), " elements for ", ConfigString(cfg),
                                   ", got shape ", c->DebugString(phi));
  }
  return absl::OkStatus();
}

// grad [N] and state [S, N] at these input indices; `which` names the tensor in messages ("" or " i").
absl::Status TensorShapes(InferenceContext* c, const l2l::StepConfig& cfg, int grad_index, int state_index,
                          const std::string& which, DimensionHandle* n_out, DimensionHandle* s_out) {
  ShapeHandle grad, state;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(grad_index), 1, &grad));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(state_index), 2, &state));
  if (!c->WithValue(c->Dim(state, 0), cfg.state_rows(), s_out).ok()) {
    return errors::InvalidArgument("state", which, " must have ", cfg.state_rows(), " rows for ", ConfigString(cfg),
                                   ", got shape ", c->DebugString(state));
  }
  if (!c->Merge(c->Dim(grad, 0), c->Dim(state, 1), n_out).ok()) {
    return errors::InvalidArgument("grad", which, " [N] and state", which, " [S, N] disagree on N: ",
                                   c->DebugString(grad), " vs ", c->DebugString(state));
  }
  return absl::OkStatus();
}

// Upstream gradients of one tensor: d_update [N], d_new_state [S, N] (or [0] where `empty_dns_ok`).
absl::Status UpstreamShapes(InferenceContext* c, int du_index, int dns_index, const std::string& which,
                            bool empty_dns_ok, DimensionHandle* n, DimensionHandle* s) {
  ShapeHandle du, dns;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(du_index), 1, &du));
  if (!c->Merge(c->Dim(du, 0), *n, n).ok()) {
    return errors::InvalidArgument("d_update", which, " must have shape [N] like grad", which, ", got ",
                                   c->DebugString(du));
  }
  if (empty_dns_ok && c->Rank(c->input(dns_index)) == 1) {
    DimensionHandle zero;
    if (!c->WithValue(c->Dim(c->input(dns_index), 0), 0, &zero).ok()) {
      return errors::InvalidArgument("d_new_state", which, " must have shape [S, N] or [0], got ",
                                     c->DebugString(c->input(dns_index)));
    }
    return absl::OkStatus();
  }
  TF_RETURN_IF_ERROR(c->WithRank(c->input(dns_index), 2, &dns));
  if (!c->Merge(c->Dim(dns, 0), *s, s).ok() || !c->Merge(c->Dim(dns, 1), *n, n).ok()) {
    return errors::InvalidArgument("d_new_state", which, " must have the shape [S, N] of state", which, ", got ",
                                   c->DebugString(dns));
  }
  return absl::OkStatus();
}

template <bool kMulti>
absl::Status StepShape(InferenceContext* c) {
  l2l::StepConfig cfg;
  TF_RETURN_IF_ERROR(GetStepConfig(c, &cfg));
  OpLayout L;
  TF_RETURN_IF_ERROR(GetLayout(c, kMulti, &L));
  TF_RETURN_IF_ERROR(PhiScaleShapes(c, cfg, 0, L.scale()));
  for (int i = 0; i < L.N; ++i) {
    DimensionHandle n, s;
    TF_RETURN_IF_ERROR(TensorShapes(c, cfg, L.grad(i), L.state(i), L.which(i), &n, &s));
    c->set_output(i, c->Vector(n));
    c->set_output(L.N + i, c->Matrix(s, n));
    // [4 (H1 + H2), N] where the kernel saves them (CPU, save_activations), else [0, N].
    if (L.multi) c->set_output(L.activations_out(i), c->Matrix(c->UnknownDim(), n));
  }
  return absl::OkStatus();
}

template <bool kMulti>
absl::Status StepGradShape(InferenceContext* c) {
  l2l::StepConfig cfg;
  TF_RETURN_IF_ERROR(GetStepConfig(c, &cfg));
  OpLayout L;
  TF_RETURN_IF_ERROR(GetLayout(c, kMulti, &L));
  TF_RETURN_IF_ERROR(PhiScaleShapes(c, cfg, 0, L.scale()));
  bool input_gradients = true;
  if (kMulti) TF_RETURN_IF_ERROR(c->GetAttr("input_gradients", &input_gradients));
  c->set_output(0, c->Vector(cfg.num_params()));
  for (int i = 0; i < L.N; ++i) {
    DimensionHandle n, s;
    TF_RETURN_IF_ERROR(TensorShapes(c, cfg, L.grad(i), L.state(i), L.which(i), &n, &s));
    TF_RETURN_IF_ERROR(UpstreamShapes(c, L.d_update(i), L.d_new_state(i), L.which(i), L.multi, &n, &s));
    if (L.multi) {
      ShapeHandle act;
      DimensionHandle act_n;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(L.activations_in(i)), 2, &act));
      if (!c->Merge(c->Dim(act, 1), n, &act_n).ok()) {
        return errors::InvalidArgument("activations", L.which(i), " must have shape [", cfg.activation_rows(),
                                       ", N] or [0, N] like grad", L.which(i), ", got ", c->DebugString(act));
      }
    }
    c->set_output(1 + i, input_gradients ? c->Vector(n) : c->Vector(0));
    c->set_output(1 + L.N + i, c->Matrix(s, n));
  }
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
    .Attr("matmul_precision: string = 'float32'")
    .SetShapeFn(StepShape<false>);

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
    .Attr("matmul_precision: string = 'float32'")
    .SetShapeFn(StepGradShape<false>);

REGISTER_OP("L2lLstmStepMulti")
    .Input("phi: float")
    .Input("grads: N * float")
    .Input("states: N * float")
    .Input("scale: float")
    .Output("updates: N * float")
    .Output("new_states: N * float")
    .Output("activations: N * float")
    .Attr("N: int >= 1")
    .Attr("save_activations: bool = false")
    .Attr("hidden1: int = 20")
    .Attr("hidden2: int = 20")
    .Attr("preprocess: string = 'none'")
    .Attr("preprocess_param: float = 10.0")
    .Attr("matmul_precision: string = 'float32'")
    .SetShapeFn(StepShape<true>);

// input_gradients = false: the d_grads are not wanted (the grads came through a stop-gradient; l2l_tf/ops/fused.py
// decides): they are empty [0] outputs and the kernels skip computing them.
REGISTER_OP("L2lLstmStepMultiGrad")
    .Input("phi: float")
    .Input("grads: N * float")
    .Input("states: N * float")
    .Input("scale: float")
    .Input("d_updates: N * float")
    .Input("d_new_states: N * float")
    .Input("activations: N * float")
    .Output("d_phi: float")
    .Output("d_grads: N * float")
    .Output("d_states: N * float")
    .Attr("N: int >= 1")
    .Attr("input_gradients: bool = true")
    .Attr("hidden1: int = 20")
    .Attr("hidden2: int = 20")
    .Attr("preprocess: string = 'none'")
    .Attr("preprocess_param: float = 10.0")
    .Attr("matmul_precision: string = 'float32'")
    .SetShapeFn(StepGradShape<true>);

// ---- run-time validation (shapes may be unknown at graph construction)
absl::Status ValidatePhiScale(const l2l::StepConfig& cfg, const Tensor& phi, const Tensor& scale, bool scale_on_host,
                              float* scale_out) {
  if (!TensorShapeUtils::IsVector(phi.shape()) || phi.dim_size(0) != cfg.num_params()) {
    return errors::InvalidArgument("phi must have shape [", cfg.num_params(), "] for ", ConfigString(cfg),
                                   ", got ", phi.shape().DebugString());
  }
  if (!TensorShapeUtils::IsScalar(scale.shape())) {
    return errors::InvalidArgument("scale must be a scalar, got shape ", scale.shape().DebugString());
  }
  if (scale_on_host) {
    const float s = scale.scalar<float>()();
    if (!std::isfinite(s)) return errors::InvalidArgument("scale must be finite, got ", s);
    *scale_out = s;
  }
  return absl::OkStatus();
}

// One tensor's grad [N] and state [S, N], and (gradient ops) d_update [N] and d_new_state [S, N] (or [0] where
// `empty_dns_ok`: zeros). `which` names the tensor in messages ("" or " i").
absl::Status ValidateTensor(const l2l::StepConfig& cfg, const Tensor& grad, const Tensor& state, const Tensor* du,
                            const Tensor* dns, bool empty_dns_ok, const std::string& which) {
  if (!TensorShapeUtils::IsVector(grad.shape())) {
    return errors::InvalidArgument("grad", which, " must be a vector [N], got shape ", grad.shape().DebugString());
  }
  const int64_t n = grad.dim_size(0);
  if (!TensorShapeUtils::IsMatrix(state.shape()) || state.dim_size(0) != cfg.state_rows() ||
      state.dim_size(1) != n) {
    return errors::InvalidArgument("state", which, " must have shape [", cfg.state_rows(), ", ", n,
                                   "] (S = 2*(hidden1+hidden2), N = len(grad)), got ", state.shape().DebugString());
  }
  if (du && (!TensorShapeUtils::IsVector(du->shape()) || du->dim_size(0) != n)) {
    return errors::InvalidArgument("d_update", which, " must have shape [", n, "], got ", du->shape().DebugString());
  }
  if (dns && dns->shape() != state.shape() &&
      !(empty_dns_ok && dns->dims() == 1 && dns->dim_size(0) == 0)) {
    return errors::InvalidArgument("d_new_state", which, " must have shape ", state.shape().DebugString(),
                                   empty_dns_ok ? " or [0]" : "", ", got ", dns->shape().DebugString());
  }
  return absl::OkStatus();
}

// Validates the forward's inputs, allocates its outputs (reusing the grad and state buffers where TF allows and
// `reuse_inputs`: the CPU kernels read every element before writing it) and describes the non-empty tensors.
// `save_activations` (Multi ops): the activations outputs are [A, N] and written, else [0, N].
absl::Status PrepareForward(OpKernelContext* ctx, const l2l::StepConfig& cfg, const OpLayout& L, bool reuse_inputs,
                            bool save_activations, float* scale, std::vector<l2l::TensorArgs>* tensors) {
  TF_RETURN_IF_ERROR(ValidatePhiScale(cfg, ctx->input(0), ctx->input(L.scale()), true, scale));
  for (int i = 0; i < L.N; ++i) {
    const Tensor& grad = ctx->input(L.grad(i));
    const Tensor& state = ctx->input(L.state(i));
    TF_RETURN_IF_ERROR(ValidateTensor(cfg, grad, state, nullptr, nullptr, false, L.which(i)));
    Tensor* update = nullptr;
    Tensor* new_state = nullptr;
    if (reuse_inputs) {
      TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({L.grad(i)}, i, grad.shape(), &update));
      TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({L.state(i)}, L.N + i, state.shape(), &new_state));
    } else {
      TF_RETURN_IF_ERROR(ctx->allocate_output(i, grad.shape(), &update));
      TF_RETURN_IF_ERROR(ctx->allocate_output(L.N + i, state.shape(), &new_state));
    }
    Tensor* act = nullptr;
    if (L.multi) {
      const int64_t rows = save_activations ? cfg.activation_rows() : 0;
      TF_RETURN_IF_ERROR(ctx->allocate_output(L.activations_out(i), TensorShape({rows, grad.dim_size(0)}), &act));
    }
    if (grad.dim_size(0) == 0) continue;
    l2l::TensorArgs t;
    t.grad = grad.flat<float>().data();
    t.state = state.flat<float>().data();
    t.n = grad.dim_size(0);
    t.update = update->flat<float>().data();
    t.new_state = new_state->flat<float>().data();
    if (act && save_activations) t.activations_out = act->flat<float>().data();
    tensors->push_back(t);
  }
  return absl::OkStatus();
}

// The same for the gradient ops (d_grad may reuse d_update's buffer, d_state d_new_state's); d_phi is allocated,
// not written. Without `input_gradients` the d_grad outputs are empty [0] tensors and TensorArgs::d_grad is null.
absl::Status PrepareBackward(OpKernelContext* ctx, const l2l::StepConfig& cfg, const OpLayout& L, bool reuse_inputs,
                             bool input_gradients, float* scale, std::vector<l2l::TensorArgs>* tensors,
                             Tensor** d_phi) {
  TF_RETURN_IF_ERROR(ValidatePhiScale(cfg, ctx->input(0), ctx->input(L.scale()), true, scale));
  TF_RETURN_IF_ERROR(ctx->allocate_output(0, TensorShape({cfg.num_params()}), d_phi));
  for (int i = 0; i < L.N; ++i) {
    const Tensor& grad = ctx->input(L.grad(i));
    const Tensor& state = ctx->input(L.state(i));
    const Tensor& du = ctx->input(L.d_update(i));
    const Tensor& dns = ctx->input(L.d_new_state(i));
    TF_RETURN_IF_ERROR(ValidateTensor(cfg, grad, state, &du, &dns, L.multi, L.which(i)));
    const bool zero_dns = dns.shape() != state.shape();  // the [0] stand-in for zeros
    const float* saved = nullptr;  // the forward's activations, else recomputed
    if (L.multi) {
      const Tensor& act = ctx->input(L.activations_in(i));
      const int64_t n = grad.dim_size(0);
      if (!TensorShapeUtils::IsMatrix(act.shape()) || act.dim_size(1) != n ||
          (act.dim_size(0) != cfg.activation_rows() && act.dim_size(0) != 0)) {
        return errors::InvalidArgument("activations", L.which(i), " must have shape [", cfg.activation_rows(), ", ",
                                       n, "] (saved by the forward) or [0, ", n, "], got ",
                                       act.shape().DebugString());
      }
      if (act.dim_size(0) != 0 && n > 0) saved = act.flat<float>().data();
    }
    Tensor* d_grad = nullptr;
    Tensor* d_state = nullptr;
    if (!input_gradients) {
      TF_RETURN_IF_ERROR(ctx->allocate_output(1 + i, TensorShape({0}), &d_grad));
    } else if (reuse_inputs) {
      TF_RETURN_IF_ERROR(ctx->forward_input_or_allocate_output({L.d_update(i)}, 1 + i, grad.shape(), &d_grad));
    } else {
      TF_RETURN_IF_ERROR(ctx->allocate_output(1 + i, grad.shape(), &d_grad));
    }
    if (reuse_inputs && !zero_dns) {
      TF_RETURN_IF_ERROR(
          ctx->forward_input_or_allocate_output({L.d_new_state(i)}, 1 + L.N + i, state.shape(), &d_state));
    } else {
      TF_RETURN_IF_ERROR(ctx->allocate_output(1 + L.N + i, state.shape(), &d_state));
    }
    if (grad.dim_size(0) == 0) continue;
    l2l::TensorArgs t;
    t.grad = grad.flat<float>().data();
    t.state = state.flat<float>().data();
    t.n = grad.dim_size(0);
    t.d_update = du.flat<float>().data();
    t.d_new_state = zero_dns ? nullptr : dns.flat<float>().data();
    t.d_grad = input_gradients ? d_grad->flat<float>().data() : nullptr;
    t.d_state = d_state->flat<float>().data();
    t.activations = saved;
    tensors->push_back(t);
  }
  return absl::OkStatus();
}

// ---- CPU
// Runs fn(0), ..., fn(shards - 1) on TF's intra-op pool: one task per pool thread (at most one per shard), each
// taking the next shard in order from a shared counter, as plan_shards' guided sizes expect (ParallelFor splits its
// range recursively, so its tasks would not take the shards in order). The calling thread waits; it also takes
// shards when it is itself a pool thread, so that the op cannot wait on a pool whose threads are all waiting. A task
// that starts after every shard was taken only touches the state it shares.
template <class Fn>
void RunShards(OpKernelContext* ctx, int shards, Fn fn) {
  if (shards == 1) {
    fn(0);
    return;
  }
  struct Shared {
    std::function<void(int)> fn;
    int shards = 0;
    std::atomic<int> next{0};
    std::mutex mu;
    int finished = 0;  // guarded by mu
    std::condition_variable done;
    void Drain() {
      int ran = 0;
      for (int s; (s = next.fetch_add(1)) < shards; ++ran) fn(s);
      if (ran == 0) return;
      std::lock_guard<std::mutex> lock(mu);
      if ((finished += ran) == shards) done.notify_all();
    }
  };
  auto shared = std::make_shared<Shared>();
  shared->fn = fn;  // fn's references outlive every shard: this call returns only when all have run
  shared->shards = shards;
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  const int tasks = std::min(shards, std::max(1, pool->NumThreads()));
  for (int t = 0; t < tasks; ++t) pool->Schedule([shared] { shared->Drain(); });
  if (pool->CurrentThreadId() >= 0) shared->Drain();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->done.wait(lock, [&] { return shared->finished == shards; });
}

std::vector<std::vector<l2l::Slice>> PlanShards(OpKernelContext* ctx, const std::vector<l2l::TensorArgs>& tensors) {
  std::vector<int64_t> sizes;
  for (const auto& t : tensors) sizes.push_back(t.n);
  const int threads = std::max(1, ctx->device()->tensorflow_cpu_worker_threads()->num_threads);
  return l2l::plan_shards(sizes.data(), int(sizes.size()), threads);
}

void ForwardCpu(OpKernelContext* ctx, const l2l::StepConfig& cfg, const float* phi, float scale,
                const std::vector<l2l::TensorArgs>& tensors) {
  const auto shards = PlanShards(ctx, tensors);
  RunShards(ctx, int(shards.size()), [&](int s) {
    l2l::lstm_step_forward_cpu_slices(cfg, phi, scale, tensors.data(), shards[s].data(), int(shards[s].size()));
  });
}

// d_phi (num_params floats) is written: shard 0 accumulates into it (zeroed here), the others into their own
// buffers, added in shard order (deterministic for a given thread-pool size).
void BackwardCpu(OpKernelContext* ctx, const l2l::StepConfig& cfg, const float* phi, float scale,
                 const std::vector<l2l::TensorArgs>& tensors, float* d_phi) {
  const int64_t P = cfg.num_params();
  std::fill(d_phi, d_phi + P, 0.0f);
  const auto shards = PlanShards(ctx, tensors);
  if (shards.empty()) return;
  std::vector<float> partial(size_t(shards.size() - 1) * size_t(P), 0.0f);
  RunShards(ctx, int(shards.size()), [&](int s) {
    float* buf = s == 0 ? d_phi : partial.data() + size_t(s - 1) * P;
    l2l::lstm_step_backward_cpu_slices(cfg, phi, scale, tensors.data(), shards[s].data(), int(shards[s].size()), buf);
  });
  for (size_t s = 1; s < shards.size(); ++s) {
    const float* buf = partial.data() + (s - 1) * P;
    for (int64_t i = 0; i < P; ++i) d_phi[i] += buf[i];
  }
}

// kMulti: L2lLstmStepMulti (N tensors), else L2lLstmStep (one).
template <bool kMulti>
class LstmStepCpuOp : public OpKernel {
 public:
  explicit LstmStepCpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, GetStepConfig(ctx, &cfg_));
    OP_REQUIRES_OK(ctx, GetLayout(ctx, kMulti, &layout_));
    if (kMulti) OP_REQUIRES_OK(ctx, ctx->GetAttr("save_activations", &save_activations_));
  }

  void Compute(OpKernelContext* ctx) override {
    float scale = 0.0f;
    std::vector<l2l::TensorArgs> tensors;
    OP_REQUIRES_OK(ctx, PrepareForward(ctx, cfg_, layout_, /*reuse_inputs=*/true, save_activations_, &scale,
                                       &tensors));
    if (!tensors.empty()) ForwardCpu(ctx, cfg_, ctx->input(0).flat<float>().data(), scale, tensors);
  }

 private:
  l2l::StepConfig cfg_;
  OpLayout layout_;
  bool save_activations_ = false;
};

template <bool kMulti>
class LstmStepGradCpuOp : public OpKernel {
 public:
  explicit LstmStepGradCpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, GetStepConfig(ctx, &cfg_));
    OP_REQUIRES_OK(ctx, GetLayout(ctx, kMulti, &layout_));
    if (kMulti) OP_REQUIRES_OK(ctx, ctx->GetAttr("input_gradients", &input_gradients_));
  }

  void Compute(OpKernelContext* ctx) override {
    float scale = 0.0f;
    std::vector<l2l::TensorArgs> tensors;
    Tensor* d_phi = nullptr;
    OP_REQUIRES_OK(ctx, PrepareBackward(ctx, cfg_, layout_, /*reuse_inputs=*/true, input_gradients_, &scale,
                                        &tensors, &d_phi));
    BackwardCpu(ctx, cfg_, ctx->input(0).flat<float>().data(), scale, tensors, d_phi->flat<float>().data());
  }

 private:
  l2l::StepConfig cfg_;
  OpLayout layout_;
  bool input_gradients_ = true;  // Multi: the d_grads are wanted (else [0] outputs, not computed)
};

REGISTER_KERNEL_BUILDER(Name("L2lLstmStep").Device(DEVICE_CPU), LstmStepCpuOp<false>);
REGISTER_KERNEL_BUILDER(Name("L2lLstmStepGrad").Device(DEVICE_CPU), LstmStepGradCpuOp<false>);
REGISTER_KERNEL_BUILDER(Name("L2lLstmStepMulti").Device(DEVICE_CPU), LstmStepCpuOp<true>);
REGISTER_KERNEL_BUILDER(Name("L2lLstmStepMultiGrad").Device(DEVICE_CPU), LstmStepGradCpuOp<true>);

// ---- GPU
#if GOOGLE_CUDA
using tensorflow::DEVICE_GPU;

void* OpStream(OpKernelContext* ctx) {
  return reinterpret_cast<void*>(ctx->eigen_device<Eigen::GpuDevice>().stream());
}

// The GPU kernels have no bfloat16 GEMMs (their forward has TF32).
absl::Status CpuOnlyPrecision(const l2l::StepConfig& cfg) {
  if (!cfg.bf16_matmul) return absl::OkStatus();
  return errors::InvalidArgument("matmul_precision='bfloat16' is implemented by the CPU kernels only (the GPU forward "
                                 "uses TF32 where TensorFlow allows it); place the op on the CPU");
}

// One kernel launch per tensor (a launch costs microseconds there); with several tensors their d_phi are added on the
// op's stream. Outputs are never the inputs' buffers.
template <bool kMulti>
class LstmStepGpuOp : public OpKernel {
 public:
  explicit LstmStepGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, GetStepConfig(ctx, &cfg_));
    OP_REQUIRES_OK(ctx, CpuOnlyPrecision(cfg_));
    OP_REQUIRES_OK(ctx, GetLayout(ctx, kMulti, &layout_));
  }

  void Compute(OpKernelContext* ctx) override {
    float scale = 0.0f;
    std::vector<l2l::TensorArgs> tensors;
    // The CUDA backward recomputes the activations: none are saved here ([0, N] outputs).
    OP_REQUIRES_OK(ctx, PrepareForward(ctx, cfg_, layout_, /*reuse_inputs=*/false, /*save_activations=*/false, &scale,
                                       &tensors));
    const l2l::GpuMath math =
        tsl::tensor_float_32_execution_enabled() ? l2l::GpuMath::kTF32 : l2l::GpuMath::kFP32;
    for (const l2l::TensorArgs& t : tensors) {
      const char* err = l2l::lstm_step_forward_cuda(cfg_, math, ctx->input(0).flat<float>().data(), t.grad, t.state,
                                                    scale, t.n, t.update, t.new_state, OpStream(ctx));
      OP_REQUIRES(ctx, err == nullptr, errors::Internal(type_string(), " CUDA kernel: ", err ? err : ""));
    }
  }

 private:
  l2l::StepConfig cfg_;
  OpLayout layout_;
};

template <bool kMulti>
class LstmStepGradGpuOp : public OpKernel {
 public:
  explicit LstmStepGradGpuOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, GetStepConfig(ctx, &cfg_));
    OP_REQUIRES_OK(ctx, CpuOnlyPrecision(cfg_));
    OP_REQUIRES_OK(ctx, GetLayout(ctx, kMulti, &layout_));
    if (kMulti) OP_REQUIRES_OK(ctx, ctx->GetAttr("input_gradients", &input_gradients_));
  }

  void Compute(OpKernelContext* ctx) override {
    const int64_t P = cfg_.num_params();
    float scale = 0.0f;
    std::vector<l2l::TensorArgs> tensors;
    Tensor* d_phi = nullptr;
    OP_REQUIRES_OK(ctx, PrepareBackward(ctx, cfg_, layout_, /*reuse_inputs=*/false, input_gradients_, &scale,
                                        &tensors, &d_phi));
    float* d_phi_p = d_phi->flat<float>().data();
    if (tensors.empty()) {  // nothing to launch: d_phi is all zeros
      ctx->eigen_device<Eigen::GpuDevice>().memset(d_phi_p, 0, sizeof(float) * P);
      return;
    }
    // The kernel overwrites its d_phi: the first tensor writes d_phi, the others a temporary added to it.
    Tensor part;
    if (tensors.size() > 1) {
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({P}), &part));
    }
    for (size_t i = 0; i < tensors.size(); ++i) {
      const l2l::TensorArgs& t = tensors[i];
      float* out = i == 0 ? d_phi_p : part.flat<float>().data();
      // The CUDA backward always writes d_grad: where none is wanted, into a temporary.
      Tensor unwanted;
      float* d_grad = t.d_grad;
      if (d_grad == nullptr) {
        OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({t.n}), &unwanted));
        d_grad = unwanted.flat<float>().data();
      }
      const char* err = l2l::lstm_step_backward_cuda(cfg_, ctx->input(0).flat<float>().data(), t.grad, t.state,
                                                     scale, t.n, t.d_update, t.d_new_state, out, d_grad, t.d_state,
                                                     OpStream(ctx));
      if (err == nullptr && i > 0) err = l2l::add_inplace_cuda(d_phi_p, out, P, OpStream(ctx));
      OP_REQUIRES(ctx, err == nullptr, errors::Internal(type_string(), " CUDA kernel: ", err ? err : ""));
    }
  }

 private:
  l2l::StepConfig cfg_;
  OpLayout layout_;
  bool input_gradients_ = true;
};

REGISTER_KERNEL_BUILDER(Name("L2lLstmStep").Device(DEVICE_GPU).HostMemory("scale"), LstmStepGpuOp<false>);
REGISTER_KERNEL_BUILDER(Name("L2lLstmStepGrad").Device(DEVICE_GPU).HostMemory("scale"), LstmStepGradGpuOp<false>);
REGISTER_KERNEL_BUILDER(Name("L2lLstmStepMulti").Device(DEVICE_GPU).HostMemory("scale"), LstmStepGpuOp<true>);
REGISTER_KERNEL_BUILDER(Name("L2lLstmStepMultiGrad").Device(DEVICE_GPU).HostMemory("scale"),
                        LstmStepGradGpuOp<true>);
#endif  // GOOGLE_CUDA

}  // namespace l2l_tf
