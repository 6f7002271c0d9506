"""Faster convolutions on small maps (tap-sum depthwise weight gradients, 1x1 convs as matrix products): same outputs
and gradients as PyTorch's own, used only where they should be, and gone after the block."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from hwprune.small_map_convs import small_map_convs


def _grads(conv: nn.Conv2d, x: torch.Tensor, patched: bool) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    if patched:
        with small_map_convs(conv):
            out = conv(x)
    else:
        out = conv(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, conv.weight.grad, *((conv.bias.grad,) if conv.bias is not None else ())


@pytest.mark.parametrize("hw,kernel,stride,dilation,bias,channels_last", [
    (2, 3, 1, 1, False, True), (2, 3, 2, 1, True, False), (1, 3, 1, 1, False, True), (4, 5, 1, 1, True, True),
    (3, 5, 2, 1, False, False), (2, 3, 1, 2, False, True), (3, 3, 1, 1, False, True)])
def test_gradients_match_pytorch(hw, kernel, stride, dilation, bias, channels_last) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 24, kernel, stride, padding=dilation * (kernel // 2), dilation=dilation, groups=24, bias=bias)
    x = torch.randn(6, 24, hw, hw + 1)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for ours, theirs in zip(_grads(conv, x, True), _grads(conv, x, False), strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw,bias,channels_last,dtype", [
    (1, False, True, torch.float32), (2, True, True, torch.float32), (4, False, False, torch.float32),
    (3, True, False, torch.float64)])
def test_pointwise_outputs_and_gradients_match_pytorch(hw, bias, channels_last, dtype) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1, bias=bias).to(dtype)
    x = torch.randn(6, 24, hw, hw + 1, dtype=dtype)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for ours, theirs in zip(_grads(conv, x, True), _grads(conv, x, False), strict=True):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_pointwise_output_takes_an_inplace_activation() -> None:
    """The next layer's inplace ReLU (as in squeeze-excite) must work and back-propagate through the matmul path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(inplace=True), nn.Conv2d(16, 4, 1))
    x = torch.randn(3, 8, 1, 1, requires_grad=True)
    with small_map_convs(model):
        out = model(x)
        assert type(out.grad_fn).__name__ == "_MatmulPointwiseConvBackward"
        out.sum().backward()
    ours = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(ours, x.grad)


def test_pointwise_path_only_on_small_maps_and_plain_1x1_convs() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 1, groups=2),
                          nn.Conv2d(8, 8, 3, padding=1))
    small, large = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 8, 5, 4, requires_grad=True)
    with small_map_convs(model):
        assert type(model[0](small).grad_fn).__name__ == "_MatmulPointwiseConvBackward"
        assert type(model[0](large).grad_fn).__name__ != "_MatmulPointwiseConvBackward"  # 20 pixels
        for conv in model[1:]:
            assert type(conv(small).grad_fn).__name__ != "_MatmulPointwiseConvBackward"
    assert all("forward" not in vars(m) for m in model)


def test_used_only_on_depthwise_convs_with_inputs_smaller_than_the_kernel() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 3, padding=1),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4))
    small, large = torch.randn(2, 8, 2, 2, requires_grad=True), torch.randn(2, 8, 5, 5, requires_grad=True)
    with small_map_convs(model):
        assert type(model[0](small).grad_fn).__name__ == "_SmallDepthwiseConvBackward"
        assert type(model[0](large).grad_fn).__name__ != "_SmallDepthwiseConvBackward"
        out = model[1](small)  # not depthwise
        assert type(out.grad_fn).__name__ != "_SmallDepthwiseConvBackward"
        assert type(model[2](out).grad_fn).__name__ != "_SmallDepthwiseConvBackward"  # grouped, not depthwise
    # the plain modules are back: no instance forward left to break pickling or export
    assert all("forward" not in vars(m) for m in model)
    assert type(model[0](small).grad_fn).__name__ != "_SmallDepthwiseConvBackward"
    pickle.loads(pickle.dumps(model))


def test_restored_when_the_block_raises() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    with pytest.raises(RuntimeError), small_map_convs(conv):
        raise RuntimeError("training failed")
    assert "forward" not in vars(conv)
