// Makes a CUDA device current for the lifetime of the guard and restores the caller's device
// afterwards; shared by every op's host launcher.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace mppm {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    fail_on(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) fail_on(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);  // a destructor cannot report a failure
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  static void fail_on(cudaError_t err, const char* what) {
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("mppm_ext (CUDA): ") + what + " failed: " + cudaGetErrorString(err));
  }
  int device_;
  int previous_ = 0;
};

}  // namespace mppm
