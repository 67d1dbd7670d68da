// Argument checks shared by every op binding. They throw ArgumentError (mapped to Python's ValueError)
// or DTypeError (TypeError) with the argument's name and what was expected, so a bad view coming
// straight from Python never reaches a kernel.
#pragma once

#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>

#include "mppm/tensor_view.h"

namespace mppm {

struct ArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct DTypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline std::string shape_string(const TensorView& v) {
  std::ostringstream s;
  s << "[";
  for (int i = 0; i < v.ndim; ++i) s << (i ? ", " : "") << v.sizes[i];
  s << "]";
  return s.str();
}

inline void check_ndim(const TensorView& v, const char* name, int ndim) {
  if (v.ndim != ndim) {
    std::ostringstream s;
    s << name << " must have " << ndim << " dimensions, got shape " << shape_string(v);
    throw ArgumentError(s.str());
  }
}

inline void check_size(const TensorView& v, const char* name, int dim, int64_t expected, const char* what) {
  if (v.sizes[dim] != expected) {
    std::ostringstream s;
    s << name << ".shape[" << dim << "] must equal " << what << " = " << expected << ", got shape "
      << shape_string(v);
    throw ArgumentError(s.str());
  }
}

inline void check_dtype(const TensorView& v, const char* name, std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (v.dtype == d) return;
  std::ostringstream s;
  s << name << " has dtype " << dtype_name(v.dtype) << "; expected one of";
  for (DType d : allowed) s << " " << dtype_name(d);
  throw DTypeError(s.str());
}

inline void check_nonnegative_strides(const TensorView& v, const char* name) {
  for (int i = 0; i < v.ndim; ++i)
    if (v.strides[i] < 0) throw ArgumentError(std::string(name) + " has a negative stride");
}

// Rows that the kernels stream over must be contiguous; other strides are free, including 0 for
// broadcast views.
inline void check_unit_last_stride(const TensorView& v, const char* name) {
  if (v.ndim > 0 && v.sizes[v.ndim - 1] > 1 && v.strides[v.ndim - 1] != 1)
    throw ArgumentError(std::string(name) + " must be contiguous in its last dimension");
  check_nonnegative_strides(v, name);
}

// An empty view addresses nothing, so any strides will do (torch gives torch.empty(8, 1, 0) the
// strides (1, 1, 1)).
inline void check_contiguous(const TensorView& v, const char* name) {
  if (v.numel() == 0) return;
  int64_t expected = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    if (v.sizes[i] > 1 && v.strides[i] != expected)
      throw ArgumentError(std::string(name) + " must be a contiguous tensor");
    expected *= v.sizes[i];
  }
}

inline void check_same_device(const TensorView& v, const char* name, const TensorView& ref, const char* ref_name) {
  if (v.device != ref.device || v.device_index != ref.device_index)
    throw ArgumentError(std::string(name) + " is on a different device than " + ref_name);
}

}  // namespace mppm
