"""Tests for promptseg.model: blocks, attention registry, FiLM layout, U-Net, presets."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from promptseg.model.blocks import (
    ATTENTION,
    ConditionalBatchNorm,
    ResidualDoubleConv,
    SpatialAttention,
    SqueezeExcitation,
    Stage,
    create_attention,
)
from promptseg.model.film import (
    FUSIONS,
    BottleneckFusion,
    FilmGenerator,
    film_layout,
    unpack,
)
from promptseg.model.unet import (
    ALWAYS_PRESENT_LOGIT,
    PresenceHead,
    PromptSegModel,
    UNet,
    UNetConfig,
    count_flops,
    count_parameters,
    preset_config,
)

EMBED_DIM = 384

# (B, C, H, W): tiny channel counts, 32-64 px, square and not, batch 1 included.
SHAPES = [(2, 4, 32, 32), (1, 8, 64, 64), (3, 16, 32, 48)]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


# --------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "make",
    [
        lambda c: SqueezeExcitation(c),
        lambda c: SqueezeExcitation(c, reduction=2),
        lambda c: SpatialAttention(c),
        lambda c: SpatialAttention(c, kernel_size=3),
    ],
    ids=["se", "se-r2", "cbam", "cbam-k3"],
)
def test_attention_blocks_keep_shape(make, shape):
    x = torch.randn(shape)
    y = make(shape[1])(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    # Both blocks rescale features by a sigmoid gate in (0, 1).
    assert (y.abs() <= x.abs() + 1e-6).all()


def test_attention_blocks_reject_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        SqueezeExcitation(8, reduction=0)
    with pytest.raises(ValueError, match="odd, got 4"):
        SpatialAttention(8, kernel_size=4)


@pytest.mark.parametrize("shape", SHAPES)
def test_conditional_batchnorm_applies_per_sample_scale_and_shift(shape):
    b, c, h, w = shape
    cbn = ConditionalBatchNorm(c)
    x = torch.randn(shape) * 3 + 1
    gamma, beta = torch.rand(b, c) + 0.5, torch.randn(b, c)
    y = cbn(x, gamma, beta)
    assert y.shape == x.shape
    normed = nn.functional.batch_norm(x, None, None, training=True, eps=cbn.bn.eps)
    torch.testing.assert_close(y, normed * gamma[:, :, None, None] + beta[:, :, None, None])
    assert not any(p.requires_grad for p in cbn.parameters())  # no own affine


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_ch", [4, 12])
@pytest.mark.parametrize("conditional", [False, True])
def test_residual_double_conv_shapes(shape, out_ch, conditional):
    b, c, h, w = shape
    block = ResidualDoubleConv(c, out_ch, conditional=conditional)
    x = torch.randn(shape)
    if conditional:
        y = block(x, torch.ones(b, out_ch), torch.zeros(b, out_ch))
        with pytest.raises(ValueError, match="gamma and beta"):
            block(x)
    else:
        y = block(x)
    assert y.shape == (b, out_ch, h, w)


def test_conditional_double_conv_depends_on_gamma_beta():
    block = ResidualDoubleConv(4, 8, conditional=True)
    x = torch.randn(2, 4, 32, 32)
    y1 = block(x, torch.ones(2, 8), torch.zeros(2, 8))
    y2 = block(x, torch.full((2, 8), 2.0), torch.full((2, 8), 0.5))
    assert not torch.allclose(y1, y2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("se", "cbam"), list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("conditional", [False, True])
def test_stage_shapes(shape, se, cbam, conditional):
    b, c, h, w = shape
    stage = Stage(c, 8, se=se, cbam=cbam, dropout=0.1, conditional=conditional)
    assert isinstance(stage.se, SqueezeExcitation if se else nn.Identity)
    assert isinstance(stage.cbam, SpatialAttention if cbam else nn.Identity)
    x = torch.randn(shape)
    gb = (torch.ones(b, 8), torch.zeros(b, 8)) if conditional else (None, None)
    assert stage(x, *gb).shape == (b, 8, h, w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("se", [False, True])
def test_bottleneck_fusion_shapes_and_unit_rms(shape, fusion, se):
    b, c, h, w = shape
    concat_dim = 6
    fusion_block = BottleneckFusion(c, fusion, concat_dim, se, se_reduction=2)
    layout = film_layout(fusion, c, 4, concat_dim)
    film = torch.randn(b, sum(size for _, size in layout))
    y = fusion_block(torch.randn(shape), unpack(film, layout))
    assert y.shape == shape
    # L2 normalisation over channels times a scale initialised at sqrt(C): unit RMS per pixel.
    rms = y.pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=1e-4)


def test_bottleneck_fusion_rejects_unknown_fusion():
    with pytest.raises(ValueError, match="unknown fusion 'add'"):
        BottleneckFusion(8, "add", 4, True, 2)


# --------------------------------------------------------------------------- attention registry


@pytest.mark.parametrize(
    ("name", "kind"),
    [("se", SqueezeExcitation), ("cbam", SpatialAttention), (None, nn.Identity)],
)
def test_create_attention_registry(name, kind):
    block = create_attention(name, 8)
    assert type(block) is kind
    x = torch.randn(2, 8, 32, 32)
    assert block(x).shape == x.shape
    if name is None:
        assert torch.equal(block(x), x)


def test_create_attention_passes_kwargs():
    assert create_attention("se", 64, reduction=4).fc1.out_channels == 16
    assert create_attention("cbam", 8, kernel_size=3).conv.kernel_size == (3, 3)


@pytest.mark.parametrize("name", ["eca", "SE", ""])
def test_create_attention_unknown_lists_valid_names(name):
    with pytest.raises(ValueError) as info:
        create_attention(name, 8)
    message = str(info.value)
    assert repr(name) in message
    for valid in ATTENTION:
        assert valid in message


# --------------------------------------------------------------------------- FiLM layout


@pytest.mark.parametrize(
    ("fusion", "expected"),
    [
        ("concat", [("concat", 7)]),
        ("film", [("film_gamma", 16), ("film_beta", 16)]),
        (
            "film+cbn",
            [
                ("film_gamma", 16),
                ("film_beta", 16),
                ("cbn_gamma", 16),
                ("cbn_beta", 16),
                ("dec_gamma", 4),
                ("dec_beta", 4),
            ],
        ),
    ],
)
def test_film_layout_per_fusion(fusion, expected):
    assert film_layout(fusion, bottleneck=16, first=4, concat_dim=7) == expected


def test_film_layout_unknown_fusion():
    with pytest.raises(ValueError, match="valid"):
        film_layout("sum", 16, 4, 7)


def test_unpack_splits_in_layout_order():
    layout = film_layout("film+cbn", 3, 2, 5)
    film = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16)
    parts = unpack(film, layout)
    assert list(parts) == [name for name, _ in layout]
    assert torch.equal(parts["film_gamma"], film[:, 0:3])
    assert torch.equal(parts["cbn_beta"], film[:, 9:12])
    assert torch.equal(parts["dec_beta"], film[:, 14:16])


@pytest.mark.parametrize("shape", [(2, 15), (2, 17), (16,), (1, 2, 16)])
def test_unpack_rejects_wrong_shapes(shape):
    layout = film_layout("film+cbn", 3, 2, 5)  # P = 16
    with pytest.raises(ValueError, match=r"\(B, 16\)") as info:
        unpack(torch.zeros(shape), layout)
    assert str(tuple(shape)) in str(info.value)


# --------------------------------------------------------------------------- U-Net


UNET_CASES = list(itertools.product(FUSIONS, [False, True], [False, True], [32, 64]))


@pytest.mark.parametrize(("fusion", "se", "cbam", "res"), UNET_CASES)
def test_unet_output_shape(fusion, se, cbam, res):
    config = preset_config("tiny", fusion=fusion, se=se, cbam=cbam, resolution=res)
    unet = UNet(config)
    image = torch.rand(2, 1, res, res)
    film = torch.randn(2, unet.film_dim)
    logits, presence = unet(image, film)
    assert logits.shape == (2, 1, res, res)
    assert presence.shape == (2, 1)
    assert logits.dtype == presence.dtype == torch.float32
    unet.eval()
    with torch.no_grad():
        logits, presence = unet(image[:1], film[:1])
    assert logits.shape == (1, 1, res, res) and presence.shape == (1, 1)


@pytest.mark.parametrize(
    ("fusion", "expected"),
    [("concat", 64), ("film", 2 * 16), ("film+cbn", 4 * 16 + 2 * 4)],
)
def test_unet_film_dim(fusion, expected):
    assert UNet(preset_config("tiny", fusion=fusion)).film_dim == expected


def test_unet_rejects_bad_inputs():
    unet = UNet(preset_config("tiny"))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\), got \(2, 3, 32, 32\)"):
        unet(torch.zeros(2, 3, 32, 32), torch.zeros(2, unet.film_dim))
    with pytest.raises(ValueError, match="batch mismatch"):
        unet(torch.zeros(2, 1, 32, 32), torch.zeros(3, unet.film_dim))
    with pytest.raises(ValueError, match=f"\\(B, {unet.film_dim}\\)"):
        unet(torch.zeros(2, 1, 32, 32), torch.zeros(2, unet.film_dim + 1))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_different_film_vectors_give_different_outputs(fusion):
    unet = UNet(preset_config("tiny", fusion=fusion)).eval()
    image = torch.rand(1, 1, 32, 32).repeat(2, 1, 1, 1)
    film = torch.randn(2, unet.film_dim)
    with torch.no_grad():
        out = unet(image, film)[0]
    # At initialisation the prompt's influence is small after three decoder stages, but far
    # above float32 noise (identical film rows give identical outputs).
    assert (out[0] - out[1]).abs().max() > 1e-6
    with torch.no_grad():
        same = unet(image, film[:1].repeat(2, 1))[0]
    assert (same[0] - same[1]).abs().max() < 1e-7


def test_unet_returns_raw_logits_without_sigmoid():
    unet = UNet(preset_config("tiny")).eval()
    captured = {}
    unet.head.register_forward_hook(lambda m, i, o: captured.update(out=o))
    image, film = torch.rand(2, 1, 32, 32), torch.randn(2, unet.film_dim)
    with torch.no_grad():
        out = unet(image, film)[0]
        assert torch.equal(out, captured["out"])  # the head's 1x1 conv output is the result
        unet.head.bias.fill_(-10.0)
        low = unet(image, film)[0]
        unet.head.bias.fill_(10.0)
        high = unet(image, film)[0]
    # A sigmoid (or any squashing) would keep these inside (0, 1).
    assert low.max() < 0
    assert high.min() > 1


@pytest.mark.parametrize("fusion", ["film", "film+cbn"])
def test_film_generator_starts_as_identity(fusion):
    model = PromptSegModel(preset_config("tiny", fusion=fusion), EMBED_DIM, film_hidden=32)
    film = model.film(torch.randn(5, EMBED_DIM))
    parts = unpack(film, model.unet.layout)
    for name, value in parts.items():
        expected = torch.ones_like(value) if name.endswith("gamma") else torch.zeros_like(value)
        assert torch.equal(value, expected), name


def test_film_generator_concat_head_is_not_zero():
    gen = FilmGenerator(EMBED_DIM, [("concat", 8)], hidden=16)
    out = gen(torch.randn(3, EMBED_DIM))
    assert out.shape == (3, 8)
    assert out.abs().max() > 0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"widths": [4, 8, 16]}, "4 encoder stages"),
        ({"widths": [4, 8, 16, 32, 64]}, "4 encoder stages"),
        ({"fusion": "add"}, "unknown fusion 'add'"),
        ({"resolution": 60}, "divisible by 8, got 60"),
    ],
)
def test_unet_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**overrides)


def test_preset_config_unknown_name_and_overrides():
    with pytest.raises(ValueError, match="valid"):
        preset_config("huge")
    config = preset_config("small", fusion="film", resolution=64)
    assert config.widths == [16, 32, 64, 128]
    assert (config.fusion, config.resolution) == ("film", 64)
    assert UNetConfig(**config.to_dict()) == config


def test_count_parameters_by_hand():
    # SE(16, reduction 8): hidden max(2, 4) = 4; 16*4 + 4 + 4*16 + 16 = 148.
    assert count_parameters(SqueezeExcitation(16, reduction=8)) == 148
    # CBAM spatial: a 2 -> 1 channel 7x7 conv with bias.
    assert count_parameters(SpatialAttention(8)) == 2 * 49 + 1


@pytest.fixture(scope="module")
def preset_counts() -> dict[str, tuple[int, int]]:
    counts = {}
    for name in ("small", "paper"):
        unet = UNet(preset_config(name))
        counts[name] = (count_parameters(unet), count_flops(unet))
    return counts


def test_preset_sizes_positive_and_ordered(preset_counts):
    small, paper = preset_counts["small"], preset_counts["paper"]
    assert small[0] > 0 and small[1] > 0
    assert paper[0] > small[0] and paper[1] > small[1]


def test_count_flops_scales_with_pixels_and_restores_mode():
    unet = UNet(preset_config("tiny"))
    unet.train()
    f32, f64 = count_flops(unet, 32), count_flops(unet, 64)
    assert unet.training
    # Convolutions dominate and scale with the pixel count; SE layers on pooled vectors do not.
    assert f64 == pytest.approx(4 * f32, rel=0.02)
    assert count_flops(unet) == f32  # the tiny preset's own resolution is 32


def test_prompt_seg_model_wiring():
    model = PromptSegModel(preset_config("tiny"), EMBED_DIM, film_hidden=32).eval()
    emb = torch.randn(3, EMBED_DIM)
    film = model.film(emb)
    assert film.shape == (3, model.unet.film_dim)
    assert model.film.layout == model.unet.layout
    image = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        logits, presence = model(image, emb)
        expected = model.unet(image, model.film(emb))
    torch.testing.assert_close(logits, expected[0])
    torch.testing.assert_close(presence, expected[1])
    assert count_parameters(model) == count_parameters(model.unet) + count_parameters(model.film)


# --------------------------------------------------------------------------- presence head


def test_presence_logits_shape_and_prompt_dependence():
    unet = UNet(preset_config("tiny", presence_hidden=8)).eval()
    assert isinstance(unet.presence_head, PresenceHead)
    image = torch.rand(1, 1, 32, 32).repeat(3, 1, 1, 1)
    film = torch.randn(3, unet.film_dim)
    with torch.no_grad():
        _, presence = unet(image, film)
    assert presence.shape == (3, 1) and torch.isfinite(presence).all()
    assert presence[0] != presence[1]  # same image, other prompt: another answer


@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_is_decode_of_fuse_of_encode(fusion):
    unet = UNet(preset_config("tiny", fusion=fusion, presence_hidden=8)).eval()
    image, film = torch.rand(2, 1, 32, 32), torch.randn(2, unet.film_dim)
    with torch.no_grad():
        logits, presence = unet(image, film)
        skips = unet.encode(image)
        fused = unet.fuse(skips[-1], film)
        step_logits = unet.decode(fused, skips, film)
        step_presence = unet.presence(fused)
    assert [s.shape[-1] for s in skips] == [32, 16, 8, 4]
    assert torch.equal(logits, step_logits)
    assert torch.equal(presence, step_presence)
    with torch.no_grad():  # the presence head reads the pooled fused bottleneck and nothing else
        pooled = torch.cat([fused.mean(dim=(2, 3)), fused.amax(dim=(2, 3))], dim=1)
        torch.testing.assert_close(presence, unet.presence_head.mlp(pooled))


def test_model_without_presence_head_answers_always_present():
    unet = UNet(preset_config("tiny"))
    assert unet.config.presence_hidden == 0 and unet.presence_head is None
    assert not any("presence" in name for name, _ in unet.named_parameters())
    _, presence = unet(torch.rand(4, 1, 32, 32), torch.randn(4, unet.film_dim))
    assert torch.equal(presence, torch.full((4, 1), ALWAYS_PRESENT_LOGIT))
    assert torch.sigmoid(presence).min() > 0.999


@pytest.mark.parametrize("levels", [[], [0], [2, 3], [0, 1, 2, 3]])
def test_cbam_levels_place_spatial_attention(levels):
    unet = UNet(preset_config("tiny", cbam_levels=levels))
    encoder = [isinstance(s.cbam, SpatialAttention) for s in unet.encoder]
    decoder = [isinstance(s.cbam, SpatialAttention) for s in unet.decoder]  # levels 2, 1, 0
    assert encoder == [level in levels for level in range(4)]
    assert decoder == [level in levels for level in (2, 1, 0)]
    off = UNet(preset_config("tiny", cbam_levels=levels, cbam=False))
    assert not any(isinstance(m, SpatialAttention) for m in off.modules())


def test_default_preset_is_small_with_presence_and_coarse_cbam():
    default, small = preset_config("default"), preset_config("small")
    assert (default.widths, default.resolution) == (small.widths, small.resolution)
    assert default.cbam_levels == [2, 3] and default.presence_hidden == 64
    assert small.cbam_levels == [0, 1, 2, 3] and small.presence_hidden == 0
    unet = UNet(default)
    assert unet.presence_head.mlp[0].in_features == 2 * default.widths[-1]
    assert unet.presence_head.mlp[0].out_features == 64


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"cbam_levels": [4]}, r"cbam_levels must be among 0..3, got \[4\]"),
        ({"cbam_levels": [-1, 2]}, r"got \[-1, 2\]"),
        ({"presence_hidden": -1}, "presence_hidden must be >= 0, got -1"),
    ],
)
def test_unet_config_rejects_bad_presence_and_cbam_fields(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**overrides)
