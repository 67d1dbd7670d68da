// Row kernels for the baseline instruction set; the flags are set on this file in CMakeLists.txt.
#define MPPM_ISA baseline
#define MPPM_ISA_NAME "baseline"
#define MPPM_ISA_LANES 4
#include "row_kernels.inc"
