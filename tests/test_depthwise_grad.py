"""The tap-sum weight gradient for small depthwise convs: same gradients as PyTorch's own, used only where it should
be, and gone after the block."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from hwprune.depthwise_grad import small_depthwise_grads


def _grads(conv: nn.Conv2d, x: torch.Tensor, patched: bool) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    if patched:
        with small_depthwise_grads(conv):
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


def test_used_only_on_depthwise_convs_with_inputs_smaller_than_the_kernel() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 3, padding=1),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4))
    small, large = torch.randn(2, 8, 2, 2, requires_grad=True), torch.randn(2, 8, 5, 5, requires_grad=True)
    with small_depthwise_grads(model):
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
    with pytest.raises(RuntimeError), small_depthwise_grads(conv):
        raise RuntimeError("training failed")
    assert "forward" not in vars(conv)
