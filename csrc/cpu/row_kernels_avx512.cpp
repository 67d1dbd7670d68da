// Row kernels for the avx512 instruction set; the flags are set on this file in CMakeLists.txt.
#define MPPM_ISA avx512
#define MPPM_ISA_NAME "avx512"
#define MPPM_ISA_LANES 16
#include "row_kernels.inc"
