"""Tiny models for the pruning tests: a residual net with a downsampling shortcut, a depthwise block
and squeeze-excite (the couplings DepGraph must keep), and one with a grouped convolution."""
from __future__ import annotations

import torch
import torch.nn as nn


def cbr(cin: int, cout: int, stride: int = 1, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = cbr(cin, cout, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.conv2(self.conv1(x)) + self.down(x))


class InvertedSE(nn.Module):
    """1x1 expand, depthwise 3x3, squeeze-excite, 1x1 project, residual add."""

    def __init__(self, c: int, e: int = 2):
        super().__init__()
        h = c * e
        self.expand = cbr(c, h, k=1)
        self.dw = cbr(h, h, groups=h)
        self.se_reduce = nn.Conv2d(h, 8, 1)
        self.se_expand = nn.Conv2d(8, h, 1)
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.dw(self.expand(x))
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        return x + self.project(y * s)


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 4, in_chans: int = 3, width: int = 16):
        super().__init__()
        w = width
        self.stem = cbr(in_chans, w)
        self.block1 = Basic(w, w)
        self.block2 = Basic(w, 2 * w, stride=2)
        self.block3 = InvertedSE(2 * w)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class GroupedNet(nn.Module):
    def __init__(self, num_classes: int = 4, in_chans: int = 3):
        super().__init__()
        self.stem = cbr(in_chans, 16)
        self.grouped = cbr(16, 32, groups=4)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.grouped(self.stem(x)).mean((2, 3)))
