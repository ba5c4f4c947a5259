"""VAR's multi-scale VQVAE as used by VARSR (docs/MODEL.md §1): tokenizer of HR images and decoder of the final latent.

    f      = quant_conv(encoder(x))                       x in [-1, 1], f (B, Cvae, pnK, pnK)
    tokens = residual quantisation of f over patch_nums  (+ R, the continuous residual before the last scale)
    image  = clamp(decoder(post_quant_conv(f_hat)), -1, 1)

Key names equal the released `vae_ch160v4096z32.pth` (docs/MODEL.md §6.2), so it loads with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.config import VARSRConfig
from model.conv_init import fan_in_normal_
from model.quantizer import MultiScaleQuantizer
from model.vae_layers import Decoder, Encoder, fp32_conv


class VQVAE(nn.Module):
    def __init__(self, cfg: VARSRConfig):
        super().__init__()
        v = cfg.vqvae
        self.vq_config = v  # what the weights do not show (norm_groups, quant_resi): checked when weights are loaded
        self.patch_nums = tuple(cfg.patch_nums)
        self.V, self.Cvae = v.vocab_size, v.z_channels
        self.downsample = v.downsample
        self.encoder = Encoder(v.ch, tuple(v.ch_mult), v.num_res_blocks, v.z_channels, v.dropout, v.norm_groups)
        self.decoder = Decoder(v.ch, tuple(v.ch_mult), v.num_res_blocks, v.z_channels, v.dropout, v.norm_groups)
        self.quantize = MultiScaleQuantizer(
            v.vocab_size, v.z_channels, self.patch_nums, v.beta, v.quant_resi, v.share_quant_resi
        )
        ks = v.quant_conv_ks
        self.quant_conv = nn.Conv2d(v.z_channels, v.z_channels, ks, stride=1, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(v.z_channels, v.z_channels, ks, stride=1, padding=ks // 2)
        if v.init == "fan_in":
            self.init_fan_in()

    def init_fan_in(self) -> None:
        """Every encoder/decoder conv N(0, 1/fan_in), zero biases (``VQVAEConfig.init``): each conv then keeps its
        input's variance, where PyTorch's default init passes about a third of it, so a trunk of ~16 convs no longer
        shrinks the image, and its colour, towards nothing before training starts (docs/EXPERIMENTS.md)."""
        for m in (*self.encoder.modules(), *self.decoder.modules()):
            if isinstance(m, nn.Conv2d):
                fan_in_normal_(m)

    def freeze(self) -> "VQVAE":
        """Inference mode of VARSR: eval() and no gradients for any parameter."""
        self.eval()
        self.requires_grad_(False)
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Standard load; an `ema_vocab_hit_SV` for another number of scales keeps the model's own buffer
        (docs/MODEL.md §1.3)."""
        return super().load_state_dict(state_dict, strict=strict, assign=assign)  # the quantizer's hook does the rest

    # ---- phi ---------------------------------------------------------------------------------------------------------
    def phi_index(self, si: int) -> int:
        """Which shared phi conv scale si uses (docs/MODEL.md §1.3 table)."""
        return self.quantize.phi_table[si]

    def phi(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """(1 - r)·h + r·conv_j(h) with j = phi_index(si)."""
        return self.quantize.phi(si, h)

    # ---- tokenisation ------------------------------------------------------------------------------------------------
    def _check_image(self, x: torch.Tensor) -> None:
        side = self.patch_nums[-1] * self.downsample
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != side or x.shape[3] != side:
            raise ValueError(f"expected images (B, 3, {side}, {side}) in [-1, 1], got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latent f (B, Cvae, H/16, W/16) (contiguous)."""
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC activations: faster oneDNN convs on CPU
        return self.quant_conv(self.encoder(x)).contiguous()

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Like img_to_idxBl but also returns the final f_hat (docs/MODEL.md §1.4 identities: f_hat_final + R - e_last
        = f)."""
        self._check_image(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            f = self.encode(x.float())
            return self.quantize.tokenize(f.float())

    @torch.no_grad()
    def img_to_idxBl(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """HR image -> (K index maps (B, pn²), continuous residual target R (B, pnK², Cvae)); fp32, no grad."""
        idx_list, R, _ = self.tokenize(x)
        return idx_list, R

    def idxBl_to_var_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """K GT index maps -> teacher-forcing inputs (B, L - 1, Cvae) (docs/MODEL.md §1.5)."""
        return self.quantize.idxBl_to_var_input(idx_list)

    def get_next_autoregressive_input(
        self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """AR accumulation of scale si's codes into f_hat (in place) and the next scale's input map (docs/MODEL.md
        §1.6)."""
        return self.quantize.get_next_autoregressive_input(si, f_hat, h_BChw)

    def embed_idx(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, n) code indices -> (B, n, Cvae) codebook vectors."""
        return self.quantize.embedding(idx)

    def exact_latent(self, idx_list: list[torch.Tensor], R: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat + (R - e_last) as a latent map (B, Cvae, pn_last, pn_last), from ``tokenize``'s outputs: the encoder
        latent f itself (docs/MODEL.md §1.4), i.e. the tokens completed by the residual a perfect refiner adds."""
        e_last = self.embed_idx(idx_list[-1]).float()  # (B, n_last, Cvae)
        return f_hat + (R - e_last).transpose(1, 2).reshape_as(f_hat)

    # ---- decoding ----------------------------------------------------------------------------------------------------
    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Final latent (B, Cvae, pnK, pnK) -> image (B, 3, H, W) clamped to [-1, 1]."""
        h = fp32_conv(self.post_quant_conv, f_hat.contiguous(memory_format=torch.channels_last))
        return self.decoder(h).clamp_(-1, 1).contiguous()

    # ---- VQVAE training (docs/MODEL.md §1.7) -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """x -> (reconstruction (unclamped), vq loss, codebook usage % per scale); VAR behaviour, phi at every scale."""
        self._check_image(x)
        f_hat, vq_loss, usage = self.quantize(self.encode(x))
        h = self.post_quant_conv(f_hat.contiguous(memory_format=torch.channels_last))
        return self.decoder(h).contiguous(), vq_loss, usage
