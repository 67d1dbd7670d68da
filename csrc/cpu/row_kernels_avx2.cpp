// Row kernels for the avx2 instruction set; the flags are set on this file in CMakeLists.txt.
#define MPPM_ISA avx2
#define MPPM_ISA_NAME "avx2"
#define MPPM_ISA_LANES 8
#include "row_kernels.inc"
