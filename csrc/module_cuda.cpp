// fastunlearn._C_cuda: the module shell of csrc/module.cpp under another name (a separate file so
// the two extensions never share an object file in build/).
#define FASTUNLEARN_MODULE _C_cuda
#include "module.cpp"
