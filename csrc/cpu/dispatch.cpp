// Run-time choice of the CPU row kernels. The default is the best instruction set the CPU supports;
// MPPM_EXT_CPU_ISA or set_isa() (mppm_ext.set_cpu_isa) pin another, which is how the tests run every
// compiled variant on one machine.
#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "row_kernels.h"

namespace mppm::cpu {
namespace {

const RowKernels* all_kernels(const std::string& name) {
#if defined(MPPM_EXT_X86_ISAS)
  if (name == "avx512") return &avx512::kernels;
  if (name == "avx2") return &avx2::kernels;
#endif
  if (name == "baseline") return &baseline::kernels;
  return nullptr;
}

bool cpu_supports(const std::string& name) {
#if defined(MPPM_EXT_X86_ISAS)
  // libgcc's cpu model also checks that the OS saves the wider registers (XGETBV).
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return name == "baseline";
}

const RowKernels* initial_kernels() {
  if (const char* env = std::getenv("MPPM_EXT_CPU_ISA"); env != nullptr && *env != '\0') {
    const std::string name(env);
    if (!cpu_supports(name) || all_kernels(name) == nullptr)
      throw std::invalid_argument("MPPM_EXT_CPU_ISA=" + name + " is not supported by this build and CPU");
    return all_kernels(name);
  }
  return all_kernels(supported_isas().front());
}

std::atomic<const RowKernels*> active{nullptr};

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* name : {"avx512", "avx2", "baseline"})
    if (all_kernels(name) != nullptr && cpu_supports(name)) out.emplace_back(name);
  return out;
}

const RowKernels& active_kernels() {
  const RowKernels* k = active.load();
  if (k == nullptr) {
    k = initial_kernels();
    active.store(k);
  }
  return *k;
}

void set_isa(const std::string& name) {
  if (all_kernels(name) == nullptr || !cpu_supports(name))
    throw std::invalid_argument("CPU instruction set '" + name + "' is not available here");
  active.store(all_kernels(name));
}

}  // namespace mppm::cpu
