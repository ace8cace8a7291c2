"""The image network: a 2D residual U-Net with SE + CBAM in every stage and prompt fusion.

``UNet.forward(image, film)`` is the seam that export and runtime use: it takes the packed
FiLM/CBN vector (see :mod:`promptseg.model.film` for the layout), never text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from promptseg.model.blocks import Stage
from promptseg.model.film import FUSIONS, BottleneckFusion, FilmGenerator, film_layout, unpack


@dataclass
class UNetConfig:
    """Everything needed to rebuild the image network (stored in checkpoints)."""

    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    resolution: int = 128
    in_channels: int = 1
    fusion: str = "film+cbn"
    se: bool = True
    cbam: bool = True
    se_reduction: int = 8
    dropout: float = 0.1
    concat_dim: int = 64

    def __post_init__(self) -> None:
        if len(self.widths) != 4:
            raise ValueError(f"widths must list 4 encoder stages, got {self.widths}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; valid: {list(FUSIONS)}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be divisible by 8, got {self.resolution}")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "paper": {"widths": [64, 128, 256, 512], "resolution": 256},
    "small": {"widths": [16, 32, 64, 128], "resolution": 128},
    "tiny": {"widths": [4, 8, 8, 16], "resolution": 32},
}


def preset_config(name: str, **overrides) -> UNetConfig:
    """A :class:`UNetConfig` from a preset name, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return UNetConfig(**{**PRESETS[name], **overrides})


class UNet(nn.Module):
    """(B, 1, H, W) image + (B, P) packed prompt vector -> (B, 1, H, W) logits."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        common = {"se": config.se, "cbam": config.cbam, "se_reduction": config.se_reduction}
        self.encoder = nn.ModuleList()
        in_ch = config.in_channels
        for width in w:
            self.encoder.append(Stage(in_ch, width, dropout=config.dropout, **common))
            in_ch = width
        self.pool = nn.MaxPool2d(2)
        self.layout = film_layout(config.fusion, w[-1], w[0], config.concat_dim)
        self.fusion = BottleneckFusion(
            w[-1], config.fusion, config.concat_dim, config.se, config.se_reduction
        )
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in (2, 1, 0):
            self.up.append(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2))
            cond = config.fusion == "film+cbn" and i == 0
            self.decoder.append(Stage(2 * w[i], w[i], conditional=cond, **common))
        self.head = nn.Conv2d(w[0], 1, 1)

    @property
    def film_dim(self) -> int:
        """Length P of the packed prompt vector."""
        return sum(size for _, size in self.layout)

    def forward(self, image: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(
                f"image must be (B, {self.config.in_channels}, H, W), got {tuple(image.shape)}"
            )
        if image.shape[0] != film.shape[0]:
            raise ValueError(f"batch mismatch: image {image.shape[0]} vs film {film.shape[0]}")
        seg = unpack(film, self.layout)
        skips = []
        x = image
        for i, stage in enumerate(self.encoder):
            if i:
                x = self.pool(x)
            x = stage(x)
            skips.append(x)
        x = self.fusion(x, seg)
        for up, stage, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = torch.cat([up(x), skip], dim=1)
            if stage.conv.conditional:
                x = stage(x, seg["dec_gamma"], seg["dec_beta"])
            else:
                x = stage(x)
        return self.head(x)


class PromptSegModel(nn.Module):
    """Trainable part of the product: FiLM generator + UNet.

    The frozen text encoder stays outside (prompt embeddings are computed once per distinct
    prompt); ``forward(image (B,1,H,W), embedding (B,E)) -> logits (B,1,H,W)``.
    """

    def __init__(self, config: UNetConfig, embed_dim: int, film_hidden: int = 256) -> None:
        super().__init__()
        self.unet = UNet(config)
        self.film = FilmGenerator(embed_dim, self.unet.layout, hidden=film_hidden)
        self.embed_dim = embed_dim

    def forward(self, image: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.unet(image, self.film(embedding))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(unet: UNet, resolution: int | None = None) -> int:
    """Multiply-accumulate based FLOPs (2 x MACs) of one forward pass at batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    res = resolution or unet.config.resolution
    image = torch.zeros(1, unet.config.in_channels, res, res)
    film = torch.ones(1, unet.film_dim)
    was_training = unet.training
    unet.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(image, film)
    unet.train(was_training)
    return int(counter.get_total_flops())
