"""VARSR model configuration and presets.

One typed object holds every architectural number of docs/MODEL.md §8 ("Configuration object"); the defaults are the
released VARSR model (docs/MODEL.md §0.1: d24, patch_nums 1…32 at 512 px, VQVAE ch160 v4096 z32). Everything geometric
is *derived* from it (image size, prefix length, RoPE grid, sequence length), never hard-coded to 512 / 1024 / 32.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

RELEASED_PATCH_NUMS = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
C2I_12_SCALE_PATCH_NUMS = (1, 2, 3, 4, 6, 9, 12, 16, 20, 24, 28, 32)


@dataclass
class VQVAEConfig:
    """VAR's multi-scale VQVAE (docs/MODEL.md §1.1)."""

    vocab_size: int = 4096  # V
    z_channels: int = 32  # Cvae
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2  # encoder; decoder uses num_res_blocks + 1
    dropout: float = 0.0
    beta: float = 0.25
    quant_conv_ks: int = 3
    quant_resi: float = 0.5  # phi(h) = (1-r)·h + r·conv(h)
    share_quant_resi: int = 4  # number of phi convs shared across scales
    # GroupNorm groups of every encoder/decoder norm: 32 as released (ch 160: 5-channel groups; at ch 32 one channel
    # per group, docs/EXPERIMENTS.md)
    norm_groups: int = 32
    # encoder/decoder conv init when training a tokenizer from scratch: "upstream" = PyTorch's default, as VAR's code
    # leaves it; "fan_in" = variance-preserving N(0, 1/fan_in), zero biases. Under the default each conv passes ~1/3
    # of its input's variance, so a narrow tokenizer's ~16-conv trunk attenuates the image (docs/EXPERIMENTS.md)
    init: Literal["upstream", "fan_in"] = "upstream"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class VARSRConfig:
    """Everything needed to build (VQVAE, VARSR transformer, refiner) and to sample from them."""

    name: str = "d24"
    variant: Literal["isr", "c2i"] = "isr"  # isr = VAR_RoPE (LR prefix); c2i = ImgVAR_RoPE (stage-1 pretraining)
    patch_nums: tuple[int, ...] = RELEASED_PATCH_NUMS
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)

    # transformer (docs/MODEL.md §2.1)
    depth: int = 24
    embed_dim: int | None = None  # C; None -> 64·depth
    num_heads: int | None = None  # H; None -> depth
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float | None = None  # None -> 0.1·depth/24
    attn_l2_norm: bool = True
    num_classes: int = 2  # isr: 0 = high quality, 1 = low quality; c2i: semantic classes (a null class is added)
    cond_drop_rate: float = 0.0  # c2i label dropout to the null class (CFG training)

    # LR prefix encoder (docs/MODEL.md §2.2): conv_in 3->ch[0], then per stage (ch_i->ch_i, ch_i->ch_{i+1} stride 2)
    # with ch_{n} = lr_encoder_hidden for the last stage, then conv_out lr_encoder_hidden->C
    lr_encoder_channels: tuple[int, ...] = (32, 128, 256, 512)
    # the last hidden width is its own number: the released code uses 1536 at every model width (it equals C only at
    # d24), so research checkpoints of other widths have a 1536-wide last stage
    lr_encoder_hidden: int = 1536

    # RoPE (docs/MODEL.md §2.6)
    rope_theta: float = 10000.0
    rope_grid: int | None = None  # None -> pn_last (32 for the released model)

    # diffusion refiner (docs/MODEL.md §3)
    refiner_width: int = 1024
    refiner_depth: int = 6
    refiner_train_steps: int = 1000
    refiner_sample_steps: int = 10
    refiner_scale: float = 0.6  # vae_scale: x0 = (R - e)/0.6
    refiner_schedule: str = "cosine"
    diffusion_batch_mul: int = 4

    # sampling defaults (docs/MODEL.md §4.2)
    cfg: float = 6.0
    top_k: int = 1
    top_p: float = 0.75
    c2i_cfg_schedule: Literal["quadratic", "linear_plus_one"] = "linear_plus_one"  # MODEL.md §2.12

    # loss (docs/MODEL.md §5.3)
    ce_weight: float = 1.0
    diff_weight: float = 2.0
    label_smooth: float = 0.0
    # how CE averages over the L target tokens: "token" = uniform mean over all tokens, as released (docs/MODEL.md
    # §5.3); "scale" = mean over scales of each scale's mean, so the coarse scales that carry most of the image
    # (1 + 4 + 9 + ... tokens) are not outweighed by the last two scales (MODEL.md §5.3, small-preset note)
    ce_weighting: Literal["token", "scale"] = "token"

    # init (docs/MODEL.md §2.9)
    init_std: float = -1.0  # <0 -> sqrt(1/(3C))
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-4  # README command uses --alng=1e-4
    init_head: float = 0.02
    # LR-encoder conv init when training from scratch: "upstream" = truncated normal(0.02) as released (docs/MODEL.md
    # §2.9); "fan_in" = variance-preserving (std gain/sqrt(fan_in)). With the upstream init a narrow encoder's
    # prefix is ~1e-6 of the position embedding it is added to, so the transformer never sees the LR (MODEL.md §2.9)
    lr_encoder_init: Literal["upstream", "fan_in"] = "upstream"

    # execution
    grad_checkpointing: bool = False  # upstream: always on; here an option (numerically neutral)

    # ---- derived geometry -------------------------------------------------------------------------------------------
    @property
    def C(self) -> int:
        return self.embed_dim if self.embed_dim is not None else 64 * self.depth

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else self.depth

    @property
    def head_dim(self) -> int:
        return self.C // self.heads

    @property
    def dpr(self) -> float:
        return self.drop_path_rate if self.drop_path_rate is not None else 0.1 * self.depth / 24

    @property
    def num_scales(self) -> int:  # K
        return len(self.patch_nums)

    @property
    def pn_last(self) -> int:
        return self.patch_nums[-1]

    @property
    def image_size(self) -> int:
        """Model resolution in pixels (512 for the released model)."""
        return self.pn_last * self.vqvae.downsample

    @property
    def L(self) -> int:
        """Target tokens over all scales (2240 released)."""
        return sum(p * p for p in self.patch_nums)

    @property
    def lr_encoder_stride(self) -> int:
        return 2 ** len(self.lr_encoder_channels)

    @property
    def prefix_len(self) -> int:
        """LR prefix tokens (1024 released); 0 for the c2i variant."""
        if self.variant == "c2i":
            return 0
        side = self.image_size // self.lr_encoder_stride
        return side * side

    @property
    def first_l(self) -> int:
        """Level-0 tokens: prefix + class token (1025 released, 1 for c2i)."""
        return self.prefix_len + 1

    @property
    def seq_len(self) -> int:
        """Full teacher-forced sequence S = prefix + class + (L - 1) (3264 released)."""
        return self.prefix_len + self.L

    @property
    def rope_grid_side(self) -> int:
        return self.rope_grid if self.rope_grid is not None else self.pn_last

    @property
    def class_rows(self) -> int:
        """Rows of class_emb: ISR uses exactly num_classes; C2I adds the null class (docs/MODEL.md §2.12)."""
        return self.num_classes + (1 if self.variant == "c2i" else 0)

    def validate(self) -> "VARSRConfig":
        """Fail early, with the reason, on configs that cannot build."""
        errs = []
        if self.C % self.heads:
            errs.append(f"embed_dim {self.C} not divisible by num_heads {self.heads}")
        elif self.head_dim % 4:
            errs.append(f"head dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        if list(self.patch_nums) != sorted(set(self.patch_nums)):
            errs.append(f"patch_nums {self.patch_nums} must be strictly increasing")
        if self.ce_weighting not in ("token", "scale"):
            errs.append(f"ce_weighting must be 'token' or 'scale', got {self.ce_weighting!r}")
        if self.lr_encoder_init not in ("upstream", "fan_in"):
            errs.append(f"lr_encoder_init must be 'upstream' or 'fan_in', got {self.lr_encoder_init!r}")
        if self.lr_encoder_hidden < 1:
            errs.append(f"lr_encoder_hidden must be >= 1, got {self.lr_encoder_hidden}")
        if self.vqvae.norm_groups < 1 or self.vqvae.ch % self.vqvae.norm_groups:
            errs.append(f"vqvae.ch {self.vqvae.ch} must be a multiple of vqvae.norm_groups {self.vqvae.norm_groups}")
        if self.variant == "isr":
            if self.image_size % self.lr_encoder_stride:
                errs.append(
                    f"image size {self.image_size} not divisible by the LR encoder stride {self.lr_encoder_stride}"
                )
            if self.num_classes < 2:
                errs.append("isr variant needs num_classes >= 2 (label 1 is the CFG negative)")
        if self.top_p < 0 or self.top_p > 1:
            errs.append(f"top_p {self.top_p} outside [0, 1]")
        if errs:
            raise ValueError("invalid VARSRConfig: " + "; ".join(errs))
        return self

    # ---- (de)serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))  # tuples -> lists

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VARSRConfig":
        from infra.core.config import build

        d = dict(d)
        if "lr_encoder_hidden" not in d and _LEGACY_FIELDS <= d.keys():
            # a complete config written before lr_encoder_hidden existed: that code ended the encoder at width C
            d["lr_encoder_hidden"] = d["embed_dim"] if d["embed_dim"] is not None else 64 * int(d["depth"])
        return build(cls, d).validate()

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "VARSRConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **kw: Any) -> "VARSRConfig":
        return self.from_dict({**self.to_dict(), **kw})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "VARSRConfig":
        """Named presets: tiny (CPU minutes), d16, d20, d24 (released VARSR), d30; ``c2i-`` prefix for stage 1."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        d = {**PRESETS[name], "name": name}
        d = json.loads(json.dumps(d))
        for k, v in overrides.items():
            if isinstance(v, dict) and isinstance(d.get(k), dict):
                d[k] = {**d[k], **v}
            else:
                d[k] = v
        return cls.from_dict(d)


# the key set of a serialised config from before lr_encoder_hidden was added (later fields have neutral defaults)
_LEGACY_FIELDS = frozenset(f.name for f in dataclasses.fields(VARSRConfig)) - {
    "lr_encoder_hidden",
    "lr_encoder_init",
    "ce_weighting",
}

_TINY_VAE = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1)

# The CPU-sized model of the first shipped bases (`small-base`; `small4` below is today's): 128-px images, 8-px
# tokens (VQVAE downsample 8, 16x16 last scale), 8 scales, a 512-entry codebook of 16-d codes; the LR encoder has
# stride 8 so the prefix is 16x16 = pn_last^2 tokens, as the model requires.
# Its tokenizer keeps colour only with one GroupNorm group and a fan-in conv init (docs/EXPERIMENTS.md): at ch 32 the
# released 32 groups hold one channel each, so every norm removes each channel's per-image mean (the image's colour),
# and under PyTorch's default init the ~16-conv trunk attenuates the image before training starts.
_SMALL_VAE = dict(
    vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, norm_groups=1, init="fan_in"
)
_SMALL = dict(
    patch_nums=(1, 2, 3, 4, 6, 8, 12, 16),
    vqvae=_SMALL_VAE,
    depth=4,
    embed_dim=256,
    num_heads=4,
    lr_encoder_channels=(16, 32, 64),
    lr_encoder_hidden=256,  # = width, as the shipped base has it (the released 1536 would be 42 % of the weights)
    lr_encoder_init="fan_in",  # the upstream init leaves this narrow encoder's prefix at ~1e-6 (no LR signal)
    ce_weighting="scale",  # coarse scales learn the LR mapping within a CPU budget (docs/MODEL.md §5.3)
    refiner_width=256,
    refiner_depth=3,
    diffusion_batch_mul=2,
)

# `small` with 4-px tokens, the preset of the shipped base (model/pretrained/small4-base): 64-px tiles (VQVAE
# downsample 4, still a 16x16 last scale, so the transformer's sequence and cost per tile are the same), and an LR
# encoder of stride 4. The tokens carry four times the information per
# pixel: after 500 stage-0 steps its held-out tokenizer ceiling is 24.66 dB PSNR-Y on 6 lomiri photos and 19.18 dB on
# the demo's motorcycle, against 21.35 / 17.01 dB for `small` after the same 500 steps and 23.66 / 18.23 dB after its
# recipe's 2000 (docs/EXPERIMENTS.md). An image takes four times as many tiles.
_SMALL4 = dict(_SMALL, vqvae=dict(_SMALL_VAE, ch_mult=(1, 2, 4)), lr_encoder_channels=(16, 32))

PRESETS: dict[str, dict[str, Any]] = {
    # 64-px images, 3 scales (1,2,4): prefix 4x4 = pn_last^2, trains on a CPU in minutes.
    "tiny": dict(
        patch_nums=(1, 2, 4),
        vqvae=_TINY_VAE,
        depth=2,
        embed_dim=128,
        num_heads=2,
        lr_encoder_channels=(16, 32, 32, 64),
        lr_encoder_hidden=128,
        lr_encoder_init="fan_in",  # see small
        refiner_width=128,
        refiner_depth=2,
        diffusion_batch_mul=2,
    ),
    "small": dict(_SMALL),
    "small4": dict(_SMALL4),
    "d16": dict(depth=16),
    "d20": dict(depth=20),
    "d24": dict(depth=24),  # the released VARSR (1.10 B parameters)
    "d30": dict(depth=30),
    # stage-1 class-to-image variants (docs/MODEL.md §2.12)
    "c2i-tiny": dict(
        variant="c2i",
        patch_nums=(1, 2, 4),
        vqvae=_TINY_VAE,
        depth=2,
        embed_dim=128,
        num_heads=2,
        num_classes=8,
        cond_drop_rate=0.1,
        refiner_width=128,
        refiner_depth=2,
        diffusion_batch_mul=2,
        cfg=4.0,
        top_k=20,
    ),
    "c2i-small": dict(_SMALL, variant="c2i", num_classes=8, cond_drop_rate=0.1, cfg=4.0, top_k=20),
    "c2i-small4": dict(_SMALL4, variant="c2i", num_classes=8, cond_drop_rate=0.1, cfg=4.0, top_k=20),
    "c2i-d24": dict(
        variant="c2i",
        patch_nums=C2I_12_SCALE_PATCH_NUMS,
        depth=24,
        num_classes=3830,
        cond_drop_rate=0.1,
        cfg=4.0,
        top_k=20,
    ),
}
