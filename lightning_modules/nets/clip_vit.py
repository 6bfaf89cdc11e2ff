"""CLIP ViT (OpenAI's architecture) written for lemis, so that CLISC's stage-0 CLIP slice labeller runs on the default
install: open-clip-torch imports torchvision, whose only PyPI build for lemis's torch is a CUDA one that does not
import on the CPU torch (spec/methods/clisc.md, stage 0, "CLIP backend"; issue "CLISC").

- ``CLIP``: module and parameter names follow the OpenAI state-dict keys (``visual.conv1.weight``,
  ``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``, ``logit_scale``, ...), which
  open_clip's ``ViT-B-32-quickgelu`` uses too, so both load with ``strict=True``. Sizes are read off the state
  dict's shapes (``ClipConfig.from_state_dict``), so a tiny random checkpoint of the same layout loads as well.
- ``load_clip(path)``: a ``torch.load``-able state dict (optionally wrapped in ``state_dict`` / prefixed
  ``module.``) or OpenAI's TorchScript ``.pt`` archive; a missing, corrupt or mismatched file is one ConfigError
  sentence naming the path.
- ``preprocess``: CLIP's transform with torch only: per-slice min-max to uint8, shorter side to the image size
  (bicubic as PIL: width pass then height pass, rounded to uint8 after each), centre crop, OpenAI mean/std.
- Text: ``ClipTokenizer`` (CLIP's byte-level BPE, given its merges file ``bpe_simple_vocab_16e6.txt.gz``; nothing is
  downloaded; ``open_clip_vocab_path`` finds the copy inside an installed open-clip-torch wheel without importing
  it) or precomputed prompt embeddings (``save_text_features`` / ``load_text_features``); the labeller needs only
  the embeddings of its two fixed prompts, so either source serves (``prompt_features``).
- ``tumour_probability``: per slice p = softmax(logit_scale.exp() * cos(image, prompts)), index 1 = tumour.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import math
import re
import unicodedata
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lemis.errors import ConfigError

# The authors' prompts, index 0 = normal, 1 = tumour (spec, stage 0), used verbatim.
NORMAL_PROMPT = ("an image of brain tissue showing typical signal intensity without any regions of abnormal intensity "
                 "or suspicious mass")
TUMOUR_PROMPT = ("an image of brain tissue showing a tumor with uneven hyperintensity and irregular borders distinct "
                 "from surroundings")
PROMPTS = (NORMAL_PROMPT, TUMOUR_PROMPT)

# OpenAI's normalisation constants (RGB), the ones its ViT-B/32 was trained with.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# OpenAI's TorchScript archives keep these three scalars beside the weights; they are not parameters.
JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
HEAD_WIDTH = 64  # CLIP's rule: heads = width / 64 (heads are not visible in a state dict's shapes)


# ---- the network -----------------------------------------------------------------------------------------------------

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with (open_clip's ``-quickgelu`` models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block (keys ``ln_1``, ``attn``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``):
    [B, L, width] -> [B, L, width]."""

    def __init__(self, width: int, heads: int, quick_gelu: bool = True) -> None:
        super().__init__()
        # batch_first changes only the call convention; the parameter names (in_proj_weight, out_proj) are CLIP's
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """``layers`` residual attention blocks (keys ``resblocks.N``): [B, L, width] -> [B, L, width]."""

    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool = True) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisionTransformer(nn.Module):
    """CLIP's image tower: patchify, class token, positional embedding, ``ln_pre``, transformer, ``ln_post`` of the
    class token, ``proj``: [B, 3, S, S] -> [B, embed_dim]."""

    def __init__(self, image_size: int, patch: int, width: int, layers: int, heads: int, embed_dim: int,
                 quick_gelu: bool = True) -> None:
        super().__init__()
        grid = image_size // patch
        scale = width ** -0.5  # CLIP's init scale; the weights are normally overwritten by a checkpoint
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, grid², width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, grid² + 1, width]
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


@dataclass(frozen=True)
class ClipConfig:
    """The sizes of a CLIP ViT; ``from_state_dict`` reads them off a checkpoint as CLIP's ``build_model`` does."""

    embed_dim: int = 512
    image_size: int = 224
    patch: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12

    @property
    def vision_heads(self) -> int:
        return max(1, self.vision_width // HEAD_WIDTH)  # at least one, so that tiny test models build

    @property
    def text_heads(self) -> int:
        return max(1, self.text_width // HEAD_WIDTH)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> ClipConfig:
        """ViT-B/32's state dict -> ClipConfig() (the defaults). A KeyError names a missing key."""
        conv = state["visual.conv1.weight"]  # [width, 3, patch, patch]
        grid = round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1))
        return cls(
            embed_dim=state["text_projection"].shape[1],
            image_size=conv.shape[-1] * grid,
            patch=conv.shape[-1],
            vision_width=conv.shape[0],
            vision_layers=count_blocks(state, "visual.transformer.resblocks."),
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            text_width=state["ln_final.weight"].shape[0],
            text_layers=count_blocks(state, "transformer.resblocks."),
        )


def count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many blocks ``prefix``N. the state dict holds (distinct N)."""
    return len({key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)})


class CLIP(nn.Module):
    """OpenAI CLIP with a ViT image tower; ``forward(images [B, 3, S, S], tokens [T, L])`` -> logits [B, T] =
    logit_scale.exp() * cosine similarities. Names follow the OpenAI/open_clip state-dict keys."""

    def __init__(self, config: ClipConfig = ClipConfig(), quick_gelu: bool = True) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.image_size, config.patch, config.vision_width, config.vision_layers,
                                        config.vision_heads, config.embed_dim, quick_gelu)
        self.transformer = Transformer(config.text_width, config.text_layers, config.text_heads, quick_gelu)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(config.context_length, config.text_width))
        self.ln_final = nn.LayerNorm(config.text_width)
        self.text_projection = nn.Parameter(config.text_width ** -0.5 * torch.randn(config.text_width,
                                                                                    config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] (``preprocess``'s output) -> [B, embed_dim], not normalised."""
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[T, L] token ids (L <= context length) -> [T, embed_dim], not normalised: the feature of each text's
        end-of-text token, which holds the largest id of the vocabulary (so argmax finds it)."""
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        x = self.ln_final(self.transformer(x, causal))
        return x[torch.arange(len(tokens), device=x.device), tokens.argmax(dim=-1)] @ self.text_projection

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return similarity_logits(self, self.encode_image(images), self.encode_text(tokens))


def similarity_logits(model: CLIP, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """[B, D] image and [T, D] text features -> [B, T] = logit_scale.exp() * cos(image, text)."""
    cosine = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return model.logit_scale.exp() * cosine


# ---- the checkpoint --------------------------------------------------------------------------------------------------

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A CLIP checkpoint -> its state dict: a ``torch.load``-able dict (weights only; an open_clip training
    checkpoint's ``state_dict`` entry and DDP's ``module.`` prefix are unwrapped) or a TorchScript archive (OpenAI's
    ``ViT-B-32.pt``), minus the archive's three non-parameter scalars."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"CLIP checkpoint {path} does not exist.")
    try:
        if is_torchscript(path):  # OpenAI's files: torch.load(weights_only=True) refuses TorchScript archives
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first_line = (str(err).splitlines() or [""])[0][:120]
        raise ConfigError(f"CLIP checkpoint {path} is neither a PyTorch state dict nor a TorchScript archive "
                          f"({type(err).__name__}: {first_line}).") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"CLIP checkpoint {path} does not hold a state dict (a mapping of names to tensors).")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    return {key: value for key, value in state.items() if key not in JIT_EXTRA_KEYS}


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive: a zip holding ``constants.pkl`` (torch.save zips never do)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def load_clip(path: str | Path, quick_gelu: bool = True, device: str | torch.device = "cpu") -> CLIP:
    """The CLIP ViT of a checkpoint (``read_state_dict``), sizes from its shapes, loaded with ``strict=True``, in
    eval mode on ``device``. ``quick_gelu=False`` for open_clip models trained with exact GELU (e.g. ``ViT-B-32``
    LAION weights); OpenAI's weights need QuickGELU, which a state dict cannot show."""
    state = read_state_dict(path)
    if "visual.proj" not in state and "visual.attnpool.c_proj.weight" in state:
        raise ConfigError(f"CLIP checkpoint {path} is a ResNet CLIP; lemis reads ViT checkpoints (ViT-B/32).")
    try:
        net = CLIP(ClipConfig.from_state_dict(state), quick_gelu)
    except KeyError as err:
        raise ConfigError(f"CLIP checkpoint {path} is not a CLIP ViT state dict: it lacks {err}.") from None
    except IndexError:
        raise ConfigError(f"CLIP checkpoint {path} is not a CLIP ViT state dict: a tensor has too few dimensions.") \
            from None
    missing, unexpected, shapes = state_dict_mismatch(net, state)
    if missing or unexpected or shapes:
        parts = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("mis-shaped keys", shapes)) if keys]
        raise ConfigError(f"CLIP checkpoint {path} does not match lemis's CLIP ViT: {'; '.join(parts)}.")
    net.load_state_dict(state, strict=True)
    return net.eval().to(device)


def state_dict_mismatch(net: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of ``state`` against ``net``, sorted; all empty = a strict load works."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(key for key in set(own) & set(state) if own[key].shape != state[key].shape)
    return missing, unexpected, shapes


# ---- images ----------------------------------------------------------------------------------------------------------

def to_uint8(slices: torch.Tensor, mode: str = "minmax") -> torch.Tensor:
    """[N, H, W] slices -> [N, H, W] float grey levels in {0..255}.

    ``minmax`` (lemis default, spec ``clip.input``): per-slice min-max to [0, 255], rounded (a constant slice -> 0).
    ``authors_truncate``: what PIL's float->RGB conversion does to the authors' z-scored slices,
    uint8(clip(trunc(x), 0, 255)), so CLIP sees an almost black image."""
    slices = slices.to(torch.float32)
    if mode == "authors_truncate":
        return slices.trunc().clamp(0, 255)
    if mode != "minmax":
        raise ConfigError(f"clip.input must be minmax or authors_truncate, got {mode!r}.")
    lo = slices.amin(dim=(1, 2), keepdim=True)
    span = slices.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, torch.round(255 * (slices - lo) / span.clamp_min(1e-12)), 0.0)


def shorter_side_size(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """(H, W) -> (H', W') with the shorter side = size and the longer truncated, as torchvision's Resize(int)."""
    h, w = shape
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def round_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round half up and clip to [0, 255]: PIL's 8-bit output of a resampling pass."""
    return torch.floor(x + 0.5).clamp(0, 255)


def resize_bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, C, H, W] grey levels -> [N, C, *size] as PIL's BICUBIC resize of a uint8 image (torchvision's Resize on
    PIL images, which CLIP's transform uses): antialiased bicubic (a = -0.5), the width pass first and the height
    pass second, each rounded to uint8; a side that keeps its length is not resampled. Matches PIL to within one
    grey level (PIL's fixed-point weights)."""
    h, w = images.shape[-2:]
    if size[1] != w:
        images = round_uint8(F.interpolate(images, size=(h, size[1]), mode="bicubic", antialias=True,
                                           align_corners=False))
    if size[0] != h:
        images = round_uint8(F.interpolate(images, size=(size[0], size[1]), mode="bicubic", antialias=True,
                                           align_corners=False))
    return images


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """[..., H, W] -> [..., size, size], offsets int(round((H - size) / 2)) as torchvision's CenterCrop."""
    h, w = images.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def preprocess(slices: torch.Tensor, image_size: int = 224, mode: str = "minmax") -> torch.Tensor:
    """[N, H, W] slices -> CLIP's input [N, 3, image_size, image_size]: ``to_uint8``, shorter side to
    ``image_size`` (``resize_bicubic``), centre crop, /255, the grey level replicated to RGB, OpenAI mean/std."""
    grey = to_uint8(slices, mode)[:, None]  # [N, 1, H, W]
    grey = resize_bicubic(grey, shorter_side_size(tuple(grey.shape[-2:]), image_size))
    rgb = centre_crop(grey, image_size).expand(-1, 3, -1, -1) / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (rgb - mean) / std


# ---- text: CLIP's byte-level BPE -------------------------------------------------------------------------------------

START, END = "<|startoftext|>", "<|endoftext|>"
MAX_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48,894 merges of its file: vocabulary 512 + merges + 2 = 49,408
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, CLIP/GPT-2's table: the bytes '!'..'~', '¡'..'¬', '®'..'ÿ' map to themselves
    (in that order), every other byte to chr(256 + k) in byte order, so BPE never sees whitespace or control
    characters. The dict's order is the order of the first 256 vocabulary ids."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    table = {b: chr(b) for b in kept}
    table.update({b: chr(256 + k) for k, b in enumerate(shifted)})
    return table


def clean(text: str) -> str:
    """CLIP's text clean-up: HTML entities unescaped twice, whitespace runs -> one space, stripped, lowercased.
    (CLIP also runs ftfy.fix_text, which repairs mojibake; lemis's prompts are plain ASCII, so it is left out.)"""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def split_words(text: str) -> list[str]:
    """CLIP's pre-tokenisation of cleaned text: at each position the first that matches of <|startoftext|>,
    <|endoftext|>, a contraction ('s 't 're 've 'm 'll 'd), a run of letters, one number character, a run of
    other non-space characters; whitespace is skipped. (CLIP's regex uses \\p{L} / \\p{N}; the stdlib has no such
    classes, so the Unicode categories are tested directly.)"""
    def kind(ch: str) -> str:
        return "space" if ch.isspace() else unicodedata.category(ch)[0]  # "L" letter, "N" number, else other

    words, i = [], 0
    while i < len(text):
        if kind(text[i]) == "space":
            i += 1
            continue
        fixed = next((s for s in (START, END, *CONTRACTIONS) if text.startswith(s, i)), None)
        if fixed is not None:
            j = i + len(fixed)
        elif kind(text[i]) == "N":
            j = i + 1
        else:
            first = kind(text[i])
            same = (lambda k: k == "L") if first == "L" else (lambda k: k not in ("L", "N", "space"))
            j = i + 1
            while j < len(text) and same(kind(text[j])):
                j += 1
        words.append(text[i:j])
        i = j
    return words


class ClipTokenizer:
    """CLIP's tokenizer from its merges file (``bpe_simple_vocab_16e6.txt.gz``, plain or gzipped; a first line
    holding ``#version`` is skipped). Ids: 0-255 the byte characters, 256-511 the same ending a word (``</w>``),
    then one per merge in file order, then <|startoftext|> and <|endoftext|> (the largest id).

    ``tokenizer(texts, context_length)`` -> [T, context_length] int64: start, the BPE ids, end, zero padding; a
    text too long is cut and its last kept id replaced by end (open_clip's rule)."""

    def __init__(self, vocab_path: str | Path) -> None:
        self.path = Path(vocab_path)
        merges = read_merges(self.path)
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.cache: dict[str, tuple[str, ...]] = {}

    def __len__(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> tuple[str, ...]:
        """A word in byte characters -> its BPE symbols: start from its characters (the last marked ``</w>``) and
        repeatedly merge every occurrence of the adjacent pair of lowest merge rank, until no pair has a rank."""
        if word not in self.cache:
            symbols = (*word[:-1], word[-1] + "</w>")
            while len(symbols) > 1:
                pairs = set(zip(symbols[:-1], symbols[1:]))
                best = min(pairs, key=lambda pair: self.ranks.get(pair, math.inf))
                if best not in self.ranks:
                    break
                symbols = merge_pair(symbols, best)
            self.cache[word] = symbols
        return self.cache[word]

    def encode(self, text: str) -> list[int]:
        """A text -> BPE ids without start/end: ``clean``, ``split_words``, each word's UTF-8 bytes as characters
        (``bytes_to_unicode``), ``bpe``."""
        byte_char = bytes_to_unicode()
        ids = []
        for word in split_words(clean(text)):
            if word in (START, END):
                ids.append(self.encoder[word])
                continue
            chars = "".join(byte_char[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(chars))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        tokens = torch.zeros(len(texts), context_length, dtype=torch.long)
        start, end = self.encoder[START], self.encoder[END]
        for row, text in enumerate(texts):
            ids = [start, *self.encode(text), end][:context_length]
            ids[-1] = end  # a cut text still ends with end-of-text, where encode_text reads its feature
            tokens[row, :len(ids)] = torch.tensor(ids)
        return tokens


def open_clip_vocab_path() -> Path | None:
    """CLIP's merges file as shipped inside an installed ``open-clip-torch`` wheel (MIT; ``pip install --no-deps``
    suffices), or None. ``find_spec`` reads the package's location without running its ``__init__``, which imports
    torchvision."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.is_file() else None


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every non-overlapping occurrence of ``pair`` (left to right) by its concatenation."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def read_merges(path: Path) -> list[tuple[str, str]]:
    """A BPE merges file -> its first ``MAX_MERGES`` merges ("a b" per line) in rank order."""
    if not path.is_file():
        raise ConfigError(f"CLIP's BPE vocabulary {path} does not exist (bpe_simple_vocab_16e6.txt.gz of the "
                          f"openai/CLIP or open_clip sources).")
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ConfigError(f"CLIP's BPE vocabulary {path} is unreadable ({err}).") from None
    lines = text.split("\n")
    # the header: "#version: 0.2" in hand-made files, '"bpe_simple_vocab_16e6.txt#version: 0.2' in CLIP's own
    header = int(bool(lines) and "#version" in lines[0])
    merges = []
    for number, line in enumerate(lines[header:header + MAX_MERGES], start=1 + header):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"CLIP's BPE vocabulary {path} line {number} is not a merge 'a b': {line[:60]!r}.")
        merges.append((parts[0], parts[1]))
    return merges


# ---- prompt embeddings -----------------------------------------------------------------------------------------------

@torch.inference_mode()
def encode_prompts(model: CLIP, tokenizer: ClipTokenizer, prompts: Sequence[str] = PROMPTS) -> torch.Tensor:
    """[P] prompts -> [P, embed_dim] text features (not normalised)."""
    tokens = tokenizer(prompts, model.config.context_length)
    if int(tokens.max()) >= model.config.vocab_size:
        raise ConfigError(f"CLIP's BPE vocabulary {tokenizer.path} has {len(tokenizer)} tokens but the checkpoint's "
                          f"token embedding only {model.config.vocab_size}: they belong to different models.")
    device = model.logit_scale.device
    return model.encode_text(tokens.to(device)).float().cpu()


def save_text_features(path: str | Path, prompts: Sequence[str], features: torch.Tensor) -> None:
    """Store [P, D] prompt embeddings with their prompts, for machines without the BPE vocabulary file."""
    torch.save({"prompts": list(prompts), "text_features": features.detach().float().cpu()}, Path(path))


def load_text_features(path: str | Path, prompts: Sequence[str] = PROMPTS) -> torch.Tensor:
    """The [P, D] embeddings ``save_text_features`` stored for exactly these ``prompts`` (same text and order)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"CLIP text embeddings {path} do not exist.")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"CLIP text embeddings {path} are unreadable ({type(err).__name__}).") from None
    if not isinstance(stored, Mapping) or not isinstance(stored.get("text_features"), torch.Tensor):
        raise ConfigError(f"CLIP text embeddings {path} hold no 'text_features' tensor.")
    if list(stored.get("prompts", [])) != list(prompts):
        raise ConfigError(f"CLIP text embeddings {path} were computed for other prompts than the configured ones.")
    features = stored["text_features"]
    if features.ndim != 2 or len(features) != len(prompts):
        raise ConfigError(f"CLIP text embeddings {path} must be [{len(prompts)}, D], got {tuple(features.shape)}.")
    return features.float()


def prompt_features(model: CLIP, prompts: Sequence[str] = PROMPTS, vocab_path: str | Path | None = None,
                    embeddings_path: str | Path | None = None) -> torch.Tensor:
    """[P, embed_dim] features of the prompts, from exactly one source: CLIP's BPE vocabulary file (the prompts are
    tokenised and encoded) or a file of precomputed embeddings (``save_text_features``)."""
    if (vocab_path is None) == (embeddings_path is None):
        raise ConfigError("CLIP's prompts need exactly one of vocab_path (bpe_simple_vocab_16e6.txt.gz) and "
                          "embeddings_path (precomputed text embeddings).")
    if vocab_path is not None:
        return encode_prompts(model, ClipTokenizer(vocab_path), prompts)
    features = load_text_features(embeddings_path, prompts)
    if features.shape[1] != model.config.embed_dim:
        raise ConfigError(f"CLIP text embeddings {embeddings_path} are {features.shape[1]}-dimensional but the "
                          f"checkpoint embeds into {model.config.embed_dim}.")
    return features


# ---- the zero-shot slice labeller ------------------------------------------------------------------------------------

@torch.inference_mode()
def zero_shot_probabilities(model: CLIP, slices: torch.Tensor, text_features: torch.Tensor, mode: str = "minmax",
                            batch_size: int = 64) -> torch.Tensor:
    """[N, H, W] slices and [P, D] prompt features -> [N, P] = softmax over prompts of
    logit_scale.exp() * cos(image, prompt); ``batch_size`` slices go through the image tower at a time."""
    device = model.logit_scale.device
    text = text_features.to(device=device, dtype=torch.float32)
    probabilities = []
    for i in range(0, len(slices), batch_size):
        images = preprocess(torch.as_tensor(slices[i:i + batch_size]), model.config.image_size, mode)
        logits = similarity_logits(model, model.encode_image(images.to(device)), text)
        probabilities.append(logits.softmax(dim=-1).cpu())
    return torch.cat(probabilities) if probabilities else torch.zeros(0, len(text))


def tumour_probability(model: CLIP, slices: torch.Tensor, text_features: torch.Tensor, mode: str = "minmax",
                       batch_size: int = 64) -> torch.Tensor:
    """[N, H, W] slices and the [2, D] features of (normal, tumour) prompts -> [N] p(tumour); the spec's slice is
    certain iff max(p, 1 - p) >= 0.6, its raw label 1 iff p > 0.5 (argmax; a tie goes to index 0, normal)."""
    if len(text_features) != 2:
        raise ConfigError(f"the CLIP slice labeller needs 2 prompts (normal, tumour), got {len(text_features)}.")
    return zero_shot_probabilities(model, slices, text_features, mode, batch_size)[:, 1]
