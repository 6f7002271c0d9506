"""Built-in model families (no torchvision): MobileNetV2-like and ResNet-like classifiers at any input size."""

from __future__ import annotations

from torch import nn


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, optional squeeze-excite, 1x1 project, residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool = False) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden))
        if se:
            layers.append(SqueezeExcite(hidden))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al., 2018), width- and input-size-configurable.

    ``stem_stride`` is 2 in the original; small inputs may keep more resolution with 1.
    """

    # expansion, channels, repeats, stride
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, width: float = 1.0, stem_stride: int = 2,
                 settings: tuple[tuple[int, int, int, int], ...] | None = None, last_channels: int = 1280,
                 se: bool = False) -> None:
        super().__init__()
        settings = settings or self.SETTINGS
        stem = max(8, int(32 * width))
        layers: list[nn.Module] = [_conv_bn(3, stem, 3, stem_stride)]
        cin = stem
        for i, (t, c, n, s) in enumerate(settings):
            cout = max(8, int(c * width))
            for j in range(n):
                stride = s if j == 0 else 1
                layers.append(InvertedResidual(cin, cout, stride, t, se=se and i >= 2))
                cin = cout
        last = max(cin, int(last_channels * max(1.0, width)))
        layers.append(_conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet of basic blocks (He et al., 2016)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 2,
                 stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stem_stride, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                stages.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


# Demo-sized settings for 32x32 inputs: small enough to train in about a minute on two cores.
# (PyTorch's CPU depthwise-conv backward is slow, which is what bounds the demo's training time.)
MOBILENET_TINY = ((1, 16, 1, 1), (4, 32, 2, 2), (4, 64, 2, 2), (4, 128, 2, 2), (4, 160, 1, 1))


def mobilenet_tiny(num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(num_classes, stem_stride=2, settings=MOBILENET_TINY, last_channels=256, se=True)


def resnet_tiny(num_classes: int = 10) -> ResNet:
    return ResNet(num_classes, widths=(16, 32, 64), blocks=2, stem_stride=2)


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    """The full-size MobileNetV2 (3.5 M parameters, 300 M MACs at 224x224)."""
    return MobileNetV2(num_classes)
