// fastnn._C_avx512: the bfloat16 and float16 CPU kernels built for AVX-512
// (batch_norm_cpu_*_avx512.cpp; setup.py passes the flags). The module's only content is `kernels`,
// a capsule holding their tables, which fastnn._ext hands to fastnn._C on a CPU with AVX-512.
#include <Python.h>

#include "cpu/batch_norm_cpu_table.h"

extern "C" PyObject* PyInit__C_avx512(void) {
  static const fastnn::cpu::ReducedKernelTables tables{
      fastnn::cpu::kKernelTableVersion, fastnn::cpu::kernels<at::ScalarType::BFloat16>(),
      fastnn::cpu::kernels<at::ScalarType::Half>()};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_avx512", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyObject* capsule = PyCapsule_New(const_cast<fastnn::cpu::ReducedKernelTables*>(&tables),
                                    "fastnn.cpu_kernel_table", nullptr);
  if (capsule == nullptr || PyModule_AddObject(m, "kernels", capsule) < 0) {
    Py_XDECREF(capsule);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
