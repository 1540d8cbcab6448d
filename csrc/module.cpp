// A Python module with no functions, built by setup.py as fastunlearn._C (CPU ops) and as
// fastunlearn._C_cuda (CUDA ops, via module_cuda.cpp). Importing it loads the shared
// library, whose static initialisers register torch.ops.fastunlearn.*.
#include <Python.h>

#ifndef FASTUNLEARN_MODULE
#define FASTUNLEARN_MODULE _C
#endif
#define FU_STR2(x) #x
#define FU_STR(x) FU_STR2(x)
#define FU_CAT2(a, b) a##b
#define FU_CAT(a, b) FU_CAT2(a, b)

static struct PyModuleDef fastunlearn_module = {
    PyModuleDef_HEAD_INIT, FU_STR(FASTUNLEARN_MODULE),
    "fastunlearn C++/CUDA ops, registered as torch.ops.fastunlearn.*", -1, nullptr,
};

PyMODINIT_FUNC FU_CAT(PyInit_, FASTUNLEARN_MODULE)(void) { return PyModule_Create(&fastunlearn_module); }
