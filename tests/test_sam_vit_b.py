"""SAM ViT-B (spec/methods/clisc.md, stage 2, "Backends": ``sam_vit_b``): lemis's definition has the official
checkpoint's keys, shapes and parameter count; a user-given checkpoint loads strictly or fails with one sentence
naming it; the 1024 frame (SamPredictor's preprocessing, prompt scaling and mask post-processing); the decomposed
relative position bias and window padding; ``segment`` end to end on a tiny random network.

The official weights (375 MB) are not needed: the real configuration is built on the meta device.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lemis.errors import ConfigError
from lightning_modules.clisc import equalise
from lightning_modules.nets.sam_vit_b import (
    PIXEL_MEAN,
    PIXEL_STD,
    SamPromptEncoder,
    SamViTB,
    ViTBlock,
    box_to_frame,
    coords_to_frame,
    load_sam_vit_b,
    masks_from_logits,
    rel_pos_bias,
    segment,
    to_frame,
    window_partition,
    window_unpartition,
)

# The official sam_vit_b's parameters (sum of p.numel() over sam.parameters(), the number MedSAM's train script
# prints), by hand:
#   image encoder 89,670,912 =
#     patch_embed.proj 768 * 3 * 16 * 16 + 768                                                         590,592
#     pos_embed 64 * 64 * 768                                                                        3,145,728
#     per block, without relative tables: norm1 2 * 768, qkv 768 * 2304 + 2304, proj 768 * 768 + 768,
#       norm2 2 * 768, lin1 768 * 3072 + 3072, lin2 3072 * 768 + 768                                 7,087,872
#     relative tables (head dim 64): windowed 2 * 27 * 64 = 3,456, global 2 * 127 * 64 = 16,256
#     8 windowed blocks 8 * 7,091,328 = 56,730,624; 4 global blocks (2, 5, 8, 11) 4 * 7,104,128 = 28,416,512
#     neck 768 * 256 + 2 * 256 + 256 * 256 * 9 + 2 * 256                                              787,456
#   prompt encoder 6,220 = point embeddings 4 * 256 + not-a-point 256 + no-mask 256 + mask downscaling
#     (1->4 2x2 conv 20, LN 8, 4->16 2x2 conv 272, LN 32, 16->256 1x1 conv 4,352 = 4,684)
#   mask decoder 4,058,340 (LiteMedSAM's decoder: the same module, 120 tensors)
# MedSAM's script also prints 93,729,252 trainable = this minus the frozen prompt encoder's 6,220.
PARAMETERS = 93_735_472
# The checkpoint also holds the prompt encoder's Gaussian PE matrix (a buffer, 2 * 128): 93,735,728 elements,
# 374,942,912 bytes in float32 (the published file has 375,042,383 bytes). 177 + 17 + 120 = 314 tensors.
CHECKPOINT_ELEMENTS = PARAMETERS + 256
TINY = dict(image_size=64, patch_size=8, dim=32, depth=3, heads=2, window=3, global_indexes=(1,), prompt_dim=32)


def tiny_net(seed: int = 0) -> SamViTB:
    """A tiny SAM (64 frame, 8x8 grid, windows of 3 so that the grid is padded) with every tensor random."""
    torch.manual_seed(seed)
    net = SamViTB(**TINY).eval()
    with torch.no_grad():
        for tensor in net.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * (0.2 if tensor.ndim > 1 else 1.0))
    return net


def test_vit_b_has_the_official_parameter_count_keys_and_shapes():
    with torch.device("meta"):
        net = SamViTB()
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == PARAMETERS
    assert sum(t.numel() for t in state.values()) == CHECKPOINT_ELEMENTS and len(state) == 314
    assert sum(p.numel() for p in net.image_encoder.parameters()) == 89_670_912
    assert sum(p.numel() for p in net.prompt_encoder.parameters()) == 6_220
    assert sum(p.numel() for p in net.mask_decoder.parameters()) == 4_058_340
    shapes = {
        "image_encoder.patch_embed.proj.weight": [768, 3, 16, 16],
        "image_encoder.pos_embed": [1, 64, 64, 768],
        "image_encoder.blocks.0.attn.rel_pos_h": [27, 64],
        "image_encoder.blocks.1.attn.rel_pos_w": [27, 64],
        "image_encoder.blocks.2.attn.rel_pos_h": [127, 64],
        "image_encoder.blocks.11.attn.rel_pos_w": [127, 64],
        "image_encoder.blocks.0.attn.qkv.weight": [2304, 768],
        "image_encoder.blocks.0.mlp.lin1.weight": [3072, 768],
        "image_encoder.neck.0.weight": [256, 768, 1, 1],
        "image_encoder.neck.2.weight": [256, 256, 3, 3],
        "image_encoder.neck.3.bias": [256],
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": [2, 128],
        "prompt_encoder.mask_downscaling.0.weight": [4, 1, 2, 2],
        "mask_decoder.iou_prediction_head.layers.2.weight": [4, 256],
        "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight": [32, 256],
    }
    assert {key: list(state[key].shape) for key in shapes} == shapes
    assert [i for i, block in enumerate(net.image_encoder.blocks) if block.window == 0] == [2, 5, 8, 11]
    assert {block.window for block in net.image_encoder.blocks} == {0, 14}
    assert {m.eps for m in net.image_encoder.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}


# ---- loading a user-given checkpoint ---------------------------------------------------------------------------------

def one_sentence(err: pytest.ExceptionInfo, path) -> str:
    message = str(err.value)
    assert str(path) in message and message.endswith(".") and message.count(". ") == 0, message
    return message


def test_tiny_checkpoint_loads_strictly(tmp_path):
    state = tiny_net(1).state_dict()
    torch.save(state, tmp_path / "sam.pth")
    net = load_sam_vit_b(tmp_path / "sam.pth", **TINY)
    assert not net.training
    loaded = net.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("fault", ["missing path", "missing key", "unexpected key", "wrong shape", "not a pickle"])
def test_bad_checkpoints_are_one_sentence_naming_the_path(tmp_path, fault):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    state = SamViTB(**TINY).state_dict()
    if fault == "missing key":
        del state["image_encoder.blocks.1.attn.rel_pos_h"]
    elif fault == "unexpected key":
        state["image_encoder.blocks.9.norm1.weight"] = torch.zeros(32)
    elif fault == "wrong shape":
        state["image_encoder.blocks.0.attn.rel_pos_h"] = torch.zeros(7, 16)
    if fault == "not a pickle":
        path.write_bytes(b"not the weights")
    elif fault != "missing path":
        torch.save(state, path)
    with pytest.raises(ConfigError) as err:
        load_sam_vit_b(path, **TINY)
    message = one_sentence(err, path)
    expected = {"missing path": "does not exist", "missing key": "lacks the key image_encoder.blocks.1.attn.rel_pos_h",
                "unexpected key": "unexpected key image_encoder.blocks.9.norm1.weight",
                "wrong shape": "image_encoder.blocks.0.attn.rel_pos_h with shape [7, 16] where SAM ViT-B has [5, 16]",
                "not a pickle": "could not be read"}[fault]
    assert expected in message


# ---- the 1024 frame --------------------------------------------------------------------------------------------------

def test_prompts_scale_to_the_1024_frame():
    # 240x240: s = 1024 / 240 on both axes.
    np.testing.assert_allclose(box_to_frame((50, 60, 120, 150), (240, 240)), (213.333333, 256, 512, 640), atol=1e-5)
    np.testing.assert_allclose(coords_to_frame([[30, 45], [0, 239]], (240, 240)), [[128, 192], [0, 1019.733333]],
                               atol=1e-5)
    # 170x140: resized to (1024, int(140 * 1024 / 170 + 0.5)) = (1024, 843); SamPredictor scales x by 843 / 140 and
    # y by 1024 / 170 (ResizeLongestSide.apply_coords), not both by 1024 / 170.
    np.testing.assert_allclose(box_to_frame(np.array([[10, 20, 100, 150]]), (170, 140)),
                               [[10 * 843 / 140, 20 * 1024 / 170, 100 * 843 / 140, 150 * 1024 / 170]], rtol=1e-12)


def test_frame_is_pil_bilinear_normalised_and_padded():
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (170, 140)).astype(np.float32)
    framed = to_frame(image)
    assert framed.shape == (3, 1024, 1024) and framed.dtype == torch.float32
    assert torch.all(framed[:, :, 843:] == 0)  # padded after the normalisation, as Sam.preprocess
    grey = equalise(image)
    rgb = np.asarray(Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).resize((843, 1024), Image.BILINEAR))
    expected = (torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) - torch.tensor(PIXEL_MEAN)[:, None, None]) \
        / torch.tensor(PIXEL_STD)[:, None, None]
    torch.testing.assert_close(framed[:, :, :843], expected, atol=0, rtol=0)


def test_masks_are_upscaled_cropped_and_returned_at_the_slice_size():
    # 240x240: a 256x256 logit map positive on its top 128 rows -> the top 120 rows of the slice.
    logits = torch.where(torch.arange(256)[:, None] < 128, 1.0, -1.0).expand(256, 256)[None, None]
    mask = masks_from_logits(logits, (240, 240))
    assert mask.shape == (1, 240, 240) and mask.dtype == torch.bool
    assert mask[0, :120].all() and not mask[0, 120:].any()
    # 170x140: resized to 1024x843; logits positive over the image (low-res columns < 843 / 4) and negative over the
    # padding: the padding is cropped before the resize to (H, W), so the whole slice is foreground.
    logits = torch.where(torch.arange(256) < 211, 1.0, -1.0).expand(256, 256)[None, None]
    mask = masks_from_logits(logits, (170, 140))
    assert mask.shape == (1, 170, 140) and mask.all()


# ---- the image encoder -----------------------------------------------------------------------------------------------

def test_decomposed_relative_position_bias_by_hand():
    """A 2x2 grid, head dim 1, q = (1, 2; 3, 4), rel_pos_h = (10, 20, 30), rel_pos_w = (1, 2, 3) for row/column
    offsets (query - key) -1, 0, +1: bias[(i, j), (k, l)] = q(i, j) * (rel_pos_h[i - k + 1] + rel_pos_w[j - l + 1])."""
    q = torch.tensor([1.0, 2.0, 3.0, 4.0])[None, :, None]  # [1, 4 tokens, 1]
    bias = rel_pos_bias(q, torch.tensor([[10.0], [20.0], [30.0]]), torch.tensor([[1.0], [2.0], [3.0]]), (2, 2))
    expected = torch.tensor([[22.0, 21, 12, 11],     # q = 1 at (0, 0): keys (0,0) 20+2, (0,1) 20+1, (1,0) 10+2, ...
                             [46.0, 44, 26, 24],     # q = 2 at (0, 1): (20+3, 20+2, 10+3, 10+2) * 2
                             [96.0, 93, 66, 63],     # q = 3 at (1, 0): (30+2, 30+1, 20+2, 20+1) * 3
                             [132.0, 128, 92, 88]])  # q = 4 at (1, 1): (30+3, 30+2, 20+3, 20+2) * 4
    torch.testing.assert_close(bias[0], expected)
    with pytest.raises(ValueError, match="do not fit"):
        rel_pos_bias(q, torch.zeros(5, 1), torch.zeros(3, 1), (2, 2))


def test_window_padding_crops_back_and_blocks_keep_the_shape():
    x = torch.randn(2, 5, 5, 8)
    windows = window_partition(x, 4)  # padded to 8x8: 4 windows per image
    assert windows.shape == (8, 4, 4, 8)
    assert torch.equal(windows[1, :, :1], x[0, :4, 4:5]) and torch.all(windows[1, :, 1:] == 0)
    assert torch.equal(window_unpartition(windows, 4, (5, 5)), x)

    torch.manual_seed(0)
    windowed, global_ = ViTBlock(8, 2, window=4, grid=5), ViTBlock(8, 2, window=0, grid=5)
    assert windowed.attn.rel_pos_h.shape == (7, 4) and global_.attn.rel_pos_h.shape == (9, 4)
    with torch.no_grad():
        assert windowed(x).shape == global_(x).shape == (2, 5, 5, 8)
        # On a 4x4 map one window of 4 is the whole map: a windowed block equals a global one of the same weights.
        square = ViTBlock(8, 2, window=0, grid=4)
        for p in windowed.parameters():
            p.copy_(torch.randn_like(p))
        square.load_state_dict(windowed.state_dict())
        torch.testing.assert_close(windowed(x[:, :4, :4]), square(x[:, :4, :4]))


def test_point_prompts_come_before_the_box_corners():
    torch.manual_seed(0)
    encoder = SamPromptEncoder(dim=16, embedding=8, frame=64)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0]])
    coords, labels = torch.tensor([[[10.0, 20.0], [30.0, 5.0], [0.0, 0.0]]]), torch.tensor([[1, 0, -1]])
    sparse, dense = encoder(boxes, (coords, labels))
    corners, dense_box = encoder(boxes)
    assert sparse.shape == (1, 5, 16) and torch.equal(sparse[:, 3:], corners) and torch.equal(dense, dense_box)
    pe = encoder.pe_layer((coords[0] + 0.5) / 64)
    torch.testing.assert_close(sparse[0, 0], pe[0] + encoder.point_embeddings[1].weight[0])
    torch.testing.assert_close(sparse[0, 1], pe[1] + encoder.point_embeddings[0].weight[0])
    torch.testing.assert_close(sparse[0, 2], encoder.not_a_point_embed.weight[0])


# ---- segment ---------------------------------------------------------------------------------------------------------

def test_segment_end_to_end_on_a_tiny_network():
    net = tiny_net(2)  # a seed whose random logits are not all of one sign
    rng = np.random.default_rng(0)
    images = rng.normal(100, 20, (3, 40, 50)).astype(np.float32)
    boxes = np.array([[5, 6, 30, 35], [0, 0, 50, 40], [10, 12, 20, 25]])
    points = [(np.array([[12, 14], [20, 30], [5, 6], [30, 6], [5, 35]]), np.array([1, 1, 0, 0, 0])), None,
              (np.array([[15, 18]]), np.array([1]))]
    masks, embeddings = segment(net, images, boxes, points, batch_size=2)
    assert masks.shape == (3, 40, 50) and masks.dtype == bool and 0 < masks.mean() < 1
    assert embeddings.shape == (3, 32, 8, 8) and embeddings.dtype == torch.float32

    again, same = segment(net, images, boxes, points, embeddings=embeddings)
    assert same is embeddings and np.array_equal(again, masks)
    # Slices with different point counts in one decoder batch get the masks they get alone.
    alone = np.stack([segment(net, images[i], boxes[i], points[i])[0] for i in range(3)])
    assert alone.shape == (3, 40, 50) and np.mean(alone != masks) < 1e-3
    # The points reach the decoder (their logits differ from the box's alone).
    frame_box = torch.as_tensor(box_to_frame(boxes[:1], (40, 50), 64), dtype=torch.float32)
    frame_points = (torch.as_tensor(coords_to_frame(points[0][0], (40, 50), 64)[None], dtype=torch.float32),
                    torch.as_tensor(points[0][1][None]))
    with torch.no_grad():
        box_only = net.decode(embeddings[:1], frame_box)
        with_points = net.decode(embeddings[:1], frame_box, frame_points)
    assert box_only.shape == with_points.shape == (1, 1, 32, 32) and (box_only - with_points).abs().max() > 1e-2
    with pytest.raises(ValueError, match="embeddings must be"):
        segment(net, images, boxes, embeddings=embeddings[:2])
    with pytest.raises(ValueError, match="one label"):
        segment(net, images, boxes, [(np.zeros((2, 2)), np.array([1, 2])), None, None])
