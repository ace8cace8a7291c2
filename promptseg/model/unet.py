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
    # Resolution levels (0 = full, 3 = bottleneck) whose stages carry CBAM spatial attention.
    cbam_levels: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    # Hidden width of the presence head's MLP; 0 = no head (the image is always "present").
    presence_hidden: int = 0

    def __post_init__(self) -> None:
        if len(self.widths) != 4:
            raise ValueError(f"widths must list 4 encoder stages, got {self.widths}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; valid: {list(FUSIONS)}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be divisible by 8, got {self.resolution}")
        if any(level not in range(4) for level in self.cbam_levels):
            raise ValueError(f"cbam_levels must be among 0..3, got {self.cbam_levels}")
        if self.presence_hidden < 0:
            raise ValueError(f"presence_hidden must be >= 0, got {self.presence_hidden}")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "paper": {"widths": [64, 128, 256, 512], "resolution": 256},
    "small": {"widths": [16, 32, 64, 128], "resolution": 128},
    "tiny": {"widths": [4, 8, 8, 16], "resolution": 32},
    # The shipped model: `small` with a presence head and CBAM at the two coarsest levels
    # (the full-resolution spatial attention's backward dominated the CPU training step).
    "default": {
        "widths": [16, 32, 64, 128],
        "resolution": 128,
        "cbam_levels": [2, 3],
        "presence_hidden": 64,
    },
}

# Logit reported as presence by a network without a presence head: "always present".
ALWAYS_PRESENT_LOGIT = 30.0


def preset_config(name: str, **overrides) -> UNetConfig:
    """A :class:`UNetConfig` from a preset name, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return UNetConfig(**{**PRESETS[name], **overrides})


class PresenceHead(nn.Module):
    """Image-level "is the prompted target here?": fused bottleneck (B, C, h, w) -> logit (B, 1).

    Mean- and max-pooled channels (B, 2C) feed a two-layer MLP.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * channels, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, 1)
        )

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([fused.mean(dim=(2, 3)), fused.amax(dim=(2, 3))], dim=1)
        return self.mlp(pooled)


class UNet(nn.Module):
    """(B, 1, H, W) image + (B, P) packed prompt vector -> mask logits (B, 1, H, W) and presence
    logits (B, 1).

    The steps are also callable one by one (:meth:`encode`, :meth:`fuse`, :meth:`presence`,
    :meth:`decode`) so that training can run the prompt-independent encoder once per image and
    score several prompts on its output.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        common = {"se": config.se, "se_reduction": config.se_reduction}
        levels = set(config.cbam_levels) if config.cbam else set()
        self.encoder = nn.ModuleList()
        in_ch = config.in_channels
        for level, width in enumerate(w):
            self.encoder.append(
                Stage(in_ch, width, dropout=config.dropout, cbam=level in levels, **common)
            )
            in_ch = width
        self.pool = nn.MaxPool2d(2)
        self.layout = film_layout(config.fusion, w[-1], w[0], config.concat_dim)
        self.fusion = BottleneckFusion(
            w[-1], config.fusion, config.concat_dim, config.se, config.se_reduction
        )
        self.presence_head = (
            PresenceHead(w[-1], config.presence_hidden) if config.presence_hidden else None
        )
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in (2, 1, 0):
            self.up.append(nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2))
            cond = config.fusion == "film+cbn" and i == 0
            self.decoder.append(Stage(2 * w[i], w[i], conditional=cond, cbam=i in levels, **common))
        self.head = nn.Conv2d(w[0], 1, 1)

    @property
    def film_dim(self) -> int:
        """Length P of the packed prompt vector."""
        return sum(size for _, size in self.layout)

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) -> skip features per level, the last one the bottleneck."""
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(
                f"image must be (B, {self.config.in_channels}, H, W), got {tuple(image.shape)}"
            )
        skips = []
        x = image
        for i, stage in enumerate(self.encoder):
            if i:
                x = self.pool(x)
            x = stage(x)
            skips.append(x)
        return skips

    def fuse(self, bottleneck: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        """Prompt fusion: (B, Cb, h, w) + (B, P) -> (B, Cb, h, w)."""
        return self.fusion(bottleneck, unpack(film, self.layout))

    def presence(self, fused: torch.Tensor) -> torch.Tensor:
        """Presence logits (B, 1) of fused bottleneck features (B, Cb, h, w)."""
        if self.presence_head is None:
            # Derived from ``fused`` (not new_full): the ONNX output keeps its static shape
            # [N, 1] (a constant of dynamic shape exports with a symbolic second dim), and a
            # loss on it stays differentiable (zero gradient) when nothing else is trained.
            return fused.mean(dim=(1, 2, 3))[:, None] * 0.0 + ALWAYS_PRESENT_LOGIT
        return self.presence_head(fused)

    def decode(
        self, fused: torch.Tensor, skips: list[torch.Tensor], film: torch.Tensor
    ) -> torch.Tensor:
        """Mask logits (B, 1, H, W) from fused bottleneck, the encoder skips and the film."""
        seg = unpack(film, self.layout)
        x = fused
        for up, stage, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = torch.cat([up(x), skip], dim=1)
            if stage.conv.conditional:
                x = stage(x, seg["dec_gamma"], seg["dec_beta"])
            else:
                x = stage(x)
        return self.head(x)

    def forward(self, image: torch.Tensor, film: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.shape[0] != film.shape[0]:
            raise ValueError(f"batch mismatch: image {image.shape[0]} vs film {film.shape[0]}")
        skips = self.encode(image)
        fused = self.fuse(skips[-1], film)
        return self.decode(fused, skips, film), self.presence(fused)


class PromptSegModel(nn.Module):
    """Trainable part of the product: FiLM generator + UNet.

    The frozen text encoder stays outside (prompt embeddings are computed once per distinct
    prompt); ``forward(image (B,1,H,W), embedding (B,E))`` -> mask logits (B,1,H,W) and presence
    logits (B,1).
    """

    def __init__(self, config: UNetConfig, embed_dim: int, film_hidden: int = 256) -> None:
        super().__init__()
        self.unet = UNet(config)
        self.film = FilmGenerator(embed_dim, self.unet.layout, hidden=film_hidden)
        self.embed_dim = embed_dim

    def forward(
        self, image: torch.Tensor, embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
