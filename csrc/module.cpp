// The pybind11 module jacobi_engine._C. Importing it also loads the TORCH_LIBRARY registrations
// of ops.cpp (and ops_cuda.cpp when CUDA was compiled in).
#include <pybind11/pybind11.h>

#include <string>

#include "sampling_verify.h"

#ifndef JE_CUDA_ARCH_LIST
#define JE_CUDA_ARCH_LIST ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "jacobi_engine compiled ops (registered under torch.ops.jacobi_engine)";
  m.def("build_info", []() {
    py::dict info;
#ifdef JE_WITH_CUDA
    info["cuda_kernels"] = true;
#else
    info["cuda_kernels"] = false;
#endif
    info["cuda_arch"] = std::string(JE_CUDA_ARCH_LIST);
    info["cpu_kernels"] = true;
    return info;
  }, "What was compiled into this extension.");
  // The constants the ops are built around, so that Python reads them instead of copying them.
  m.def("constants", []() {
    py::dict constants;
    constants["max_tree_branches"] = jacobi_engine::kMaxTreeBranches;
    constants["sample_lanes"] = jacobi_engine::kSampleLanes;
    constants["prefill_step"] = jacobi_engine::kPrefillStep;
    py::dict error_bits;  // csrc/op_errors.h: the bits of the ops' error word, by the argument at fault
    error_bits["limits"] = jacobi_engine::kErrorLimits;
    error_bits["lengths"] = jacobi_engine::kErrorLengths;
    error_bits["block"] = jacobi_engine::kErrorBlockTokens;
    error_bits["candidates"] = jacobi_engine::kErrorCandidates;
    error_bits["src/dst"] = jacobi_engine::kErrorCacheRows;
    constants["error_bits"] = error_bits;
    return constants;
  }, "The ops' compile-time constants: max_tree_branches, sample_lanes, prefill_step, error_bits.");
}
