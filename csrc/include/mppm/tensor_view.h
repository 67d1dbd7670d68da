// Torch-free description of a tensor argument: what every kernel sees instead of at::Tensor.
// Filled from a DLPack capsule in bindings.cpp; the kernels never look at Python objects.
#pragma once

#include <cstdint>

namespace mppm {

enum class DType : int { Float32, Float16, BFloat16, Float64, Int32, Int64, UInt8 };
enum class Device : int { CPU, CUDA };

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  int ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, as DLPack and torch count them
  DType dtype = DType::Float32;
  Device device = Device::CPU;
  int device_index = 0;

  int64_t size(int dim) const { return sizes[dim]; }
  int64_t stride(int dim) const { return strides[dim]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= sizes[i];
    return n;
  }
};

// Where a kernel runs, shared by every op's parameter struct; bindings.cpp fills it from the caller.
struct Launch {
  int num_threads = 1;     // CPU only: OpenMP threads
  void* stream = nullptr;  // CUDA only: cudaStream_t
  int device_index = 0;    // CUDA only
};

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
    case DType::Int32: return "int32";
    case DType::Int64: return "int64";
    case DType::UInt8: return "uint8";
  }
  return "unknown";
}

}  // namespace mppm
