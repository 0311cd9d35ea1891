// The empty Python module arpg_kernels._C: importing it loads this library, which runs the
// TORCH_LIBRARY registrations of the arpg_cuda ops. No pybind layer; the ops are reached through
// torch.ops.arpg_cuda.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      nullptr,
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
