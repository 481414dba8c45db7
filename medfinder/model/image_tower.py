"""The 3D image tower: a backbone's last feature map, pooled to one vector per volume.

``feature_map`` is kept apart from pooling so that evidence can ask *where* in a scan the features
that matched lie (``medfinder.evidence``), with the same weights that made the vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..transforms.preprocess import PreprocessConfig
from .config import ImageTowerConfig

_RESNET_BLOCKS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet10": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


class CoordinateChannels(nn.Module):
    """Appends x, y, z coordinate channels in [-1, 1] to the input (CoordConv).

    Reports say *right* lower lobe or *left* effusion; a globally pooled CNN is nearly blind to
    where a feature sits, so the stem gets the position explicitly. No left-right flips are
    used in training for the same reason.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = x.shape
        axes = [torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype) for n in spatial]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        return torch.cat([x, grid.unsqueeze(0).expand(b, -1, *spatial)], dim=1)


class ImageTower(nn.Module):
    """A 3D backbone returning one feature vector per volume (B, C, x, y, z) -> (B, dim).

    Args:
        config: the tower's section of the model config.
        preprocess: the model's preprocessing (input channels and, for a ViT, the input size).
    """

    def __init__(self, config: ImageTowerConfig, preprocess: PreprocessConfig) -> None:
        super().__init__()
        self.coordinates = CoordinateChannels() if config.coordinates else None
        in_channels = preprocess.in_channels + (3 if self.coordinates is not None else 0)
        self.kind = config.backbone
        if config.backbone in _RESNET_BLOCKS:
            self.backbone, self.map_channels = _monai_resnet(config, in_channels)
        elif config.backbone == "i3resnet152":
            from .i3resnet import I3ResNet

            self.backbone = I3ResNet.resnet152(in_channels)
            self.map_channels = self.backbone.out_channels
        else:  # vit
            self.backbone = _monai_vit(config, preprocess, in_channels)
            self.map_channels = config.hidden_size
        # Pooling of the last feature map: "avg" (plain ResNet), "max", or "avgmax" (both,
        # concatenated: small findings such as a nodule fire in a few positions, which an
        # average dilutes). ``pool_grid`` pools each of a few regions separately, e.g. [2, 1, 2]
        # = right/left x upper/lower, so "right lower lobe" has its own features.
        self.pooling = config.pooling
        self.pool_grid = config.pool_grid
        if self.pooling not in ("avg", "max", "avgmax") or min(self.pool_grid) < 1:
            raise ModelError(
                f"Image pooling {self.pooling!r} with grid {list(self.pool_grid)} is not supported; "
                "use 'avg', 'max' or 'avgmax' with three positive grid sizes."
            )
        self.dim = self.map_channels
        if self.kind != "vit":
            regions = self.pool_grid[0] * self.pool_grid[1] * self.pool_grid[2]
            self.dim *= regions * (2 if self.pooling == "avgmax" else 1)
        if config.frozen:
            self.requires_grad_(False)
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResNet stage's activations in the backward pass instead of keeping them
        (``torch.utils.checkpoint``): a large tower trains in less memory for about a third more compute.
        Only while training with gradients; BatchNorm running statistics are updated once more by the
        recomputation (a second step of their moving average)."""
        if enabled and self.kind == "vit":
            raise ModelError("Activation checkpointing is implemented for the ResNet and I3ResNet towers, not the ViT.")
        self.activation_checkpointing = enabled
        if self.kind == "i3resnet152":
            self.backbone.activation_checkpointing = enabled

    @property
    def has_feature_map(self) -> bool:
        """Whether the tower keeps a spatial feature map (the CNNs) rather than tokens (the ViT)."""
        return self.kind != "vit"

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, map_channels, x', y', z'), in the input's RAS axis order."""
        if self.coordinates is not None:
            x = self.coordinates(x)
        if self.kind == "i3resnet152":
            return self.backbone(x)
        net = self.backbone
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = run_stage(stage, x, self.activation_checkpointing)
        return x

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(B, dim) from a feature map, as ``forward`` pools it."""
        pooled = []
        if self.pooling in ("avg", "avgmax"):
            pooled.append(F.adaptive_avg_pool3d(features, self.pool_grid).flatten(1))
        if self.pooling in ("max", "avgmax"):
            pooled.append(F.adaptive_max_pool3d(features, self.pool_grid).flatten(1))
        return torch.cat(pooled, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "vit":
            if self.coordinates is not None:
                x = self.coordinates(x)
            tokens, _ = self.backbone(x)
            return tokens.mean(dim=1)
        return self.pool(self.feature_map(x))


def run_stage(stage: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """One backbone stage, its activations recomputed in the backward pass when ``checkpointed``
    (and gradients are being recorded)."""
    if checkpointed and stage.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(stage, x, use_reentrant=False)
    return stage(x)


def _monai_resnet(config: ImageTowerConfig, in_channels: int) -> tuple[nn.Module, int]:
    from monai.networks.nets import ResNet

    block, layers = _RESNET_BLOCKS[config.backbone]
    widths = list(config.widths)
    # "instance" needs its affine weights (MONAI's initialisation sets them); it does not depend on
    # the batch, so a tower trained with DDP computes the same however a global batch is split.
    norm: str | tuple = ("instance", {"affine": True}) if config.norm == "instance" else config.norm
    net = ResNet(
        block=block,
        layers=list(config.layers or layers),
        block_inplanes=widths,
        spatial_dims=3,
        n_input_channels=in_channels,
        conv1_t_size=config.stem_kernel,
        conv1_t_stride=config.stem_stride,
        no_max_pool=not config.max_pool,
        feed_forward=False,
        norm=norm,
    )
    if config.norm != "batch":
        _renormalise(net, norm)
    return net, widths[-1] * (4 if block == "bottleneck" else 1)


def _renormalise(net: nn.Module, norm: str | tuple) -> None:
    """Give every block the config's normalisation. MONAI 1.6's ResNet passes ``norm`` to its stem
    only: its blocks and shortcuts keep BatchNorm whatever is asked."""
    from monai.networks.layers.utils import get_norm_layer

    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm3d):
                setattr(parent, name, get_norm_layer(name=norm, spatial_dims=3, channels=child.num_features))


def _monai_vit(config: ImageTowerConfig, preprocess: PreprocessConfig, in_channels: int) -> nn.Module:
    from monai.networks.nets import ViT

    if not preprocess.pad_to_shape:
        raise ModelError("A ViT image tower embeds patches of a fixed grid, so its preprocessing must pad every "
                         "scan to its shape; set pad_to_shape to true or use a CNN backbone.")
    try:
        import einops  # noqa: F401  (MONAI's attention blocks need it)
    except ImportError:
        raise ModelError("The ViT image backbone needs the einops package (pip install einops).") from None
    return ViT(
        in_channels=in_channels,
        img_size=preprocess.shape,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        mlp_dim=config.mlp_dim,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        proj_type="conv",
        classification=False,  # True would return class logits, not an embedding
        spatial_dims=3,
    )
