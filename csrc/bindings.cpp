// pybind11 module mppm_ext._C: turns DLPack capsules into TensorViews, validates every argument
// (never trusting Python to have done so), and dispatches each op to its CPU or CUDA kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <sstream>
#include <string>

#include "cpu/row_kernels.h"
#include "mppm/cg.h"
#include "mppm/checks.h"
#include "mppm/energy.h"
#include "mppm/finish.h"
#include "mppm/softmax_tile.h"

#ifdef MPPM_EXT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace mppm {
namespace {

// The DLPack ABI (v0.x "dltensor" capsules, as torch.utils.dlpack.to_dlpack produces), declared here
// rather than vendored: only these fields are read.
struct DLDeviceABI {
  int32_t device_type;  // 1 CPU, 2 CUDA, 3 CUDA pinned host memory
  int32_t device_id;
};
struct DLDataTypeABI {
  uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat, 6 bool
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensorABI {
  void* data;
  DLDeviceABI device;
  int32_t ndim;
  DLDataTypeABI dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};

DType parse_dtype(const DLDataTypeABI& t, const char* name) {
  if (t.lanes == 1) {
    if (t.code == 2 && t.bits == 32) return DType::Float32;
    if (t.code == 2 && t.bits == 16) return DType::Float16;
    if (t.code == 2 && t.bits == 64) return DType::Float64;
    if (t.code == 4 && t.bits == 16) return DType::BFloat16;
    if (t.code == 0 && t.bits == 32) return DType::Int32;
    if (t.code == 0 && t.bits == 64) return DType::Int64;
    if ((t.code == 1 || t.code == 6) && t.bits == 8) return DType::UInt8;
  }
  std::ostringstream s;
  s << name << " has an unsupported DLPack dtype (code " << int(t.code) << ", " << int(t.bits) << " bits)";
  throw DTypeError(s.str());
}

// Reads a borrowed view out of a capsule. The capsule keeps its name, so its owner frees it.
TensorView view_of(const py::handle& obj, const char* name) {
  if (!PyCapsule_CheckExact(obj.ptr()) || std::strcmp(PyCapsule_GetName(obj.ptr()), "dltensor") != 0)
    throw DTypeError(std::string(name) + " must be a DLPack capsule (torch.utils.dlpack.to_dlpack)");
  const auto* t = static_cast<const DLTensorABI*>(PyCapsule_GetPointer(obj.ptr(), "dltensor"));
  if (t == nullptr) throw py::error_already_set();
  TensorView v;
  if (t->ndim < 0 || t->ndim > kMaxDims)
    throw ArgumentError(std::string(name) + " has an unsupported number of dimensions");
  v.ndim = t->ndim;
  v.dtype = parse_dtype(t->dtype, name);
  int64_t compact = 1;
  for (int i = v.ndim - 1; i >= 0; --i) {
    v.sizes[i] = t->shape[i];
    if (v.sizes[i] < 0) throw ArgumentError(std::string(name) + " has a negative size");
    v.strides[i] = t->strides ? t->strides[i] : compact;
    compact *= v.sizes[i];
  }
  if (t->device.device_type == 1 || t->device.device_type == 3) {
    v.device = Device::CPU;
  } else if (t->device.device_type == 2) {
    v.device = Device::CUDA;
  } else {
    throw ArgumentError(std::string(name) + " is on an unsupported device (DLPack type " +
                        std::to_string(t->device.device_type) + ")");
  }
  v.device_index = t->device.device_id;
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  if (v.data == nullptr && v.numel() > 0) throw ArgumentError(std::string(name) + " has no data");
  return v;
}

// A view whose dtype and shape are fixed by the op: contiguous, on the device of `ref` (an argument
// already checked, named ref_name in the message).
void check_output(const TensorView& v, const char* name, const TensorView& ref, const char* ref_name, DType dtype,
                  std::initializer_list<int64_t> shape) {
  check_dtype(v, name, {dtype});
  check_ndim(v, name, int(shape.size()));
  int dim = 0;
  for (int64_t s : shape) check_size(v, name, dim++, s, "the expected size");
  check_contiguous(v, name);
  check_same_device(v, name, ref, ref_name);
}

// Where an op runs: on the device of ``ref`` (an input already checked), with the caller's CPU threads
// and CUDA stream (a cudaStream_t passed as an integer, 0 for the default stream).
Launch launch_on(const TensorView& ref, int num_threads, uintptr_t stream) {
  if (num_threads < 1) throw ArgumentError("num_threads must be >= 1");
  Launch launch;
  launch.num_threads = num_threads;
  launch.stream = reinterpret_cast<void*>(stream);
  launch.device_index = ref.device_index;
  return launch;
}

// Identity, to keep run_kernel's `cuda` parameter out of template deduction (so nullptr binds to it).
template <typename T>
struct NonDeduced {
  using type = T;
};

// Runs an op's kernel with the GIL released: `cpu` for CPU views, `cuda` for CUDA views, where `cuda` is
// MPPM_CUDA_KERNEL(name): nullptr in a build without nvcc, which CUDA views are then refused by.
template <typename Params, typename Result>
Result run_kernel(Device device, const Params& p, Result (*cpu)(const Params&),
                  typename NonDeduced<Result (*)(const Params&)>::type cuda) {
  if (device == Device::CUDA && cuda == nullptr)
    throw ArgumentError("this build of mppm_ext has no CUDA kernels (built without nvcc)");
  py::gil_scoped_release release;
  return device == Device::CPU ? cpu(p) : cuda(p);
}

#ifdef MPPM_EXT_WITH_CUDA
#define MPPM_CUDA_KERNEL(name) (&name)
#else
#define MPPM_CUDA_KERNEL(name) nullptr
#endif

// 1 / temperature: a finite number > 0 (named as the argument the caller passes).
void check_inv_temperature(double inv_temperature) {
  if (!(inv_temperature > 0.0) || !std::isfinite(inv_temperature))
    throw ArgumentError("inv_temperature must be a finite number > 0 (1 / temperature)");
}

// Bytes of workspace the kernels need: none on the CPU; on CUDA, what the launcher asks for (in a build
// without nvcc, CUDA views are refused by run_kernel before the size matters).
int64_t energy_workspace_needed(Device device, int device_index, int64_t B, int64_t T, int64_t V) {
#ifdef MPPM_EXT_WITH_CUDA
  if (device == Device::CUDA) return energy_cuda_workspace_bytes(B, T, V, device_index);
#endif
  (void)device, (void)device_index, (void)B, (void)T, (void)V;
  return 0;
}

int64_t finish_workspace_needed(Device device, int64_t B, int64_t T) {
#ifdef MPPM_EXT_WITH_CUDA
  if (device == Device::CUDA) return finish_cuda_workspace_bytes(B, T);
#endif
  (void)device, (void)B, (void)T;
  return 0;
}

// A workspace: contiguous uint8 [n] with n >= `needed`, 16-byte aligned, on the device of `ref`.
void* check_workspace(const TensorView& v, const TensorView& ref, const char* ref_name, int64_t needed) {
  check_dtype(v, "workspace", {DType::UInt8});
  check_ndim(v, "workspace", 1);
  check_contiguous(v, "workspace");
  check_same_device(v, "workspace", ref, ref_name);
  if (v.size(0) < needed)
    throw ArgumentError("workspace must hold at least " + std::to_string(needed) + " bytes for these shapes, got " +
                        std::to_string(v.size(0)));
  if (reinterpret_cast<uintptr_t>(v.data) % 16 != 0) throw ArgumentError("workspace must be 16-byte aligned");
  return v.data;
}

// The Python-facing size queries: cuda_device None for CPU tensors, else the CUDA device's index.
int64_t energy_workspace_bytes(int64_t B, int64_t T, int64_t V, py::object cuda_device) {
  if (B < 0 || T < 0 || V < 1) throw ArgumentError("energy_workspace_bytes needs B, T >= 0 and V >= 1");
  if (cuda_device.is_none()) return 0;
  return energy_workspace_needed(Device::CUDA, cuda_device.cast<int>(), B, T, V);
}

int64_t finish_workspace_bytes(int64_t B, int64_t T, py::object cuda_device) {
  if (B < 0 || T < 0) throw ArgumentError("finish_workspace_bytes needs B, T >= 0");
  return cuda_device.is_none() ? 0 : finish_workspace_needed(Device::CUDA, B, T);
}

void energy(py::handle hidden_c, py::handle logits_c, py::handle tokens_c, py::handle labels_c, py::object mask_c,
            int64_t ignore_index, double inv_temperature, py::handle out_tokens_c, py::handle out_defined_c, py::handle out_stats_c,
            py::handle out_counts_c, py::handle scratch_c, py::handle out_fault_c, py::handle workspace_c, int num_threads,
            uintptr_t stream) {
  const TensorView hidden = view_of(hidden_c, "hidden");
  const TensorView logits = view_of(logits_c, "logits");
  const TensorView tokens = view_of(tokens_c, "tokens");
  const TensorView labels = view_of(labels_c, "labels");
  const auto floats = {DType::Float32, DType::BFloat16, DType::Float16};
  check_ndim(hidden, "hidden", 3);
  check_ndim(logits, "logits", 3);
  check_ndim(tokens, "tokens", 2);
  check_dtype(hidden, "hidden", floats);
  check_dtype(logits, "logits", floats);
  check_dtype(tokens, "tokens", {DType::Int64, DType::Int32});
  check_ndim(labels, "labels", 2);
  check_dtype(labels, "labels", {DType::Int64, DType::Int32});
  const int64_t B = hidden.size(0), T = hidden.size(1);
  check_size(logits, "logits", 0, B, "hidden.shape[0]");
  check_size(logits, "logits", 1, T, "hidden.shape[1]");
  check_size(tokens, "tokens", 0, B, "hidden.shape[0]");
  check_size(tokens, "tokens", 1, T, "hidden.shape[1]");
  check_size(labels, "labels", 0, B, "hidden.shape[0]");
  check_size(labels, "labels", 1, T, "hidden.shape[1]");
  if (hidden.size(2) < 1) throw ArgumentError("hidden must have a non-empty last dimension (d >= 1)");
  if (logits.size(2) < 1) throw ArgumentError("logits must have a non-empty last dimension (V >= 1)");
  check_unit_last_stride(hidden, "hidden");
  check_unit_last_stride(logits, "logits");
  check_nonnegative_strides(tokens, "tokens");
  check_nonnegative_strides(labels, "labels");
  check_same_device(logits, "logits", hidden, "hidden");
  check_same_device(tokens, "tokens", hidden, "hidden");
  check_same_device(labels, "labels", hidden, "hidden");
  check_inv_temperature(inv_temperature);

  EnergyParams p;
  p.B = B;
  p.T = T;
  p.d = hidden.size(2);
  p.V = logits.size(2);
  p.hidden = hidden.data;
  p.hidden_dtype = hidden.dtype;
  p.hidden_sb = hidden.stride(0);
  p.hidden_st = hidden.stride(1);
  p.logits = logits.data;
  p.logits_dtype = logits.dtype;
  p.logits_sb = logits.stride(0);
  p.logits_st = logits.stride(1);
  p.tokens = tokens.data;
  p.tokens_dtype = tokens.dtype;
  p.tokens_sb = tokens.stride(0);
  p.tokens_st = tokens.stride(1);
  p.labels = labels.data;
  p.labels_dtype = labels.dtype;
  p.labels_sb = labels.stride(0);
  p.labels_st = labels.stride(1);
  p.ignore_index = ignore_index;
  p.inv_temperature = inv_temperature;
  if (!mask_c.is_none()) {
    const TensorView mask = view_of(mask_c, "mask");
    check_ndim(mask, "mask", 2);
    check_dtype(mask, "mask", {DType::UInt8});
    check_size(mask, "mask", 0, B, "hidden.shape[0]");
    check_size(mask, "mask", 1, T, "hidden.shape[1]");
    check_nonnegative_strides(mask, "mask");
    check_same_device(mask, "mask", hidden, "hidden");
    p.mask = static_cast<const uint8_t*>(mask.data);
    p.mask_sb = mask.stride(0);
    p.mask_st = mask.stride(1);
  }
  const TensorView out_tokens = view_of(out_tokens_c, "out_tokens");
  const TensorView out_defined = view_of(out_defined_c, "out_defined");
  const TensorView out_stats = view_of(out_stats_c, "out_stats");
  const TensorView out_counts = view_of(out_counts_c, "out_counts");
  check_output(out_tokens, "out_tokens", hidden, "hidden", DType::Float32, {kNumTokenQuantities, B, T});
  check_output(out_defined, "out_defined", hidden, "hidden", DType::UInt8, {B, T});
  check_output(out_stats, "out_stats", hidden, "hidden", DType::Float32, {B, kNumStatColumns});
  check_output(out_counts, "out_counts", hidden, "hidden", DType::Int64, {B, kNumCountColumns});
  const TensorView scratch = view_of(scratch_c, "scratch");
  check_output(scratch, "scratch", hidden, "hidden", DType::Float64, {kNumParts, B, T});
  p.scratch = static_cast<double*>(scratch.data);
  p.out_tokens = static_cast<float*>(out_tokens.data);
  p.out_defined = static_cast<uint8_t*>(out_defined.data);
  p.out_stats = static_cast<float*>(out_stats.data);
  p.out_counts = static_cast<int64_t*>(out_counts.data);
  const TensorView out_fault = view_of(out_fault_c, "out_fault");
  check_output(out_fault, "out_fault", hidden, "hidden", DType::Int64, {1});
  p.fault = static_cast<unsigned long long*>(out_fault.data);
  p.workspace = check_workspace(view_of(workspace_c, "workspace"), hidden, "hidden",
                                energy_workspace_needed(hidden.device, hidden.device_index, B, T, p.V));
  p.launch = launch_on(hidden, num_threads, stream);
  // Faults in the data are not raised here: they are in out_fault, which the caller reads (or not).
  run_kernel(hidden.device, p, &energy_cpu, MPPM_CUDA_KERNEL(energy_cuda));
}

// The finish of the energy op on parts computed elsewhere (include/mppm/finish.h); outputs are
// allocated by Python.
void energy_finish(py::handle parts_c, py::handle defined_c, py::handle out_tokens_c, py::handle out_stats_c,
                   py::handle out_counts_c, py::handle workspace_c, int num_threads, uintptr_t stream) {
  const TensorView parts = view_of(parts_c, "parts");
  check_ndim(parts, "parts", 3);
  check_dtype(parts, "parts", {DType::Float64});
  const int64_t B = parts.size(1), T = parts.size(2);
  if (parts.size(0) < kNumParts)
    throw ArgumentError("parts must be [P, B, T] with P >= 4 planes (log_prob, kinetic, entropy, logsumexp), got shape " +
                        shape_string(parts));
  if (B < 1) throw ArgumentError("parts must hold at least one sequence (B >= 1), got shape " + shape_string(parts));
  check_contiguous(parts, "parts");
  const TensorView defined = view_of(defined_c, "defined");
  const TensorView out_tokens = view_of(out_tokens_c, "out_tokens");
  const TensorView out_stats = view_of(out_stats_c, "out_stats");
  const TensorView out_counts = view_of(out_counts_c, "out_counts");
  check_output(defined, "defined", parts, "parts", DType::UInt8, {B, T});
  check_output(out_tokens, "out_tokens", parts, "parts", DType::Float32, {kNumTokenQuantities, B, T});
  check_output(out_stats, "out_stats", parts, "parts", DType::Float32, {B, kNumStatColumns});
  check_output(out_counts, "out_counts", parts, "parts", DType::Int64, {B, kNumCountColumns});

  FinishParams p;
  p.B = B;
  p.T = T;
  p.parts = static_cast<const double*>(parts.data);
  p.defined = static_cast<const uint8_t*>(defined.data);
  p.out_tokens = static_cast<float*>(out_tokens.data);
  p.out_stats = static_cast<float*>(out_stats.data);
  p.out_counts = static_cast<int64_t*>(out_counts.data);
  p.workspace = check_workspace(view_of(workspace_c, "workspace"), parts, "parts",
                                finish_workspace_needed(parts.device, B, T));
  p.launch = launch_on(parts, num_threads, stream);
  run_kernel(parts.device, p, &finish_cpu, MPPM_CUDA_KERNEL(finish_cuda));
}

// Batched CG of the steering solve (include/mppm/cg.h); outputs and scratch are allocated by Python.
void cg_solve(py::handle rows_c, py::object center_c, py::handle rhs_c, double lam, double tol, int64_t max_iter,
              py::handle out_u_c, py::handle out_iters_c, py::handle out_residual_c, py::handle out_converged_c,
              py::handle scratch_c, int num_threads, uintptr_t stream) {
  const TensorView rows = view_of(rows_c, "rows");
  const TensorView rhs = view_of(rhs_c, "rhs");
  check_ndim(rows, "rows", 3);
  check_dtype(rows, "rows", {DType::Float32});
  const int64_t B = rows.size(0), m = rows.size(1), d = rows.size(2);
  if (m < 1 || d < 1) throw ArgumentError("rows must be [B, m, d] with m >= 1 and d >= 1, got " + shape_string(rows));
  check_contiguous(rows, "rows");
  check_output(rhs, "rhs", rows, "rows", DType::Float64, {B, m});
  CGParams p;
  p.B = B;
  p.m = m;
  p.d = d;
  p.rows = static_cast<const float*>(rows.data);
  if (!center_c.is_none()) {
    const TensorView center = view_of(center_c, "center");
    check_output(center, "center", rows, "rows", DType::Float32, {B, d});
    p.center = static_cast<const float*>(center.data);
  }
  p.rhs = static_cast<const double*>(rhs.data);
  if (!(lam >= 0.0) || !std::isfinite(lam)) throw ArgumentError("lam must be a finite number >= 0");
  if (!(tol > 0.0) || !std::isfinite(tol)) throw ArgumentError("tol must be a finite number > 0");
  if (max_iter < 0) throw ArgumentError("max_iter must be >= 0");
  p.lam = lam;
  p.tol = tol;
  p.max_iter = max_iter;
  const TensorView out_u = view_of(out_u_c, "out_u");
  const TensorView out_iters = view_of(out_iters_c, "out_iters");
  const TensorView out_residual = view_of(out_residual_c, "out_residual");
  const TensorView out_converged = view_of(out_converged_c, "out_converged");
  const TensorView scratch = view_of(scratch_c, "scratch");
  check_output(out_u, "out_u", rows, "rows", DType::Float64, {B, m});
  check_output(out_iters, "out_iters", rows, "rows", DType::Int64, {B});
  check_output(out_residual, "out_residual", rows, "rows", DType::Float64, {B});
  check_output(out_converged, "out_converged", rows, "rows", DType::UInt8, {B});
  check_output(scratch, "scratch", rows, "rows", DType::Float64, {B, d + 3 * m});
  p.u = static_cast<double*>(out_u.data);
  p.iters = static_cast<int64_t*>(out_iters.data);
  p.residual = static_cast<double*>(out_residual.data);
  p.converged = static_cast<uint8_t*>(out_converged.data);
  p.scratch = static_cast<double*>(scratch.data);
  p.launch = launch_on(rows, num_threads, stream);
  run_kernel(rows.device, p, &cg_cpu, MPPM_CUDA_KERNEL(cg_cuda));
}

// A [R] state vector of softmax_tile: contiguous, on z's device, of one dtype.
template <typename T>
T* state_vector(py::handle capsule, const char* name, const TensorView& z, DType dtype) {
  const TensorView v = view_of(capsule, name);
  check_dtype(v, name, {dtype});
  check_ndim(v, name, 1);
  check_size(v, name, 0, z.size(0), "z.shape[0]");
  check_contiguous(v, name);
  check_same_device(v, name, z, "z");
  return static_cast<T*>(v.data);
}

void softmax_tile(py::handle z_c, int64_t v0, double inv_temperature, py::handle run_max_c, py::handle run_sum_c,
                  py::object run_ent_c, py::handle bad_col_c, py::object targets_c, py::object picked_c, py::object alpha_c, int num_threads, uintptr_t stream) {
  const TensorView z = view_of(z_c, "z");
  check_ndim(z, "z", 2);
  check_dtype(z, "z", {DType::Float32});
  if (z.size(1) < 1) throw ArgumentError("z must have at least one column");
  check_unit_last_stride(z, "z");
  if (z.size(0) > 1 && z.stride(0) < z.size(1))
    throw ArgumentError("z must not overlap itself (z.stride(0) >= z.shape[1])");
  if (v0 < 0) throw ArgumentError("v0 must be >= 0");
  check_inv_temperature(inv_temperature);
  if (targets_c.is_none() != picked_c.is_none())
    throw ArgumentError("targets and picked must be given together");

  SoftmaxTileParams p;
  p.R = z.size(0);
  p.C = z.size(1);
  p.z = static_cast<float*>(z.data);
  p.z_stride = z.stride(0);
  p.v0 = v0;
  p.inv_temperature = inv_temperature;
  p.run_max = state_vector<double>(run_max_c, "run_max", z, DType::Float64);
  p.run_sum = state_vector<double>(run_sum_c, "run_sum", z, DType::Float64);
  if (!run_ent_c.is_none()) p.run_ent = state_vector<double>(run_ent_c, "run_ent", z, DType::Float64);
  p.bad_col = state_vector<int64_t>(bad_col_c, "bad_col", z, DType::Int64);
  if (!targets_c.is_none()) {
    p.targets = state_vector<const int64_t>(targets_c, "targets", z, DType::Int64);
    p.picked = state_vector<double>(picked_c, "picked", z, DType::Float64);
  }
  if (!alpha_c.is_none()) p.alpha = state_vector<float>(alpha_c, "alpha", z, DType::Float32);
  p.launch = launch_on(z, num_threads, stream);
  if (p.R == 0) return;
  run_kernel(z.device, p, &softmax_tile_cpu, MPPM_CUDA_KERNEL(softmax_tile_cuda));
}

int cuda_device_count() {
#ifdef MPPM_EXT_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" / "no driver" error
    return 0;
  }
  return n;
#else
  return 0;
#endif
}

py::dict build_info() {
  py::dict info;
  info["version"] = MPPM_EXT_VERSION;
  info["compiler"] = MPPM_EXT_COMPILER;
#if defined(MPPM_EXT_X86_ISAS)
  info["cpu_isas_compiled"] = std::vector<std::string>{"avx512", "avx2", "baseline"};
#else
  info["cpu_isas_compiled"] = std::vector<std::string>{"baseline"};
#endif
  info["cpu_isas_supported"] = cpu::supported_isas();
  info["cpu_isa"] = std::string(cpu::active_kernels().name);
#ifdef _OPENMP
  info["openmp"] = int(_OPENMP);
#else
  info["openmp"] = py::none();
#endif
#ifdef MPPM_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_runtime_version"] = int(CUDART_VERSION);
  info["cuda_architectures"] = std::string(MPPM_EXT_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_runtime_version"] = py::none();
  info["cuda_architectures"] = py::none();
#endif
  info["cuda_device_count"] = cuda_device_count();
  return info;
}

}  // namespace
}  // namespace mppm

PYBIND11_MODULE(_C, m) {
  m.doc() = "mppm_ext compiled kernels (torch-free; called through mppm_ext.ops)";
  py::register_exception<mppm::ArgumentError>(m, "ArgumentError", PyExc_ValueError);
  py::register_exception<mppm::DTypeError>(m, "DTypeError", PyExc_TypeError);
  m.def("energy", &mppm::energy, py::arg("hidden"), py::arg("logits"), py::arg("tokens"), py::arg("labels"),
        py::arg("mask"), py::arg("ignore_index"), py::arg("inv_temperature"), py::arg("out_tokens"), py::arg("out_defined"), py::arg("out_stats"),
        py::arg("out_counts"), py::arg("scratch"), py::arg("out_fault"), py::arg("workspace"), py::arg("num_threads"),
        py::arg("stream"),
        "Fused energy op on DLPack views; see csrc/include/mppm/energy.h for the layout. Faults in the data are\n"
        "not raised: out_fault [1] int64 receives -1, or (row << ENERGY_FAULT_BITS) | kind for the first faulty\n"
        "position (row = b * T + t, kind an index into ENERGY_FAULTS), whose outputs are then NaN. workspace:\n"
        "uint8 [energy_workspace_bytes(...)] or longer, 16-byte aligned, on the inputs' device. No allocation\n"
        "and no host synchronisation on CUDA.");
  m.def("energy_workspace_bytes", &mppm::energy_workspace_bytes, py::arg("B"), py::arg("T"), py::arg("V"),
        py::arg("cuda_device"),
        "Bytes of workspace energy needs for these shapes: 0 for CPU tensors (cuda_device None), else for\n"
        "the CUDA device of that index.");
  m.def("finish_workspace_bytes", &mppm::finish_workspace_bytes, py::arg("B"), py::arg("T"), py::arg("cuda_device"),
        "Bytes of workspace energy_finish needs for these shapes: 0 for CPU tensors (cuda_device None).");
  m.def("energy_finish", &mppm::energy_finish, py::arg("parts"), py::arg("defined"), py::arg("out_tokens"),
        py::arg("out_stats"), py::arg("out_counts"), py::arg("workspace"), py::arg("num_threads"), py::arg("stream"),
        "The energy op's finish on DLPack views: from parts [P >= 4, B, T] float64 (plane 0 log_prob, plane 1\n"
        "kinetic, plane 2 entropy, plane 3 logsumexp; later planes ignored) and defined [B, T] uint8 (defined & 1:\n"
        "log_prob defined, defined & 2: kinetic defined, defined & 4: the state is real, entropy and logsumexp\n"
        "defined; a position is valid when bits 1 and 2 are set) to out_tokens [10, B, T] float32 (0 where undefined),\n"
        "out_stats [B, NUM_STAT_COLUMNS] float32 and out_counts [B, NUM_COUNT_COLUMNS] int64, bitwise what\n"
        "energy writes from the same parts. All views contiguous, on one device; B >= 1. workspace: uint8\n"
        "[finish_workspace_bytes(...)] or longer, 16-byte aligned. num_threads: CPU\n"
        "threads; stream: a cudaStream_t as an integer (0 = default) for CUDA views. See\n"
        "csrc/include/mppm/finish.h.");
  m.def("cg_solve", &mppm::cg_solve, py::arg("rows"), py::arg("center"), py::arg("rhs"), py::arg("lam"),
        py::arg("tol"), py::arg("max_iter"), py::arg("out_u"), py::arg("out_iters"), py::arg("out_residual"),
        py::arg("out_converged"), py::arg("scratch"), py::arg("num_threads"), py::arg("stream"),
        "Batched CG on (G G^T + lam I) u = rhs with G = rows - 1 center^T; see csrc/include/mppm/cg.h.");
  m.def("softmax_tile", &mppm::softmax_tile, py::arg("z"), py::arg("v0"), py::arg("inv_temperature"),
        py::arg("run_max"), py::arg("run_sum"), py::arg("run_ent"), py::arg("bad_col"), py::arg("targets"), py::arg("picked"), py::arg("alpha"), py::arg("num_threads"),
        py::arg("stream"),
        "Fold one fp32 logits tile into a per-row online softmax; see csrc/include/mppm/softmax_tile.h.");
  m.def("build_info", &mppm::build_info, "What this binary was compiled with.");
  m.def("cpu_isas", &mppm::cpu::supported_isas, "CPU instruction sets compiled and supported here, best first.");
  m.def("set_cpu_isa", &mppm::cpu::set_isa, py::arg("name"), "Pin the CPU row kernels to one instruction set.");
  m.def("cpu_isa", [] { return std::string(mppm::cpu::active_kernels().name); });
  m.attr("NUM_TOKEN_QUANTITIES") = int(mppm::kNumTokenQuantities);
  m.attr("NUM_STAT_COLUMNS") = int(mppm::kNumStatColumns);
  m.attr("NUM_COUNT_COLUMNS") = int(mppm::kNumCountColumns);
  m.attr("ENERGY_FAULT_BITS") = mppm::kFaultBits;
  // The names of the EnergyFault kinds (energy.h), in enum order: the kind of a fault word is an index.
  m.attr("ENERGY_FAULTS") = std::vector<std::string>{"none", "token_out_of_range", "label_out_of_range",
                                                     "non_finite_logits", "no_finite_logit", "non_finite_hidden"};
  static_assert(int(mppm::EnergyFault::kNumKinds) == 6, "ENERGY_FAULTS must name every EnergyFault");
}
