// Dropout's masking in one pass each way: out = dropped ? 0 : x, and the same for the gradient.
//
// `x.masked_fill(dropped, 0)` copies `x` and then rewrites the copy where the mask is set (two passes over the
// data), and its backward does the same to the gradient. LoRA applies dropout to the input of every adapted
// layer, so on the CPU these passes were ~0.18 s of a 4 s training step (SmolLM2, all-linear). Here each
// direction reads the input and the 1-byte mask once and writes the output once; other devices and kinds fall
// back to masked_fill (same values). The mask is kept for the backward pass, as masked_fill keeps it.
//
// C ABI, called from services/core/src/kernels/dropout.rs.
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <exception>
#include <string>

void ft_set_last_error(const char* msg);

namespace {

at::Tensor zero_where(const at::Tensor& x, const at::Tensor& dropped) {
  if (!(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && dropped.is_contiguous() &&
        dropped.scalar_type() == at::kBool && dropped.numel() == x.numel())) {
    return x.masked_fill(dropped, 0);
  }
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const uint32_t* in = reinterpret_cast<const uint32_t*>(x.const_data_ptr<float>());
  const uint8_t* m = reinterpret_cast<const uint8_t*>(dropped.const_data_ptr<bool>());
  uint32_t* o = reinterpret_cast<uint32_t*>(out.data_ptr<float>());
  at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // m = 0 → all ones (keep the bits), m = 1 → zero (+0.0f, as masked_fill writes).
      o[i] = in[i] & (static_cast<uint32_t>(m[i]) - 1u);
    }
  });
  return out;
}

struct ZeroWhereBackward : public torch::autograd::Node {
  at::Tensor dropped;

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    torch::autograd::variable_list out(1);
    TORCH_CHECK(dropped.defined(), "ferrotune: backward through a dropout mask a second time");
    if (grads[0].defined() && should_compute_output(0)) {
      out[0] = zero_where(grads[0].contiguous(), dropped);
    }
    return out;
  }

  void release_variables() override { dropped.reset(); }

  std::string name() const override { return "ZeroWhereBackward"; }
};

}  // namespace

// `x` with zeros where `dropped` (bool, same shape) is set; differentiable in `x`.
extern "C" at::Tensor* ft_zero_where(at::Tensor* x, at::Tensor* dropped) {
  try {
    TORCH_CHECK(x->sizes() == dropped->sizes(), "dropout mask ", dropped->sizes(), " does not match input ", x->sizes());
    bool needs_grad = torch::autograd::compute_requires_grad(*x);
    at::Tensor y;
    {
      at::AutoGradMode off(false);
      y = zero_where(x->contiguous(), *dropped);
    }
    if (needs_grad) {
      auto node = std::shared_ptr<ZeroWhereBackward>(new ZeroWhereBackward(), torch::autograd::deleteNode);
      node->set_next_edges(torch::autograd::collect_next_edges(*x));
      node->dropped = *dropped;
      torch::autograd::set_history(y, node);
    }
    return new at::Tensor(std::move(y));
  } catch (const std::exception& e) {
    ft_set_last_error(e.what());
    return nullptr;
  }
}
