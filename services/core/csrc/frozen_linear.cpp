// A linear layer over a frozen weight whose backward pass recomputes the weight instead of keeping it.
//
// Autograd's matmul keeps its weight operand for the input gradient (dX = dY W). For QLoRA that operand is
// the dequantized copy of an NF4 weight, so every layer's dense weight stayed alive until the backward pass
// reached it: the whole base model in the compute dtype, on top of the 4-bit codes. This node keeps only an
// opaque handle owned by Rust (the NF4 codes, shared with the model) and asks Rust to dequantize again when
// the gradient arrives, as bitsandbytes' MatMul4Bit does. The weight gets no gradient (it is frozen), so
// nothing of the input is kept either.
//
// C ABI, called from services/core/src/kernels/frozen_linear.rs; tensors are tch's `at::Tensor*` handles.
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <ATen/ATen.h>

#include <exception>
#include <memory>
#include <string>

extern "C" {
// Returns a new tensor handle with the weight `[out, in]`, or null on failure.
typedef at::Tensor* (*ft_weight_fn)(void* state);
// Frees the state.
typedef void (*ft_drop_fn)(void* state);
}

// This thread's last failure of any ft_* function (csrc/dropout.cpp reports through it too).
static thread_local std::string last_error;

void ft_set_last_error(const char* msg) { last_error = msg; }

namespace {

struct FrozenLinearBackward : public torch::autograd::Node {
  std::shared_ptr<void> state;
  ft_weight_fn weight = nullptr;

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(1);
    TORCH_CHECK(state != nullptr, "ferrotune: backward through a frozen linear layer a second time");
    if (grads[0].defined() && should_compute_output(0)) {
      at::Tensor* w = weight(state.get());
      TORCH_CHECK(w != nullptr, "ferrotune: recomputing a frozen weight for the backward pass failed");
      at::Tensor dense = std::move(*w);
      delete w;
      out[0] = grads[0].mm(dense);
    }
    return out;
  }

  void release_variables() override { state.reset(); }

  std::string name() const override { return "FrozenLinearBackward"; }
};

}  // namespace

// y = x wᵀ for a 2-D `x` `[n, in]` and `w` `[out, in]`. When `x` requires a gradient (and grad mode is on),
// `y`'s backward node keeps `state` and calls `weight(state)` for the input gradient; otherwise `state` is
// dropped at once. `state` is always consumed (dropped with `drop`), also on failure.
extern "C" at::Tensor* ft_frozen_linear(at::Tensor* x, at::Tensor* w, void* state, ft_weight_fn weight, ft_drop_fn drop) {
  std::shared_ptr<void> keep(state, drop);
  try {
    bool needs_grad = torch::autograd::compute_requires_grad(*x);
    at::Tensor y;
    {
      at::AutoGradMode off(false);
      y = x->mm(w->t());
    }
    if (needs_grad) {
      auto node = std::shared_ptr<FrozenLinearBackward>(new FrozenLinearBackward(), torch::autograd::deleteNode);
      node->set_next_edges(torch::autograd::collect_next_edges(*x));
      node->state = std::move(keep);
      node->weight = weight;
      torch::autograd::set_history(y, node);
    }
    return new at::Tensor(std::move(y));
  } catch (const std::exception& e) {
    ft_set_last_error(e.what());
    return nullptr;
  }
}

// The message of this thread's last failure.
extern "C" const char* ft_last_error() { return last_error.c_str(); }
