"""Convolutional building blocks: residual double conv, SE, CBAM spatial attention, cond. BN."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al. 2018): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"SE needs channels>=1 and reduction>=1, got {channels}, {reduction}")
        hidden = max(channels // reduction, 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return x * w


class SpatialAttention(nn.Module):
    """CBAM spatial attention (Woo et al. 2018): a 7x7 conv over the channel mean and max maps.

    (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"CBAM kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


ATTENTION: dict[str, Callable[[int], nn.Module]] = {
    "se": SqueezeExcitation,
    "cbam": SpatialAttention,
}


def create_attention(name: str | None, channels: int, **kwargs) -> nn.Module:
    """Attention block by name ('se', 'cbam'); ``None`` gives identity."""
    if name is None:
        return nn.Identity()
    if name not in ATTENTION:
        raise ValueError(f"unknown attention {name!r}; valid names: {sorted(ATTENTION)}")
    return ATTENTION[name](channels, **kwargs)


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without own affine; scale and shift come per sample from the prompt.

    forward(x (B, C, H, W), gamma (B, C), beta (B, C)) -> (B, C, H, W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.channels = channels

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * gamma[:, :, None, None] + beta[:, :, None, None]


class ResidualDoubleConv(nn.Module):
    """(conv3x3, BN, LeakyReLU 0.1) x 2 with a 1x1 projection shortcut.

    With ``conditional=True`` the second norm is a :class:`ConditionalBatchNorm` and forward
    takes ``gamma``/``beta`` of shape (B, out_ch). (B, in_ch, H, W) -> (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, conditional: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.conditional = conditional
        self.bn2 = ConditionalBatchNorm(out_ch) if conditional else nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
        )
        self.act = nn.LeakyReLU(0.1)

    def forward(
        self,
        x: torch.Tensor,
        gamma: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.conv2(y)
        if self.conditional:
            if gamma is None or beta is None:
                raise ValueError("conditional ResidualDoubleConv needs gamma and beta (B, C)")
            y = self.bn2(y, gamma, beta)
        else:
            y = self.bn2(y)
        return self.act(y + self.shortcut(x))


class Stage(nn.Module):
    """Residual double conv, then SE, then CBAM spatial attention, then dropout.

    (B, in_ch, H, W) -> (B, out_ch, H, W).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        se: bool = True,
        cbam: bool = True,
        se_reduction: int = 8,
        dropout: float = 0.0,
        conditional: bool = False,
    ) -> None:
        super().__init__()
        self.conv = ResidualDoubleConv(in_ch, out_ch, conditional=conditional)
        self.se = create_attention(
            "se" if se else None, out_ch, **({"reduction": se_reduction} if se else {})
        )
        self.cbam = create_attention("cbam" if cbam else None, out_ch)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        gamma: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.drop(self.cbam(self.se(self.conv(x, gamma, beta))))
