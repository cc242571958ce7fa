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
  // One step of the FastFace LR scheduler: updates the float64 scheduler state in place from
  // the batch loss and writes base_lrs * factor * warmup into lrs, all on the loss's device.
  m.def(
      "fastface_sched_step(Tensor(a!) state, Tensor(b!) lrs, Tensor loss, Tensor base_lrs, float w1, float w2, "
      "float w3, float alpha, float lambd, int patience, float delta, int max_halvings, int warmup_steps) -> ()");
}
