// fastnn._C_avx512: the bfloat16 and float16 CPU kernels built for AVX-512
// (batch_norm_cpu_*_avx512.cpp; setup.py passes the flags), the bfloat16 ones a second time for
// AVX512-BF16. The module's content is `kernels`, a capsule holding their tables (the AVX512-BF16
// bfloat16 kernels where the CPU has it), which fastnn._ext hands to fastnn._C on a CPU with
// AVX-512, and `bfloat16_avx512bf16`, which bfloat16 table it holds.
#include <Python.h>

#include <cstdlib>
#include <cstring>

#include "cpu/batch_norm_cpu_table.h"

namespace {

// The bfloat16 kernels to hand out: those built for AVX512-BF16 where they were built and the CPU
// has it, unless FASTNN_CPU_AVX512_BF16=0 (read at import); else the AVX-512 ones. Their results
// are bitwise the same.
const fastnn::cpu::KernelTable* bfloat16_kernels(bool& native) {
  native = false;
#if defined(FASTNN_HAVE_AVX512BF16_KERNELS)
  const char* env = std::getenv("FASTNN_CPU_AVX512_BF16");
  const bool off = env != nullptr && (std::strcmp(env, "0") == 0 || std::strcmp(env, "off") == 0 ||
                                      std::strcmp(env, "false") == 0 || std::strcmp(env, "no") == 0);
  if (!off && __builtin_cpu_supports("avx512bf16")) {
    native = true;
    return fastnn::cpu::kernels_bfloat16_avx512bf16();
  }
#endif
  return fastnn::cpu::kernels<at::ScalarType::BFloat16>();
}

}  // namespace

extern "C" PyObject* PyInit__C_avx512(void) {
  static bool native = false;
  static const fastnn::cpu::ReducedKernelTables tables{fastnn::cpu::kKernelTableVersion,
                                                       bfloat16_kernels(native),
                                                       fastnn::cpu::kernels<at::ScalarType::Half>()};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_avx512", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  // Whether the bfloat16 kernels handed out round with AVX512-BF16's conversion.
  if (PyModule_AddObject(m, "bfloat16_avx512bf16", PyBool_FromLong(native ? 1 : 0)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  PyObject* capsule = PyCapsule_New(const_cast<fastnn::cpu::ReducedKernelTables*>(&tables),
                                    "fastnn.cpu_kernel_table", nullptr);
  if (capsule == nullptr || PyModule_AddObject(m, "kernels", capsule) < 0) {
    Py_XDECREF(capsule);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
