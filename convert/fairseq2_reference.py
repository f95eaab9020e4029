"""A small PyTorch rendering of fairseq's data2vec 2.0 audio model, written from fairseq's code.

fairseq itself cannot be installed here; this is the reference `d2v verify` uses when `import fairseq`
fails, and the model the tests build fairseq-layout checkpoints from. Module and attribute names are
fairseq's (`modality_encoders.AUDIO.local_encoder`, `...project_features`, `...relative_positional_encoder`,
`...context_encoder`, `...decoder`, `...alibi_scale`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`),
so `state_dict()` / `load_state_dict()` speak fairseq's key names, `_ema` included (a second instance
without local encoder and decoder, as `make_target_model` builds it with `ema_encoder_only=False`).

Sources (facebookresearch/fairseq): examples/data2vec/models/data2vec2.py (`forward`, `make_targets`,
`d2v_loss`), modalities/base.py (`contextualized_features`, `make_maskinfo`, `apply_mask`, `get_alibi`,
`get_alibi_bias`, `masked_alibi`, `decoder_input`), modalities/audio.py (`AudioEncoder`,
`convert_padding_mask`), modalities/modules.py (`AltBlock`, `AltAttention`, `BlockEncoder`, `Decoder1d`),
fairseq/models/wav2vec/wav2vec2.py (`ConvFeatureExtractionModel`), timm's `Mlp`.
Import this module only when PyTorch is wanted: it imports torch at the top. It imports nothing of
flax-d2v: it reads the checkpoint's `cfg.model` itself (`settings`, with fairseq's dataclass defaults)
and parses the conv spec itself (`conv_layers`), so a wrong reading in our converter
(`convert.fairseq2.config_from_model_cfg`) shows up as a difference instead of being shared.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# fairseq's defaults (examples/data2vec/models/data2vec2.py `Data2VecMultiConfig`, modalities/base.py
# `D2vModalityConfig`, modalities/audio.py `D2vAudioConfig`, modalities/modules.py `D2vDecoderConfig`).
MODEL_DEFAULTS = {"embed_dim": 768, "depth": 8, "num_heads": 12, "mlp_ratio": 4.0, "norm_eps": 1e-6}
AUDIO_DEFAULTS = {
    "feature_encoder_spec": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "conv_pos_width": 95,
    "conv_pos_depth": 5,
    "conv_pos_groups": 16,
    "prenet_depth": 4,
    "use_alibi_encoder": False,
    "alibi_scale": 1.0,
    "learned_alibi_scale_per_head": False,
    "learned_alibi_scale_per_layer": False,
}
DECODER_DEFAULTS = {"decoder_dim": 384, "decoder_groups": 16, "decoder_kernel": 5, "decoder_layers": 5}


def settings(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The architecture of a `data2vec_multi` cfg.model (audio), missing fields at fairseq's defaults."""
    audio = dict((model_cfg.get("modalities") or {}).get("audio") or {})
    s = {k: v if model_cfg.get(k) is None else model_cfg[k] for k, v in MODEL_DEFAULTS.items()}
    s.update({k: v if audio.get(k) is None else audio[k] for k, v in AUDIO_DEFAULTS.items()})
    if "decoder" in audio and audio["decoder"] is None:
        s["decoder"] = None
    else:
        dec = audio.get("decoder") or {}
        s["decoder"] = {k: dec.get(k, v) for k, v in DECODER_DEFAULTS.items()}
    return s


def conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """fairseq `eval`s `feature_encoder_spec`; here each `[(dim, k, stride), ...] (* n)` term of the sum is
    read with `ast.literal_eval`, so a spec can never run code."""
    layers: list[tuple[int, int, int]] = []
    for term in spec.split("+"):
        m = re.fullmatch(r"\s*(\[[^\]]*\])\s*(?:\*\s*(\d+))?\s*", term)
        if m is None:
            raise ValueError(f"feature_encoder_spec: cannot read {term!r} of {spec!r}")
        layers += [tuple(t) for t in ast.literal_eval(m[1])] * int(m[2] or 1)
    return layers


class TransposeLast(nn.Module):
    def forward(self, x):
        return x.transpose(-2, -1)


class SamePad(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.remove = 1 if k % 2 == 0 else 0

    def forward(self, x):
        return x[:, :, : -self.remove] if self.remove > 0 else x


class Fp32LayerNorm(nn.LayerNorm):
    def forward(self, x):
        out = F.layer_norm(
            x.float(),
            self.normalized_shape,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None,
            self.eps,
        )
        return out.type_as(x)


class ConvFeatureExtractionModel(nn.Module):
    """wav2vec2's conv stack in `layer_norm` mode: Sequential(conv, Dropout, Sequential(T, LN, T), GELU)."""

    def __init__(self, conv_layers):
        super().__init__()
        blocks, in_d = [], 1
        for dim, k, stride in conv_layers:
            conv = nn.Conv1d(in_d, dim, k, stride=stride, bias=False)
            nn.init.kaiming_normal_(conv.weight)
            blocks.append(
                nn.Sequential(
                    conv,
                    nn.Dropout(0.0),
                    nn.Sequential(TransposeLast(), Fp32LayerNorm(dim, elementwise_affine=True), TransposeLast()),
                    nn.GELU(),
                )
            )
            in_d = dim
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, x):
        x = x.unsqueeze(1)
        for conv in self.conv_layers:
            x = conv(x)
        return x


class AltAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, padding_mask=None, alibi_bias=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        dtype = q.dtype
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        if alibi_bias is not None:
            attn = attn.type_as(alibi_bias)
            attn[:, : alibi_bias.size(1)] += alibi_bias
        if padding_mask is not None and padding_mask.any():
            attn = attn.masked_fill(padding_mask.unsqueeze(1).unsqueeze(2).to(torch.bool), float("-inf"))
        attn = attn.softmax(dim=-1, dtype=torch.float32).to(dtype=dtype)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class AltBlock(nn.Module):
    """Post-LN (`layer_norm_first=False`), `ffn_targets=True`."""

    def __init__(self, dim, num_heads, mlp_ratio, norm_eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = AltAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, padding_mask=None, alibi_bias=None):
        x = x + self.attn(x, padding_mask, alibi_bias)
        r = x = self.norm1(x)
        x = self.mlp(x)
        t = x
        x = self.norm2(r + x)
        return x, t


class BlockEncoder(nn.Module):
    def __init__(self, blocks, norm):
        super().__init__()
        self.blocks = blocks
        self.norm = norm

    def forward(self, x, padding_mask, alibi_bias, alibi_scale, states=None):
        x = self.norm(x)
        for i, blk in enumerate(self.blocks):
            ab = alibi_bias
            if ab is not None and alibi_scale is not None:
                scale = alibi_scale[i] if alibi_scale.size(0) > 1 else alibi_scale.squeeze(0)
                ab = ab * scale.type_as(ab)
            x, _ = blk(x, padding_mask, ab)
            if states is not None:
                states.append(x)
        return x


class Decoder1d(nn.Module):
    def __init__(self, cfg, input_dim):
        super().__init__()
        k = cfg["decoder_kernel"]

        def make_block(in_dim):
            return nn.Sequential(
                nn.Conv1d(in_dim, cfg["decoder_dim"], kernel_size=k, padding=k // 2, groups=cfg["decoder_groups"]),
                SamePad(k),
                TransposeLast(),
                nn.LayerNorm(cfg["decoder_dim"], elementwise_affine=False),
                TransposeLast(),
                nn.GELU(),
            )

        self.blocks = nn.Sequential(
            *[make_block(input_dim if i == 0 else cfg["decoder_dim"]) for i in range(cfg["decoder_layers"])]
        )
        self.proj = nn.Linear(cfg["decoder_dim"], input_dim)

    def forward(self, x):
        x = x.transpose(1, 2)
        residual = x
        for layer in self.blocks:
            x = layer(x)
            if residual.size(1) == x.size(1):
                x = x + residual
            residual = x
        return self.proj(x.transpose(1, 2))


def get_slopes(n):
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + get_slopes(2 * closest)[0::2][: n - closest]


def get_alibi_bias(batch_size, time_steps, heads):
    """`get_alibi(dims=1)` repeated over the batch: (B, H, T, T) float32."""
    slopes = torch.Tensor(get_slopes(heads))
    pos_bias = torch.abs(torch.arange(time_steps).unsqueeze(0) - torch.arange(time_steps).unsqueeze(1)) * -1
    bias = slopes.unsqueeze(1).unsqueeze(1) * pos_bias.unsqueeze(0).expand(heads, -1, -1)
    return bias.unsqueeze(0).repeat(batch_size, 1, 1, 1).to(torch.float32)


class AudioEncoder(nn.Module):
    def __init__(self, s: dict[str, Any], teacher: bool = False):
        super().__init__()
        d = s["embed_dim"]
        self.s = s
        self.feature_enc_layers = conv_layers(s["feature_encoder_spec"])
        if not teacher:  # the EMA teacher has no local encoder, project_features or decoder
            self.local_encoder = ConvFeatureExtractionModel(self.feature_enc_layers)
            fd = self.feature_enc_layers[-1][0]
            self.project_features = nn.Sequential(TransposeLast(), nn.LayerNorm(fd), nn.Linear(fd, d))
        k = max(3, s["conv_pos_width"] // s["conv_pos_depth"])
        self.relative_positional_encoder = nn.Sequential(
            TransposeLast(),
            *[
                nn.Sequential(
                    nn.Conv1d(d, d, kernel_size=k, padding=k // 2, groups=s["conv_pos_groups"]),
                    SamePad(k),
                    TransposeLast(),
                    nn.LayerNorm(d, elementwise_affine=False),
                    TransposeLast(),
                    nn.GELU(),
                )
                for _ in range(s["conv_pos_depth"])
            ],
            TransposeLast(),
        )
        self.context_encoder = BlockEncoder(
            nn.ModuleList(AltBlock(d, s["num_heads"], s["mlp_ratio"], s["norm_eps"]) for _ in range(s["prenet_depth"])),
            nn.LayerNorm(d, eps=s["norm_eps"]),
        )
        if not teacher and s["decoder"] is not None:
            self.decoder = Decoder1d(s["decoder"], d)
        if s["use_alibi_encoder"]:
            n = s["prenet_depth"] + s["depth"] if s["learned_alibi_scale_per_layer"] else 1
            h = s["num_heads"] if s["learned_alibi_scale_per_head"] else 1
            self.alibi_scale = nn.Parameter(torch.full((n, 1, h, 1, 1), s["alibi_scale"], dtype=torch.float))
        else:
            self.alibi_scale = None

    def local_features(self, source):
        return self.project_features(self.local_encoder(source))

    def convert_padding_mask(self, x, padding_mask):
        input_lengths = (1 - padding_mask.long()).sum(-1)
        for _, k, stride in self.feature_enc_layers:
            input_lengths = torch.floor((input_lengths - k) / stride + 1)
        output_lengths = input_lengths.to(torch.long)
        if padding_mask.any():
            pm = torch.zeros(x.shape[:2], dtype=x.dtype)
            pm[(torch.arange(pm.shape[0]), output_lengths - 1)] = 1
            return (1 - pm.flip([-1]).cumsum(-1).flip([-1])).bool()
        return torch.zeros(x.shape[:2], dtype=torch.bool)

    def contextualized_features(self, x, padding_mask, mask_info=None, clone_batch=1, prenet_states=None):
        """mask_info=None: fairseq's mask=False path; else (mask, ids_keep, ids_restore) with remove_masked."""
        if padding_mask is not None:
            padding_mask = self.convert_padding_mask(x, padding_mask)
        orig_B, orig_T, _ = x.shape
        if mask_info is not None:
            if clone_batch > 1:
                x = x.repeat_interleave(clone_batch, 0)
                if padding_mask is not None:
                    padding_mask = padding_mask.repeat_interleave(clone_batch, 0)
            mask, ids_keep, _ = mask_info
            x_unmasked = torch.gather(x, 1, ids_keep)
            x = x * (1 - mask.type_as(x).unsqueeze(-1))  # apply_mask, encoder_zero_mask=True
        x_pos = self.relative_positional_encoder(x)
        if mask_info is not None:
            x = x_unmasked + torch.gather(x_pos, 1, ids_keep)
            if padding_mask is not None and padding_mask.any():  # gather_unmasked_mask
                padding_mask = torch.gather(padding_mask, 1, ids_keep[..., 0])
                padding_mask = padding_mask if padding_mask.any() else None
            else:
                padding_mask = None
        else:
            x = x + x_pos
        alibi_bias, alibi_scale = None, self.alibi_scale
        if self.alibi_scale is not None:
            alibi_bias = get_alibi_bias(orig_B, orig_T, self.s["num_heads"])
            alibi_scale = alibi_scale.clamp_min(0)
            if alibi_scale.size(0) == 1:
                alibi_bias = alibi_bias * alibi_scale.squeeze(0).type_as(alibi_bias)
                alibi_scale = None
            if clone_batch > 1:
                alibi_bias = alibi_bias.repeat_interleave(clone_batch, 0)
            if mask_info is not None:  # masked_alibi
                H = alibi_bias.size(1)
                index = ids_keep.unsqueeze(1)[..., 0].unsqueeze(-1)
                alibi_bias = torch.gather(alibi_bias, -2, index.expand(-1, H, -1, orig_T))
                alibi_bias = torch.gather(
                    alibi_bias, -1, index.transpose(-1, -2).expand(-1, H, alibi_bias.size(-2), -1)
                )
        p = self.s["prenet_depth"]
        x = self.context_encoder(
            x, padding_mask, alibi_bias, alibi_scale[:p] if alibi_scale is not None else None, prenet_states
        )
        return {
            "x": x,
            "padding_mask": padding_mask,
            "alibi_bias": alibi_bias,
            "alibi_scale": alibi_scale[p:] if alibi_scale is not None and alibi_scale.size(0) > 1 else alibi_scale,
        }


class Data2VecMulti(nn.Module):
    """`Data2VecMultiModel` for the audio modality (inference, teacher and pretraining-loss paths, no dropout)."""

    def __init__(self, model_cfg: dict[str, Any], teacher: bool = False):
        super().__init__()
        s = self.s = settings(model_cfg)
        self.modality_encoders = nn.ModuleDict({"AUDIO": AudioEncoder(s, teacher)})
        self.blocks = nn.ModuleList(
            AltBlock(s["embed_dim"], s["num_heads"], s["mlp_ratio"], s["norm_eps"]) for _ in range(s["depth"])
        )

    def run_blocks(self, enc):
        x, pm, ab, scale = enc["x"], enc["padding_mask"], enc["alibi_bias"], enc["alibi_scale"]
        hidden, results = [x], []
        for i, blk in enumerate(self.blocks):
            b = ab
            if b is not None and scale is not None:
                b = b * (scale[i] if scale.size(0) > 1 else scale.squeeze(0)).type_as(b)
            x, lr = blk(x, padding_mask=pm, alibi_bias=b)
            hidden.append(x)
            results.append(lr)
        return x, hidden, results

    @torch.no_grad()
    def extract_features(self, source, padding_mask=None, local=None):
        """fairseq `extract_features(mask=False)`: x, every block's output, layer results, prenet block outputs."""
        enc_mod = self.modality_encoders["AUDIO"]
        if local is None:
            local = enc_mod.local_features(source)
        prenet: list = []
        enc = enc_mod.contextualized_features(local, padding_mask, prenet_states=prenet)
        x, hidden, results = self.run_blocks(enc)
        return {
            "x": x,
            "hidden_states": hidden,
            "layer_results": results,
            "prenet_states": prenet,
            "padding_mask": enc["padding_mask"],
            "local_features": local,
        }


def make_maskinfo(mask: torch.Tensor, dim: int):
    """fairseq `make_maskinfo` (a stable argsort: kept frames in time order)."""
    mask = mask.to(torch.uint8)
    ids_shuffle = mask.argsort(dim=1, stable=True)
    ids_restore = ids_shuffle.argsort(dim=1, stable=True).unsqueeze(-1).expand(-1, -1, dim)
    len_keep = mask.size(1) - int(mask[0].sum())
    ids_keep = ids_shuffle[:, :len_keep].unsqueeze(-1).expand(-1, -1, dim)
    return mask, ids_keep, ids_restore


def instance_norm_targets(layer_results, top_k):
    """`make_targets` with instance_norm_target_layer=True (base/large audio): mean of per-layer instance norms."""
    tl = [F.instance_norm(t.float().transpose(1, 2)).transpose(1, 2) for t in layer_results[-top_k:]]
    y = tl[0].float()
    for t in tl[1:]:
        y = y + t.float()
    return y / len(tl)


@torch.no_grad()
def pretrain_loss(
    student: Data2VecMulti,
    teacher: Data2VecMulti,
    source,
    precomputed_mask,
    mask_noise,
    clone_batch: int,
    top_k: int,
    padding_mask=None,
) -> dict[str, Any]:
    """fairseq's training forward with dropout off: per-element regression loss (masked frames x D) and logs.

    `precomputed_mask` (B*clone, T), 1 = masked; `mask_noise` (B*clone, num_masked, D), the decoder's
    mask tokens (fairseq draws them from N(0, mask_noise_std)); `padding_mask` (B, samples), True =
    padded: key-masked in the student (gathered to the kept frames) and in the teacher, never zeroed.
    """
    enc_mod = student.modality_encoders["AUDIO"]
    local = enc_mod.local_features(source)
    D = local.size(-1)
    info = make_maskinfo(precomputed_mask, D)
    enc = enc_mod.contextualized_features(local, padding_mask, mask_info=info, clone_batch=clone_batch)
    x, _, _ = student.run_blocks(enc)
    # decoder_input: mask tokens appended, then gathered back into time order
    x_ = torch.cat([x, mask_noise.to(x.dtype)], dim=1)
    x = torch.gather(x_, 1, info[2])
    dx = enc_mod.decoder(x)
    t = teacher.extract_features(None, padding_mask, local=local)
    y = instance_norm_targets(t["layer_results"], top_k)
    y = y.repeat_interleave(clone_batch, 0)
    masked_b = info[0].bool()
    y = y[masked_b]
    pred = dx[masked_b]
    loss = F.mse_loss(pred.float(), y, reduction="none") * (1 / math.sqrt(D))

    def var(z):
        return torch.sqrt(z.reshape(-1, z.size(-1)).var(dim=0) + 1e-6).mean()

    return {
        "losses": loss,
        "sample_size": int(masked_b.sum()),
        "loss": loss.sum() / masked_b.sum(),
        "target_var": var(y.float()),
        "pred_var": var(pred.float()),
        "targets": y,
        "pred": pred,
    }


def build(
    model_cfg: dict[str, Any], state: dict[str, torch.Tensor] | None = None, teacher: bool = False, strict: bool = True
) -> Data2VecMulti:
    """The reference model from a cfg.model dict, optionally loading a fairseq state dict (fairseq key names)."""
    m = Data2VecMulti(model_cfg, teacher=teacher).eval()
    if state is not None:
        m.load_state_dict(state, strict=strict)
    return m
