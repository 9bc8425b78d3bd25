// c10d's ProcessGroupNCCL for data-parallel training on CUDA devices. Built as its own shared library
// (libferrotune_nccl.so, embedded in the binary and dlopen'ed only when a job asks for NCCL), because it links
// libtorch_cuda.so, whose CUDA libraries a CPU-only process should never have to load. It makes the backend on
// the store process_group.cpp created; everything else (collectives, the overlapped gradient buckets) goes
// through the c10d::Backend interface, as for Gloo.
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <c10/cuda/CUDAFunctions.h>

#include <chrono>
#include <cstring>
#include <string>

namespace {
void write_error(char* err, size_t len, const std::string& what) {
  if (len == 0) return;
  std::strncpy(err, what.c_str(), len - 1);
  err[len - 1] = '\0';
}
}  // namespace

// `store` is a c10::intrusive_ptr<c10d::Store>*; returns a released c10::intrusive_ptr<c10d::Backend> (the
// caller reclaims it) or null with `err` set. `device` is this rank's CUDA device index.
extern "C" void* ft_nccl_backend(void* store, int rank, int world, int device, long long timeout_ms, char* err,
                                 size_t err_len) {
  try {
    int n = c10::cuda::device_count();
    if (n == 0) {
      write_error(err, err_len, "NCCL needs CUDA devices, and this host has none (use the gloo backend)");
      return nullptr;
    }
    if (device < 0 || device >= n) {
      write_error(err, err_len, "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(n) + " visible)");
      return nullptr;
    }
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto& s = *static_cast<c10::intrusive_ptr<c10d::Store>*>(store);
    c10::intrusive_ptr<c10d::Backend> pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(s, rank, world, opts);
    return pg.release();
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return nullptr;
  }
}
