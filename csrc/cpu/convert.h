// Scalar conversions of 16-bit floats, used for single-element reads (the target logit) and for
// row tails; the vector loops convert with the same bit patterns in row_kernels.inc.
// Everything is `static`: this header is compiled into objects with different -march flags, and a
// shared inline definition could be resolved to the AVX-512 copy on a CPU without AVX-512.
#pragma once

#include <cstdint>
#include <cstring>

#include "mppm/tensor_view.h"

namespace mppm::cpu {

static inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// IEEE binary16 -> binary32, exact for normals, subnormals, infinities and NaN.
static inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = h & 0x7c00u;
  const uint32_t mantissa = h & 0x03ffu;
  uint32_t magnitude;
  if (exponent == 0x7c00u) {
    magnitude = 0x7f800000u | (mantissa << 13);                // inf / NaN
  } else if (exponent == 0) {
    float sub = float(mantissa) * 5.9604644775390625e-8f;      // mantissa * 2^-24, exact
    std::memcpy(&magnitude, &sub, sizeof sub);
  } else {
    magnitude = ((exponent + ((127 - 15) << 10)) | mantissa) << 13;
  }
  return bits_to_float(sign | magnitude);
}

// Element i of a row of a floating dtype, as float.
static inline float load_element(const void* row, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::Float32: return static_cast<const float*>(row)[i];
    case DType::BFloat16: return bf16_to_float(static_cast<const uint16_t*>(row)[i]);
    case DType::Float16: return fp16_to_float(static_cast<const uint16_t*>(row)[i]);
    default: return 0.0f;  // unreachable: bindings.cpp admits only the three dtypes above
  }
}

static inline int64_t load_index(const void* base, int64_t offset, DType dtype) {
  return dtype == DType::Int32 ? int64_t(static_cast<const int32_t*>(base)[offset])
                               : static_cast<const int64_t*>(base)[offset];
}

}  // namespace mppm::cpu
