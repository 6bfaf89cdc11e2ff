"""SAM ViT-B (Kirillov et al., 2023; facebookresearch/segment-anything, Apache-2.0) for CLISC's stage 2
``sam_vit_b`` backend (spec/methods/clisc.md, stage 2, "Points" and "Backends"), written here so that the
official ``sam_vit_b_01ec64.pth`` loads without segment-anything, torchvision or timm.

The network: a ViT-B image encoder (16x16 patches, absolute position embedding, 12 pre-norm blocks with decomposed
relative position biases, windowed attention (14x14 windows, zero-padded) except the global blocks 2, 5, 8 and 11,
a conv neck to 256 channels), SAM's prompt encoder (boxes and points, 1024 frame, 64x64 embedding) and SAM's mask
decoder (shared with LiteMedSAM). Module and parameter names follow the checkpoint's keys (``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``); ``load_sam_vit_b`` loads a user-given file with ``strict=True``.

Inference (``segment``) follows ``SamPredictor``: slice min-max to uint8, histogram equalisation, 3 channels,
bilinear resize (PIL) of the longer side to 1024 with ``ResizeLongestSide``'s rounding, normalisation by the
ImageNet pixel mean and std, zero padding bottom/right to 1024x1024; prompts in image pixels are scaled per axis by
new size / old size (``ResizeLongestSide.apply_coords``); the single-mask output (mask token 0) of 256x256 logits is
resized to 1024, cropped to the resized image, resized to (H, W) and thresholded at 0.

Each image embedding pairs with the prompt of the same batch index (no repeat-interleave), as in LiteMedSAM.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lemis.errors import ConfigError
from lightning_modules.clisc import equalise, frame_scale, to_uint8
from lightning_modules.nets.lite_medsam import LayerNorm2d, MaskDecoder, PromptEncoder

FRAME = 1024  # SAM's input side: the longer image side is resized to it, the shorter one padded
CHECKPOINT_NAME = "sam_vit_b_01ec64.pth"
CHECKPOINT_URL = f"https://dl.fbaipublicfiles.com/segment_anything/{CHECKPOINT_NAME}"
PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, on the 0..255 scale
PIXEL_STD = (58.395, 57.12, 57.375)


# ---- the checkpoint --------------------------------------------------------------------------------------------------

def load_sam_vit_b(path: str | Path, device: str | torch.device = "cpu", **sizes) -> SamViTB:
    """SAM ViT-B with the weights of the official ``sam_vit_b_01ec64.pth`` at ``path`` (strict load), in eval mode
    on ``device``; a missing, unreadable or non-matching file is one ConfigError sentence naming it. ``sizes`` are
    ``SamViTB``'s size options (tests build a tiny network; the defaults are ViT-B)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"SAM ViT-B checkpoint {path} does not exist (or is not a file): download "
                          f"{CHECKPOINT_NAME} from {CHECKPOINT_URL} and give its path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- any unpickling failure is a bad file
        raise ConfigError(f"SAM ViT-B checkpoint {path} could not be read as a PyTorch state dict "
                          f"({type(err).__name__}).") from None
    net = SamViTB(**sizes)
    check_state(state, net.state_dict(), path)
    net.load_state_dict(state, strict=True)
    return net.eval().to(device)


def check_state(state: object, expected: dict[str, torch.Tensor], path: Path) -> None:
    """A ConfigError naming ``path`` and the first missing key, unexpected key or wrong shape, if any."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"SAM ViT-B checkpoint {path} is not a plain state dict of tensors (expected the "
                          f"official {CHECKPOINT_NAME}).")
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    for keys, what in ((missing, "lacks the key"), (unexpected, "has the unexpected key")):
        if keys:
            others = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ConfigError(f"SAM ViT-B checkpoint {path} {what} {keys[0]}{others}, so it is not the official "
                              f"{CHECKPOINT_NAME}.")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ConfigError(f"SAM ViT-B checkpoint {path} holds {key} with shape {list(state[key].shape)} where "
                              f"SAM ViT-B has {list(tensor.shape)}, so it is not the official {CHECKPOINT_NAME}.")


# ---- ViT image encoder -----------------------------------------------------------------------------------------------

def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-pad bottom/right to whole windows and split: [B, H, W, C] -> [B * nH * nW, window, window, C]
    (windows in row-major order per image)."""
    b, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, -w % window, 0, -h % window))
    nh, nw = x.shape[1] // window, x.shape[2] // window
    return x.view(b, nh, window, nw, window, c).transpose(2, 3).reshape(-1, window, window, c)


def window_unpartition(windows: torch.Tensor, window: int, size: tuple[int, int]) -> torch.Tensor:
    """The inverse of ``window_partition`` for an (H, W) map, padding cropped:
    [B * nH * nW, window, window, C] -> [B, H, W, C]."""
    h, w = size
    nh, nw = -(-h // window), -(-w // window)
    c = windows.shape[-1]
    x = windows.view(-1, nh, nw, window, window, c).transpose(2, 3).reshape(-1, nh * window, nw * window, c)
    return x[:, :h, :w]


def rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 size: tuple[int, int]) -> torch.Tensor:
    """Decomposed relative position bias (MViTv2, as SAM's ViT): for a query at (i, j) and a key at (k, l) of an
    (H, W) grid, q(i, j) . rel_pos_h[i - k + H - 1] + q(i, j) . rel_pos_w[j - l + W - 1], with the unscaled query.

    q [..., H * W, d], rel_pos_h [2H - 1, d], rel_pos_w [2W - 1, d] -> bias [..., H * W, H * W]. The tables must
    cover the grid exactly (SAM interpolates them otherwise; lemis always feeds the trained grid size)."""
    h, w = size
    if len(rel_pos_h) != 2 * h - 1 or len(rel_pos_w) != 2 * w - 1:
        raise ValueError(f"relative position tables of {len(rel_pos_h)} x {len(rel_pos_w)} entries do not fit a "
                         f"{h} x {w} grid")
    rows, cols = torch.arange(h, device=q.device), torch.arange(w, device=q.device)
    table_h = rel_pos_h[rows[:, None] - rows[None] + h - 1]  # [H (query), H (key), d]
    table_w = rel_pos_w[cols[:, None] - cols[None] + w - 1]  # [W, W, d]
    grid = q.reshape(*q.shape[:-2], h, w, q.shape[-1])
    along_h = torch.einsum("...ijd,ikd->...ijk", grid, table_h)  # [..., H, W, H (key row)]
    along_w = torch.einsum("...ijd,jld->...ijl", grid, table_w)  # [..., H, W, W (key column)]
    bias = along_h[..., :, None] + along_w[..., None, :]  # [..., H, W, H, W]
    return bias.reshape(*q.shape[:-2], h * w, h * w)


class ViTAttention(nn.Module):
    """Multi-head self-attention over a token grid with decomposed relative position biases whose tables cover a
    ``size`` x ``size`` grid (keys ``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w``): [B, H, W, dim] -> the same."""

    def __init__(self, dim: int, heads: int, size: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, dim // heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        # The projection holds all of q, then all of k, then all of v (the checkpoint's layout).
        q, k, v = self.qkv(x).view(b, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, T, d]
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # softmax(q k^T / sqrt(d) + bias) v
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class ViTMLP(nn.Module):
    """Linear, GELU, Linear (keys ``lin1``, ``lin2``): [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class ViTBlock(nn.Module):
    """Pre-norm attention (+ residual) and pre-norm MLP (+ residual), LayerNorm eps 1e-6: [B, H, W, dim] -> the same.

    ``window`` > 0: attention inside ``window`` x ``window`` windows (the normalised map zero-padded bottom/right,
    padded tokens not masked out, output cropped), relative tables of 2 * window - 1 entries; ``window`` == 0:
    global attention over the ``grid`` x ``grid`` map, tables of 2 * grid - 1 entries."""

    def __init__(self, dim: int, heads: int, window: int, grid: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, heads, window or grid)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMLP(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            y = window_unpartition(self.attn(window_partition(y, self.window)), self.window, x.shape[1:3])
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """A ``patch`` x ``patch`` conv with stride ``patch`` (key ``proj``): [B, 3, S, S] -> [B, S/patch, S/patch, dim]."""

    def __init__(self, patch: int, dim: int, c_in: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_in, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder; the defaults are ViT-B: [B, 3, 1024, 1024] -> [B, 256, 64, 64].

    Patch embedding, plus a learned absolute position embedding [1, grid, grid, dim]; ``depth`` blocks, global at
    ``global_indexes`` and windowed elsewhere; a neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d, no conv
    biases) to ``out_dim`` channels."""

    def __init__(self, image_size: int = 1024, patch_size: int = 16, dim: int = 768, depth: int = 12,
                 heads: int = 12, window: int = 14, global_indexes: Sequence[int] = (2, 5, 8, 11),
                 out_dim: int = 256, mlp_ratio: int = 4) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.image_size, self.grid = image_size, image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid, self.grid, dim))
        self.blocks = nn.ModuleList(
            ViTBlock(dim, heads, 0 if i in global_indexes else window, self.grid, mlp_ratio) for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(dim, out_dim, 1, bias=False), LayerNorm2d(out_dim),
            nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False), LayerNorm2d(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


# ---- SAM prompt encoder with points ----------------------------------------------------------------------------------

class SamPromptEncoder(PromptEncoder):
    """SAM's prompt encoder (LiteMedSAM's, sized for SAM: 1024 frame, 64x64 embedding) with point prompts.

    Point embedding: the positional encoding of the pixel centre (x + 0.5, y + 0.5) / frame, plus
    ``point_embeddings.1`` for a positive (label 1) or ``point_embeddings.0`` for a negative (label 0);
    label -1 (a padding point) is ``not_a_point_embed`` alone. The sparse prompt is the points followed by the two
    box corners; with a box SAM adds no padding point."""

    def forward(self, boxes: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None):
        """boxes [B, 4] (x0, y0, x1, y1), points (coords [B, n, 2] (x, y), labels [B, n]) in frame pixels, or None
        -> sparse [B, n + 2, dim], dense [B, dim, E, E]."""
        corners, dense = super().forward(boxes)
        if points is None:
            return corners, dense
        coords, labels = points
        labels = labels[..., None]
        encoded = self.pe_layer((coords.to(corners.dtype) + 0.5) / self.frame)
        encoded = (encoded + (labels == 0) * self.point_embeddings[0].weight
                   + (labels == 1) * self.point_embeddings[1].weight)
        embedded = torch.where(labels == -1, self.not_a_point_embed.weight, encoded)
        return torch.cat([embedded, corners], dim=1), dense


# ---- SAM ViT-B -------------------------------------------------------------------------------------------------------

class SamViTB(nn.Module):
    """SAM with a ViT image encoder; the defaults are the official ``vit_b`` (93,735,472 parameters).

    images [B, 3, S, S] (normalised, padded: ``to_frame``), boxes [B, 4] and optional points in the S frame ->
    mask logits [B, 1, 4 E, 4 E] (mask token 0, the single-mask output), E = S / patch; ``encode`` and ``decode``
    split the two halves so the image embeddings can be cached."""

    def __init__(self, image_size: int = FRAME, patch_size: int = 16, dim: int = 768, depth: int = 12,
                 heads: int = 12, window: int = 14, global_indexes: Sequence[int] = (2, 5, 8, 11),
                 prompt_dim: int = 256) -> None:
        super().__init__()
        self.image_encoder = ImageEncoderViT(image_size, patch_size, dim, depth, heads, window, global_indexes,
                                             prompt_dim)
        self.prompt_encoder = SamPromptEncoder(prompt_dim, self.image_encoder.grid, image_size, mask_channels=16)
        self.mask_decoder = MaskDecoder(prompt_dim)
        self.image_size, self.embedding, self.prompt_dim = image_size, self.image_encoder.grid, prompt_dim

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, prompt_dim, E, E]."""
        return self.image_encoder(images)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor,
               points: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """embeddings [B, prompt_dim, E, E], boxes [B, 4], points (coords [B, n, 2], labels [B, n]) or None, in
        frame pixels -> logits [B, 1, 4 E, 4 E]."""
        if len(embeddings) != len(boxes) or (points is not None and len(points[0]) != len(boxes)):
            raise ValueError(f"SAM ViT-B pairs embeddings with prompts one to one, got {len(embeddings)} "
                             f"embeddings and {len(boxes)} boxes")
        sparse, dense = self.prompt_encoder(boxes.to(embeddings.dtype), points)
        masks, _ = self.mask_decoder(embeddings, self.prompt_encoder.dense_pe(), sparse, dense)
        return masks[:, :1]

    def forward(self, images: torch.Tensor, boxes: torch.Tensor,
                points: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.decode(self.encode(images), boxes, points)


# ---- the 1024 frame --------------------------------------------------------------------------------------------------

def coords_to_frame(coords: Sequence[float] | np.ndarray, shape: tuple[int, int], side: int = FRAME) -> np.ndarray:
    """(x, y) in image pixels of an (H, W) slice -> the ``side`` frame, as ``ResizeLongestSide.apply_coords``:
    x * new_W / W, y * new_H / H with the resized size of ``frame_scale`` (both factors are side / max(H, W) up to
    the rounding of the shorter side). [..., 2] -> [..., 2] float64."""
    _, (new_h, new_w) = frame_scale(shape, side)
    return np.asarray(coords, dtype=np.float64) * np.array([new_w / shape[1], new_h / shape[0]])


def box_to_frame(box: Sequence[float] | np.ndarray, shape: tuple[int, int], side: int = FRAME) -> np.ndarray:
    """(x0, y0, x1, y1) in image pixels -> the ``side`` frame (``ResizeLongestSide.apply_boxes``): [..., 4]."""
    box = np.asarray(box, dtype=np.float64)
    return coords_to_frame(box.reshape(*box.shape[:-1], 2, 2), shape, side).reshape(box.shape)


def to_frame(image: np.ndarray, side: int = FRAME, equalised: bool = True) -> torch.Tensor:
    """An (H, W) slice -> SAM's input [3, side, side]: min-max to uint8 and (CLISC stage 2, when ``equalised``)
    histogram equalisation, 3 identical channels; PIL bilinear resize of the longer side to ``side`` (as
    ``ResizeLongestSide.apply_image``), per-channel (x - PIXEL_MEAN) / PIXEL_STD, zero padding bottom/right."""
    from PIL import Image

    grey = equalise(image) if equalised else to_uint8(np.asarray(image))
    _, (new_h, new_w) = frame_scale(grey.shape, side)
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    # PIL resamples each band alike, so the grey band resized alone equals each channel of the RGB resize.
    resized = torch.from_numpy(np.asarray(Image.fromarray(grey).resize((new_w, new_h), bilinear), dtype=np.float32))
    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
    framed = torch.zeros(3, side, side)
    framed[:, :new_h, :new_w] = (resized - mean) / std
    return framed


def masks_from_logits(logits: torch.Tensor, shape: tuple[int, int], side: int = FRAME) -> torch.Tensor:
    """``Sam.postprocess_masks`` and the threshold: logits [B, 1, L, L] -> bilinear (align_corners=False) to
    side x side -> crop to the resized image -> bilinear to (H, W) -> > 0: masks [B, H, W] bool."""
    _, (new_h, new_w) = frame_scale(shape, side)
    logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
    logits = F.interpolate(logits[..., :new_h, :new_w], size=tuple(shape), mode="bilinear", align_corners=False)
    return logits[:, 0] > 0


# ---- inference on slices ---------------------------------------------------------------------------------------------

Points = tuple[np.ndarray, np.ndarray]


def check_points(points: Sequence[Points | None] | None, n: int) -> list[Points | None]:
    """Per slice, None or (coords [k, 2] float64, labels [k] int64) with labels in {-1, 0, 1}; k = 0 -> None."""
    if points is None:
        return [None] * n
    if len(points) != n:
        raise ValueError(f"segment needs one point prompt (or None) per slice, got {n} slices and {len(points)}")
    checked: list[Points | None] = []
    for i, prompt in enumerate(points):
        if prompt is None:
            checked.append(None)
            continue
        coords = np.asarray(prompt[0], dtype=np.float64).reshape(-1, 2)
        labels = np.asarray(prompt[1]).reshape(-1).astype(np.int64)
        if len(coords) != len(labels) or not np.isin(labels, (-1, 0, 1)).all():
            raise ValueError(f"slice {i}: points need one label in {{-1, 0, 1}} per (x, y), got {len(coords)} "
                             f"points and labels {labels.tolist()}")
        checked.append((coords, labels) if len(coords) else None)
    return checked


@torch.inference_mode()
def segment(net: SamViTB, images: np.ndarray, boxes: np.ndarray, points: Sequence[Points | None] | None = None,
            batch_size: int = 4, embeddings: torch.Tensor | None = None,
            equalised: bool = True) -> tuple[np.ndarray, torch.Tensor]:
    """Box- (and point-) prompted masks of same-sized slices, as ``lite_medsam.segment``.

    images [N, H, W] (or one [H, W]), boxes [N, 4] (or one [4]) as (x0, y0, x1, y1) in image pixels, points None
    or per slice None or (coords [k, 2] as (x, y) in image pixels, labels [k], 1 positive, 0 negative) (for one
    [H, W] slice: one such pair or None) -> (masks [N, H, W] bool (or [H, W]), embeddings [N, 256, 64, 64] float32
    on the CPU). The encoder runs on ``batch_size`` slices at a time; pass ``embeddings`` (returned by an earlier
    call on the same slices) to skip it. Slices of one decoder batch with different point counts are decoded
    apart (the prompts are never padded, so each mask is SamPredictor's). Masks: ``masks_from_logits``."""
    images = np.asarray(images)
    single = images.ndim == 2
    images = images[None] if single else images
    if single and points is not None:
        points = [points]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n, h, w = images.shape
    if len(boxes) != n:
        raise ValueError(f"segment needs one box per slice, got {n} slices and {len(boxes)} boxes")
    prompts = check_points(points, n)
    side, grid = net.image_size, net.embedding
    device = next(net.parameters()).device
    if embeddings is None:
        embeddings = torch.cat([
            net.encode(torch.stack([to_frame(image, side, equalised) for image in images[i:i + batch_size]])
                       .to(device)).float().cpu()
            for i in range(0, n, batch_size)])
    elif embeddings.shape != (n, net.prompt_dim, grid, grid):
        raise ValueError(f"embeddings must be [{n}, {net.prompt_dim}, {grid}, {grid}], got "
                         f"{tuple(embeddings.shape)}")
    frame_boxes = torch.as_tensor(box_to_frame(boxes, (h, w), side), dtype=torch.float32)
    masks = np.zeros((n, h, w), dtype=bool)
    for start in range(0, n, batch_size):
        chunk = range(start, min(start + batch_size, n))
        for count in sorted({0 if prompts[i] is None else len(prompts[i][0]) for i in chunk}):
            group = [i for i in chunk if (0 if prompts[i] is None else len(prompts[i][0])) == count]
            group_points = None
            if count:
                coords = np.stack([coords_to_frame(prompts[i][0], (h, w), side) for i in group])
                labels = np.stack([prompts[i][1] for i in group])
                group_points = (torch.as_tensor(coords, dtype=torch.float32, device=device),
                                torch.as_tensor(labels, device=device))
            logits = net.decode(embeddings[group].to(device), frame_boxes[group].to(device), group_points)
            masks[group] = masks_from_logits(logits.float(), (h, w), side).cpu().numpy()
    return (masks[0] if single else masks), embeddings
