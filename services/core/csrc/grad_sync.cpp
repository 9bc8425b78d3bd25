// Gradients summed over the ranks while the backward pass still runs (what DDP's Reducer does, on the same
// c10d all-reduce): the trainable parameters are grouped into buckets in reverse order (the order their
// gradients become ready); a post-accumulate-grad hook on each parameter counts it ready, and a bucket whose
// parameters are all ready is flattened and its all-reduce started at once — buckets always start in index
// order, so every rank issues the same collectives in the same order. `finish` starts the buckets the
// backward pass did not complete (parameters it never reached: their accumulated or zero gradients), waits
// for every all-reduce, and writes the sums into the gradients.
//
// Only the last micro-batch of a step is armed (the earlier ones just accumulate). A parameter whose gradient
// grows again after its bucket started (a weight reached twice in separate backward calls) makes that
// bucket's sum stale: the ranks agree on it with one more all-reduce of a flag, and then the caller sums the
// gradients again without overlap (`ft_gs_finish` returns 1) — the local gradients are untouched until then.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

#include <memory>
#include <mutex>
#include <vector>

#include "group.h"

namespace {
struct Sync {
  ferrotune::Group* group;
  std::vector<at::Tensor> params;
  std::vector<std::vector<size_t>> buckets;
  std::vector<size_t> bucket_of;
  std::vector<size_t> pending;
  std::vector<char> ready;
  std::vector<at::Tensor> flats;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  size_t next = 0;
  bool armed = false;
  bool stale = false;
  std::mutex mu;

  c10d::AllreduceOptions opts() const {
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = group->timeout;
    return o;
  }

  void launch(size_t b) {
    std::vector<at::Tensor> parts;
    for (size_t i : buckets[b]) {
      const auto& p = params[i];
      auto g = p.grad();
      parts.push_back(g.defined() ? g.detach().reshape({-1}) : at::zeros({p.numel()}, p.options()));
    }
    flats[b] = at::cat(parts);
    // NCCL sums tensors on the rank's CUDA device only (parameters a device map left elsewhere go through it).
    if (group->cuda_device >= 0) flats[b] = flats[b].to(at::Device(at::kCUDA, group->cuda_device));
    std::vector<at::Tensor> v{flats[b]};
    works[b] = group->pg->allreduce(v, opts());
  }

  void launch_ready() {
    while (next < buckets.size() && pending[next] == 0) {
      launch(next);
      ++next;
    }
  }

  void reset() {
    for (size_t b = 0; b < buckets.size(); ++b) {
      pending[b] = buckets[b].size();
      flats[b] = at::Tensor();
      works[b].reset();
    }
    std::fill(ready.begin(), ready.end(), 0);
    next = 0;
    armed = false;
    stale = false;
  }
};

struct Hook : torch::autograd::PostAccumulateGradHook {
  std::shared_ptr<Sync> s;
  size_t i;
  Hook(std::shared_ptr<Sync> s, size_t i) : s(std::move(s)), i(i) {}
  void operator()(const torch::autograd::Variable&) override {
    std::lock_guard<std::mutex> lock(s->mu);
    if (!s->armed) return;
    size_t b = s->bucket_of[i];
    if (s->ready[i]) {
      if (b < s->next) s->stale = true;
      return;
    }
    s->ready[i] = 1;
    --s->pending[b];
    s->launch_ready();
  }
};

struct Handle {
  std::shared_ptr<Sync> s;
};
}  // namespace

// Hooks `n` parameters (forward order) into buckets of at most `bucket_bytes` (the first, whose gradients are
// ready first, at most `first_bytes`), one dtype and device per bucket. Null on failure.
extern "C" void* ft_gs_new(void* g, at::Tensor** tensors, size_t n, long long bucket_bytes, long long first_bytes) {
  try {
    auto s = std::make_shared<Sync>();
    s->group = static_cast<ferrotune::Group*>(g);
    for (size_t i = 0; i < n; ++i) s->params.push_back(*tensors[i]);
    s->bucket_of.assign(n, 0);
    long long used = 0;
    for (size_t k = n; k-- > 0;) {
      const auto& p = s->params[k];
      long long bytes = static_cast<long long>(p.numel() * p.element_size());
      long long cap = s->buckets.size() <= 1 ? first_bytes : bucket_bytes;
      bool fresh = s->buckets.empty();
      if (!fresh) {
        const auto& q = s->params[s->buckets.back().front()];
        fresh = q.scalar_type() != p.scalar_type() || q.device() != p.device() ||
                (used > 0 && used + bytes > cap);
      }
      if (fresh) {
        s->buckets.emplace_back();
        used = 0;
      }
      s->buckets.back().push_back(k);
      s->bucket_of[k] = s->buckets.size() - 1;
      used += bytes;
    }
    size_t nb = s->buckets.size();
    s->pending.assign(nb, 0);
    s->flats.assign(nb, at::Tensor());
    s->works.assign(nb, c10::intrusive_ptr<c10d::Work>());
    s->ready.assign(n, 0);
    s->reset();
    for (size_t i = 0; i < n; ++i) {
      torch::autograd::impl::set_post_acc_grad_hooks(s->params[i], std::make_unique<Hook>(s, i));
    }
    return new Handle{s};
  } catch (const std::exception& e) {
    ferrotune::last_error() = e.what();
    return nullptr;
  }
}

extern "C" size_t ft_gs_buckets(void* h) { return static_cast<Handle*>(h)->s->buckets.size(); }

// The next backward pass starts buckets as their gradients become ready.
extern "C" void ft_gs_arm(void* h) {
  auto& s = *static_cast<Handle*>(h)->s;
  std::lock_guard<std::mutex> lock(s.mu);
  s.reset();
  s.armed = true;
}

// Starts what is left, waits, writes the sums into the gradients. 0: done; 1: a bucket was stale on some rank
// (gradients untouched: sum them without overlap); -1: error (ft_pg_last_error). `*launched_early` gets the
// buckets started during the backward pass.
extern "C" int ft_gs_finish(void* h, size_t* launched_early) {
  auto& s = *static_cast<Handle*>(h)->s;
  try {
    std::lock_guard<std::mutex> lock(s.mu);
    s.armed = false;
    *launched_early = s.next;
    while (s.next < s.buckets.size()) {
      s.launch(s.next);
      ++s.next;
    }
    for (auto& w : s.works) {
      if (w) w->wait(s.group->timeout);
    }
    auto flag = at::full({1}, s.stale ? 1.0 : 0.0, at::kFloat);
    if (s.group->cuda_device >= 0) flag = flag.to(at::Device(at::kCUDA, s.group->cuda_device));
    std::vector<at::Tensor> v{flag};
    s.group->pg->allreduce(v, s.opts())->wait(s.group->timeout);
    if (flag.item<float>() > 0) {
      s.reset();
      return 1;
    }
    at::NoGradGuard no_grad;
    for (size_t b = 0; b < s.buckets.size(); ++b) {
      int64_t off = 0;
      for (size_t i : s.buckets[b]) {
        auto& p = s.params[i];
        auto part = s.flats[b].narrow(0, off, p.numel()).view(p.sizes());
        off += p.numel();
        if (p.grad().defined()) {
          p.mutable_grad().copy_(part);
        } else {
          p.mutable_grad() = part.clone();
        }
      }
    }
    s.reset();
    return 0;
  } catch (const std::exception& e) {
    ferrotune::last_error() = e.what();
    s.reset();
    return -1;
  }
}

// Removes the hooks and frees the handle.
extern "C" void ft_gs_free(void* h) {
  auto* handle = static_cast<Handle*>(h);
  for (auto& p : handle->s->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  delete handle;
}
