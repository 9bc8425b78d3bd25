// The process group handle shared by the collectives (process_group.cpp) and the overlapped gradient sync
// (grad_sync.cpp).
#pragma once
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <chrono>
#include <string>

namespace ferrotune {
struct Group {
  c10::intrusive_ptr<c10d::Backend> pg;
  std::chrono::milliseconds timeout;
  // NCCL: the rank's CUDA device (collectives on host tensors are staged through it); Gloo: -1.
  int cuda_device;
};

// The calling thread's last error message (ft_pg_last_error).
std::string& last_error();
}  // namespace ferrotune
