// Host-side helpers shared by every op's CUDA launcher: the one CUDA error check, the guard that makes
// the views' device current and the grid size of grid-stride kernels. There is no allocator here: an
// op's scratch is a torch tensor its caller passes (so that the op can run inside a CUDA graph).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace mppm {

// Raises std::runtime_error (RuntimeError in Python) naming the call that failed.
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("mppm_ext (CUDA): ") + what + " failed: " + cudaGetErrorString(err));
}

// Makes a CUDA device current for the lifetime of the guard and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);  // a destructor cannot report a failure
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

// The grid of a grid-stride loop over `blocks` blocks: the loops take any count, the grid itself is
// capped at what gridDim.x can hold.
inline unsigned grid_for(int64_t blocks) { return static_cast<unsigned>(std::min<int64_t>(blocks, INT_MAX)); }

}  // namespace mppm
