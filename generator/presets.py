"""Diffusion-model presets: network shape and training recipe, as plain frozen data.

tiny   ~160k parameters, 2 resolutions, no attention. Trains in about a minute on 2 CPU cores: tests, demo.
small  the best model about one CPU hour buys (2 busy cores, ~1.3 s per step of 64). Sample quality is the
       binding constraint at laptop scale (an early probe: speckled backgrounds after 15 minutes of a
       1.1M-parameter UNet without EMA), so the hour goes to: a 1.1M-parameter UNet whose self-attention
       sits only at 8x8 (cheap there, global context for the garment shape), a long, annealed run (cosine
       decay to zero, which removes most of the late-training noise that shows up as speckle), and an EMA whose
       length grows with training (EDM's rampup) so that a short run still averages over its last stretch.
paper  EDM's DDPM++ configuration for 32x32 (Karras et al. 2022, config F / "ddpmpp"): 3 resolutions of 256
       channels, 4 residual blocks per resolution, attention at 16x16, scale-shift
       time conditioning, dropout 0.13, batch 512, Adam lr 1e-3 with a 10 Mimg ramp-up, EMA half-life
       0.5 Mimg, 200 Mimg in total. A GPU preset: 67M parameters in diffusers blocks (EDM's own: 56M).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vaegen.errors import VaegenError


@dataclass(frozen=True)
class DMPreset:
    name: str
    # network (diffusers UNet2DModel arguments)
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    norm_num_groups: int
    attention_head_dim: int = 8
    dropout: float = 0.0
    resnet_time_scale_shift: str = "default"
    # training recipe
    batch_size: int = 64
    lr: float = 1e-3
    lr_warmup_steps: int = 100
    lr_decay: str = "cosine"        # "cosine" to 0 at max_steps, or "constant" (EDM)
    max_steps: int = 1000
    ema_halflife_images: int = 10_000
    ema_rampup_ratio: float = 0.05   # EMA half-life <= this fraction of the images seen so far (EDM)
    weight_decay: float = 0.0
    checkpoint_every: int = 500
    log_every: int = 25

    def unet_kwargs(self, channels: int, image_size: int = 32) -> dict:
        """Arguments of `diffusers.UNet2DModel` for this preset and a dataset's channel count."""
        return dict(
            sample_size=image_size, in_channels=channels, out_channels=channels,
            block_out_channels=self.block_out_channels, down_block_types=self.down_block_types,
            up_block_types=self.up_block_types, layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups, attention_head_dim=self.attention_head_dim,
            dropout=self.dropout, resnet_time_scale_shift=self.resnet_time_scale_shift,
            # EDM conditions on c_noise = ln(sigma) / 4 (a float); positional embedding like EDM's DDPM++.
            time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
        )

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, DMPreset] = {
    "tiny": DMPreset(
        name="tiny", block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
        batch_size=32, lr=2e-3, lr_warmup_steps=20, max_steps=150, ema_halflife_images=2_000,
        ema_rampup_ratio=0.1, checkpoint_every=50, log_every=10,
    ),
    "small": DMPreset(
        name="small", block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
        batch_size=64, lr=2e-3, lr_warmup_steps=100, max_steps=2800, ema_halflife_images=20_000,
        ema_rampup_ratio=0.1, checkpoint_every=200, log_every=20,
    ),
    "paper": DMPreset(
        name="paper", block_out_channels=(256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=4, norm_num_groups=32,
        attention_head_dim=64, dropout=0.13, resnet_time_scale_shift="scale_shift",
        batch_size=512, lr=1e-3, lr_warmup_steps=19_531, lr_decay="constant", max_steps=390_625,
        ema_halflife_images=500_000, ema_rampup_ratio=0.05, checkpoint_every=5_000, log_every=100,
    ),
}


def get_preset(name: str) -> DMPreset:
    if name not in PRESETS:
        raise VaegenError(f"unknown DM preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
