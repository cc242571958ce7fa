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
  // A whole inverted-residual block with BN folded, for `groups` same-shaped branches at once
  // (branch g owns channel slice g of x, of every weight and of the output):
  //   h = relu6(conv1x1(x, w_expand) + b_expand)         (skipped when w_expand is None: t = 1)
  //   h = relu6(depthwise_kxk(h, w_dw, stride, pad k/2) + b_dw)
  //   y = conv1x1(h, w_proj) + b_proj  (+ x if residual)
  // x: N x (G*Cin) x H x W; w_expand: (G*Ce) x Cin; w_dw: (G*Ce) x k x k; w_proj: (G*Cout) x Ce.
  m.def(
      "ir_block(Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_dw, Tensor b_dw, Tensor w_proj, "
      "Tensor b_proj, int stride, bool residual, int groups) -> Tensor");
  // Dense k x k convolution (groups allowed, padding on every side, dilation 1) + per-channel bias
  // (a folded BatchNorm) + optional ReLU6, for inference: the stem, the last 1x1 conv and the
  // head's linear layer of the folded eval path. weight: Cout x Cin/groups x k x k.
  m.def("conv_bias_act(Tensor x, Tensor weight, Tensor bias, int stride, int padding, int groups, bool relu6) -> Tensor");
  // Training path of the depthwise stage: depthwise k x k conv (no bias, padding k/2) -> BatchNorm
  // with batch statistics -> ReLU6 (or none), N x C x H x W (split branches concatenated along C
  // run as one call). Returns y, the batch mean and 1/sqrt(biased var + eps) of the conv output;
  // the running statistics are updated by the caller. The conv output is never stored: kernels
  // compute the statistics in one pass and normalise in a second, recomputing the conv.
  m.def("dwconv_bn_act(Tensor x, Tensor weight, Tensor gamma, Tensor beta, int stride, float eps, bool relu6) "
        "-> (Tensor, Tensor, Tensor)");
  // Gradients of dwconv_bn_act w.r.t. (x, weight, gamma, beta), recomputing the conv from x.
  m.def(
      "dwconv_bn_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor gamma, Tensor beta, Tensor mean, "
      "Tensor invstd, int stride, bool relu6) -> (Tensor, Tensor, Tensor, Tensor)");
  // Training-mode BatchNorm (batch statistics over all dims but 1) + optional residual + optional
  // ReLU6: y = act((x - mean) * invstd * gamma + beta [+ residual]). Returns y, the batch mean and
  // 1/sqrt(biased var + eps); the running statistics are the caller's to update. CPU kernel only
  // (channels_last is its fast layout); on other devices fastface.ops.bn_act runs the reference.
  m.def("bn_act(Tensor x, Tensor gamma, Tensor beta, Tensor? residual, float eps, bool relu6) "
        "-> (Tensor, Tensor, Tensor)");
  // Gradients of bn_act w.r.t. (x, gamma, beta) from the saved input x (the ReLU6 mask is
  // recomputed; with ReLU6 it needs the residual too), plus, when relu6 and a residual are given,
  // the residual's gradient (grad_y behind the mask); otherwise that output is empty (0 elements)
  // and the residual's gradient is grad_y itself.
  m.def(
      "bn_act_backward(Tensor grad_y, Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor invstd, "
      "Tensor? residual, bool relu6) -> (Tensor, Tensor, Tensor, Tensor)");
  // act(BN_x(x) + BN_r(r)): two training BNs (batch statistics, each its own gamma and beta) summed,
  // then ReLU6 (or none): the split model's "add" merge of two branch stems. Returns y and both
  // BNs' batch mean and 1/sqrt(biased var + eps) (x's, then r's). CPU kernel.
  m.def("bn_add_act(Tensor x, Tensor gamma, Tensor beta, Tensor r, Tensor r_gamma, Tensor r_beta, float eps, "
        "bool relu6) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its gradients w.r.t. (x, gamma, beta, r, r_gamma, r_beta) from the saved inputs.
  m.def(
      "bn_add_act_backward(Tensor grad_y, Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor invstd, "
      "Tensor r, Tensor r_gamma, Tensor r_beta, Tensor r_mean, Tensor r_invstd, bool relu6) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The split model's two branch stems (3x3 conv, padding 1, no bias, each over its modality's channels
  // of x: w_a's cin first, then w_b's) each through its own training BN, summed, then ReLU6 (or none):
  // the "add" merge at split = 1 with neither conv output stored. Returns y (channels_last) and both
  // BNs' batch mean and 1/sqrt(biased var + eps). CPU kernel.
  m.def("stems_bn_add_act(Tensor x, Tensor w_a, Tensor gamma_a, Tensor beta_a, Tensor w_b, Tensor gamma_b, "
        "Tensor beta_b, int stride, float eps, bool relu6) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Its gradients w.r.t. (w_a, gamma_a, beta_a, w_b, gamma_b, beta_b); x (the network input) gets none.
  m.def(
      "stems_bn_add_act_backward(Tensor grad_y, Tensor x, Tensor w_a, Tensor gamma_a, Tensor beta_a, Tensor mean_a, "
      "Tensor invstd_a, Tensor w_b, Tensor gamma_b, Tensor beta_b, Tensor mean_b, Tensor invstd_b, int stride, "
      "bool relu6) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The batch statistics of bn_act alone (mean, 1/sqrt(biased var + eps) per channel over every dim
  // but 1), for consumers that normalise on the fly (dwconv_forward's prologue). CPU kernel.
  m.def("bn_stats(Tensor x, float eps) -> (Tensor, Tensor)");
  // bn_act's output with the batch statistics given (reduced by x's producer, dwconv_forward_stats):
  // act((x - mean) * invstd * gamma + beta), one pass. CPU kernel.
  m.def("bn_act_apply(Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor invstd, bool relu6) -> Tensor");
  // Depthwise 3 x 3 conv (weight C x 1 x 3 x 3, padding 1, stride 1 or 2, no bias), optionally of
  // a = relu6((x - mean) * scale + beta) (per channel: a training BN + ReLU6 applied on the fly, as
  // bn_act computes it, never stored). CPU kernel (channels_last is its fast layout).
  m.def("dwconv_forward(Tensor x, Tensor weight, int stride, int padding, Tensor? mean=None, Tensor? scale=None, "
        "Tensor? beta=None) -> Tensor");
  // dwconv_forward and the batch statistics of its output z for a training BN on it (mean, 1/sqrt(biased
  // var + eps) per channel, as bn_stats computes them), reduced from the outputs as they are written.
  m.def("dwconv_forward_stats(Tensor x, Tensor weight, int stride, int padding, Tensor? mean=None, "
        "Tensor? scale=None, Tensor? beta=None, float eps=1e-05) -> (Tensor, Tensor, Tensor)");
  // Its gradients w.r.t. the conv's input (a, or x without the prologue) and its weight, in one
  // pass; with sums=True (prologue only) the first output is g = grad_a behind the ReLU6 mask (the
  // gradient w.r.t. the BN's output) and the third, as float64 2 x C, sum(g) and sum(g * (x - mean)):
  // the reductions of the BN backward (bn_act_backward_sums, expand_dwconv). Without sums the third
  // output is empty.
  m.def("dwconv_backward(Tensor grad_out, Tensor x, Tensor weight, int stride, int padding, Tensor? mean=None, "
        "Tensor? scale=None, Tensor? beta=None, bool sums=False) -> (Tensor, Tensor, Tensor)");
  // bn_act_backward (no residual) given its per-channel sums (dwconv_backward's third output): one
  // pass instead of two. Returns (grad_x, grad_gamma, grad_beta).
  m.def("bn_act_backward_sums(Tensor grad_y, Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor invstd, "
        "Tensor sums, bool relu6) -> (Tensor, Tensor, Tensor)");
  // Per-channel mean (float64, C) and within-group covariance (float64, groups x C/groups x C/groups,
  // biased) of x over every dim but 1: the moments that give a 1x1 conv's output statistics without
  // a pass over that output (fastface.ops.expand_dwconv). CPU kernel (channels_last: one pass).
  m.def("channel_moments(Tensor x, int groups) -> (Tensor, Tensor)");
  // y - x A - c per pixel with A block-diagonal (groups x C/groups x C/groups) and c (C): the
  // correction expand_dwconv's backward adds to the 1x1 conv's input gradient. CPU kernel.
  m.def("grouped_linear_sub(Tensor y, Tensor x, Tensor a, Tensor c) -> Tensor");
  // A 1x1 conv (groups 1, no bias): conv1x1_forward = conv2d(x, weight); conv1x1_backward in one pass
  // over grad_out: grad_x = grad_out w - x a - c per pixel (a: Cin x Cin and c: Cin optional,
  // expand_dwconv's BN correction), grad_w = grad_out^T x; masked-off outputs are empty. CPU kernels
  // (channels_last).
  m.def("conv1x1_forward(Tensor x, Tensor weight) -> Tensor");
  m.def("conv1x1_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? a=None, Tensor? c=None, "
        "bool[2] output_mask=[True, True]) -> (Tensor, Tensor)");
  // BatchNorm's running-statistics update after a training forward, in place, as nn.BatchNorm2d
  // does (momentum < 0: nn's None, a cumulative average), from the batch mean and invstd of
  // channels [offset, offset + C). CPU kernel; the model's Python path serves other devices.
  m.def("bn_update_running(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked, "
        "Tensor mean, Tensor invstd, int offset, float eps, float unbias, float momentum) -> ()");
  // One step of the FastFace LR scheduler: updates the float64 scheduler state in place from
  // the batch loss and writes base_lrs * factor * warmup into lrs, all on the loss's device.
  m.def(
      "fastface_sched_step(Tensor(a!) state, Tensor(b!) lrs, Tensor loss, Tensor base_lrs, float w1, float w2, "
      "float w3, float alpha, float lambd, int patience, float delta, int max_halvings, int warmup_steps) -> ()");
}
