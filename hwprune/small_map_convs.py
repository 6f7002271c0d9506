"""Faster training on small feature maps, where oneDNN (PyTorch's CPU convolution library) is slow.

Near the end of a network for 32x32 inputs the feature maps are 4x4 to 1x1, and oneDNN's training kernels are slow on
them. Measured on a 2-core Zen 3 host, 128 images:

- The weight gradient of a depthwise conv whose input is smaller than its kernel (a 3x3 depthwise conv on 2x2 maps,
  512 channels): 16-24 ms, against 0.5-1 ms summing the nine kernel taps directly. On 3x3 and larger maps oneDNN is
  the faster one. Only that gradient is replaced; the forward and the input gradient still come from oneDNN.
- A 1x1 convolution (forward and both gradients) on maps of 16 pixels or fewer: a matrix product over the
  channels-last buffer takes 0.36-0.88 of oneDNN's time (0.4-0.5 on 1x1 maps, as in squeeze-excite); at 8x8 they
  are even, and on larger maps oneDNN wins.

A training step of the demo's MobileNetV2-like model (batch 128, two threads, interleaved): 197 ms plain, 130 ms with
the depthwise gradient, 108 ms with both (1.82x). Only the order of sums changes: the results equal PyTorch's to
float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# 1x1 convolutions on maps of at most this many pixels run as matrix products (see the module docstring)
MATMUL_MAX_PIXELS = 16


class _SmallDepthwiseConv(torch.autograd.Function):
    """conv2d for a depthwise conv (groups == in == out channels, zero padding), weight gradient by kernel taps."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):  # noqa: D102 (torch's signature)
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0],
                weight.shape[0], [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = tap_weight_grad(x, grad_out, weight.shape[2:], stride, padding, dilation).view_as(weight)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def tap_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """Depthwise weight gradient, ``(channels, kh * kw)``: for each kernel tap, the input window it reads times the
    output gradient, summed over batch and positions."""
    ho, wo = grad_out.shape[2:]
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    taps = []
    for a in range(kernel[0]):
        for b in range(kernel[1]):
            r, c = a * dilation[0], b * dilation[1]
            window = padded[:, :, r: r + (ho - 1) * stride[0] + 1: stride[0],
                            c: c + (wo - 1) * stride[1] + 1: stride[1]]
            taps.append((window * grad_out).sum((0, 2, 3)))
    return torch.stack(taps, 1)


def _pixels_last(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N*H*W, C)``: a view when ``t`` is channels-last, a copy otherwise."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class _MatmulPointwiseConv(torch.autograd.Function):
    """A 1x1, stride-1, ungrouped conv2d as matrix products over pixels, in both directions."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        n, _, h, w = x.shape
        cout = weight.shape[0]
        # written into a fresh channels-last tensor: an output that were a view of a temporary could not be
        # modified in place by the next layer (an inplace ReLU)
        out = torch.empty((n, cout, h, w), dtype=x.dtype, memory_format=torch.channels_last)
        flat = out.permute(0, 2, 3, 1).view(-1, cout)
        w2 = weight.reshape(cout, -1).t()
        if bias is not None:
            torch.addmm(bias, _pixels_last(x), w2, out=flat)
        else:
            torch.mm(_pixels_last(x), w2, out=flat)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, weight = ctx.saved_tensors
        n, cin, h, w = x.shape
        cout = weight.shape[0]
        g = _pixels_last(grad_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.reshape(cout, cin)).view(n, h, w, cin).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ _pixels_last(x)).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def _is_plain(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
            and "forward" not in vars(m))


def _is_depthwise(m: nn.Conv2d) -> bool:
    return m.groups == m.in_channels == m.out_channels


def _is_pointwise(m: nn.Conv2d) -> bool:
    return m.groups == 1 and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0)


def _forward_for(conv: nn.Conv2d) -> Callable[[torch.Tensor], torch.Tensor]:
    default = nn.Conv2d.forward.__get__(conv)
    depthwise = _is_depthwise(conv)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.dtype not in (torch.float32, torch.float64) or x.device.type != "cpu":
            return default(x)
        if depthwise and (x.shape[2] < conv.kernel_size[0] or x.shape[3] < conv.kernel_size[1]):
            return _SmallDepthwiseConv.apply(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation)
        if not depthwise and x.shape[2] * x.shape[3] <= MATMUL_MAX_PIXELS:
            return _MatmulPointwiseConv.apply(x, conv.weight, conv.bias)
        return default(x)
    return forward


@contextlib.contextmanager
def small_map_convs(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s depthwise and 1x1 ``nn.Conv2d`` layers take the faster paths above whenever
    their input map is small enough; their forwards are restored afterwards (export and pickling see the plain
    modules)."""
    convs = [m for m in model.modules() if _is_plain(m) and (_is_depthwise(m) or _is_pointwise(m))]
    for conv in convs:
        conv.forward = _forward_for(conv)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward
