// fastface::* operator schemas. Kernels register per dispatch key in cpu/ and cuda/;
// fake (meta) kernels and autograd formulas are registered from Python (fastface/ops/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module: importing fastface._C runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastface C++/CUDA operators (see torch.ops.fastface)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastface, m) {
  // Depthwise k x k convolution + per-channel bias (a folded BatchNorm) + optional ReLU6.
  m.def("dwconv2d(Tensor x, Tensor weight, Tensor bias, int stride, int padding, bool relu6) -> Tensor");
  // Gradients w.r.t. (x, weight, bias); `out` is the forward output, whose value masks ReLU6.
  m.def(
      "dwconv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, int stride, int padding, "
      "bool relu6) -> (Tensor, Tensor, Tensor)");
}
