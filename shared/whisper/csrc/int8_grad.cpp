// Gradients through the frozen int8 linear layers, so that LoRA adapters below an int8 layer
// train. The int8 forward (dynamic activation quantisation, int8 GEMM, float outlier columns)
// runs in Rust without autograd; this Function passes its output through and, in backward,
// returns dL/dx = dL/dy @ (q * scale)^T, the gradient of the dequantised weight (as
// bitsandbytes' int8 matmul does). The weight itself gets no gradient: it is frozen.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdio>

namespace {

struct Int8LinearGrad : public torch::autograd::Function<Int8LinearGrad> {
  // x: [M, in] (the input that needs a gradient), y: [M, out] the int8 forward's output,
  // q_t: int8 [in, out], scale: f32 [out].
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& y, const at::Tensor& q_t,
                               const at::Tensor& scale) {
    ctx->save_for_backward({q_t, scale});
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    // An input returned as it is becomes a view of it with this node as its gradient
    // function: no copy of the activations (y was computed without autograd, nothing else
    // holds it for a gradient).
    return y;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    const auto& q_t = saved[0];
    const auto& scale = saved[1];
    auto dtype = static_cast<c10::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    // The scale goes into the weight ([in, out], the small side) rather than into the
    // gradient ([rows, out]): one pass over the weight instead of one over the activations.
    auto weight = q_t.to(at::kFloat).mul_(scale);
    auto grad_x = grad_outputs[0].to(at::kFloat).contiguous().matmul(weight.t()).to(dtype);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" at::Tensor* asr_int8_linear_grad(at::Tensor* x, at::Tensor* y, at::Tensor* q_t,
                                               at::Tensor* scale) {
  try {
    return new at::Tensor(Int8LinearGrad::apply(*x, *y, *q_t, *scale));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "asr_int8_linear_grad: %s\n", e.what());
    return nullptr;
  }
}
