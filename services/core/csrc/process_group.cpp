// Data-parallel collectives on libtorch's own c10d: a TCPStore rendezvous (torchrun's MASTER_ADDR /
// MASTER_PORT) and a ProcessGroupGloo whose all-reduce sums tensors across ranks. Everything runs in
// libtorch_cpu.so (which bundles and exports gloo); see csrc/gloo/README.md for the headers.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <string>

#include "group.h"

using ferrotune::Group;

std::string& ferrotune::last_error() {
  static thread_local std::string e;
  return e;
}

namespace {
bool loopback(const std::string& host) { return host == "127.0.0.1" || host == "localhost" || host == "::1"; }
}  // namespace

extern "C" const char* ft_pg_last_error() { return ferrotune::last_error().c_str(); }

using NcclBackendFn = void* (*)(void* store, int rank, int world, int device, long long timeout_ms, char* err,
                                size_t err_len);

// Joins the group: rank 0 hosts the store on master_addr:port; every rank waits up to timeout_ms for the
// others. The backend is Gloo, or NCCL on CUDA device `device` when `nccl` (nccl_group.cpp's
// ft_nccl_backend, from the shim library) is given. Null on failure (ft_pg_last_error says why).
extern "C" void* ft_pg_new(const char* master_addr, int port, int rank, int world, long long timeout_ms,
                           void* nccl, int device) {
  try {
    // c10d's flight recorder captures a traceback for every collective, and its first insertion of a group
    // is unguarded (a race between groups of one process, as in the tests): off unless asked for. Read once,
    // when the first group records.
    setenv("TORCH_FR_BUFFER_SIZE", "0", 0);
    std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = static_cast<size_t>(world);
    so.waitWorkers = true;
    so.timeout = timeout;
    std::string host(master_addr);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(host, so);
    auto store = c10::make_intrusive<c10d::PrefixStore>("ferrotune/", tcp);
    if (nccl != nullptr) {
      c10::intrusive_ptr<c10d::Store> base = store;
      char err[1024] = {0};
      void* raw = reinterpret_cast<NcclBackendFn>(nccl)(&base, rank, world, device, timeout_ms, err, sizeof err);
      if (raw == nullptr) {
        ferrotune::last_error() = err;
        return nullptr;
      }
      auto pg = c10::intrusive_ptr<c10d::Backend>::reclaim(static_cast<c10d::Backend*>(raw));
      return new Group{pg, timeout, device};
    }
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    const char* iface = std::getenv("GLOO_SOCKET_IFNAME");
    if (iface != nullptr && *iface != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else if (loopback(host)) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    opts->threads = 2;
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    return new Group{pg, timeout, -1};
  } catch (const std::exception& e) {
    ferrotune::last_error() = e.what();
    return nullptr;
  }
}

// Sums each tensor in place across the ranks (dense, same shape and dtype on every rank). 0 on success.
extern "C" int ft_pg_allreduce_sum(void* g, at::Tensor** tensors, size_t n) {
  auto* group = static_cast<Group*>(g);
  try {
    for (size_t i = 0; i < n; ++i) {
      at::Tensor& t = *tensors[i];
      // NCCL sums CUDA tensors only: host ones go through the group's device.
      bool staged = group->cuda_device >= 0 && !t.is_cuda();
      std::vector<at::Tensor> v{staged ? t.to(at::Device(at::kCUDA, group->cuda_device)) : t};
      c10d::AllreduceOptions o;
      o.reduceOp = c10d::ReduceOp::SUM;
      o.timeout = group->timeout;
      auto work = group->pg->allreduce(v, o);
      work->wait(group->timeout);
      if (staged) t.copy_(v[0]);
    }
    return 0;
  } catch (const std::exception& e) {
    ferrotune::last_error() = e.what();
    return -1;
  }
}

// The backend's name ("gloo"), to check what was linked.
extern "C" const char* ft_pg_backend(void* g) {
  static thread_local std::string name;
  name = static_cast<Group*>(g)->pg->getBackendName();
  return name.c_str();
}

extern "C" void ft_pg_free(void* g) { delete static_cast<Group*>(g); }
