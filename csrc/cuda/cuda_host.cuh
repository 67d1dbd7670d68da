// Host-side helpers shared by every op's CUDA launcher: the one CUDA error check, the guard that makes
// the views' device current, stream-ordered scratch buffers and the grid size of grid-stride kernels.
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

// `count` elements of T on the current device, allocated and freed in stream order (cudaMallocAsync /
// cudaFreeAsync), so that concurrent calls on other streams each get their own and nothing waits for
// the whole device. count == 0 allocates nothing and get() is nullptr.
template <typename T>
class StreamBuffer {
 public:
  StreamBuffer(int64_t count, cudaStream_t stream, const char* what) : stream_(stream) {
    if (count <= 0) return;
    void* ptr = nullptr;
    check_cuda(cudaMallocAsync(&ptr, size_t(count) * sizeof(T), stream_), what);
    ptr_ = static_cast<T*>(ptr);
  }
  ~StreamBuffer() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);  // stream-ordered: after every use enqueued before it
  }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  T* get() const { return ptr_; }

 private:
  cudaStream_t stream_;
  T* ptr_ = nullptr;
};

// The grid of a grid-stride loop over `blocks` blocks: the loops take any count, the grid itself is
// capped at what gridDim.x can hold.
inline unsigned grid_for(int64_t blocks) { return static_cast<unsigned>(std::min<int64_t>(blocks, INT_MAX)); }

}  // namespace mppm
