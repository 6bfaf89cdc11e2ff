"""lemis's CLIP ViT (spec/methods/clisc.md, stage 0, CLIP backend): a checkpoint in OpenAI's key layout, written here
from a hand-made key list with random values, loads strictly with its sizes read off the shapes; a bad file is one
sentence naming it; OpenAI's TorchScript archives load; the BPE tokenizer, the preprocessing and the zero-shot
labeller agree with values computed by hand."""
from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from lemis.errors import ConfigError
from lightning_modules.nets.clip_vit import (
    CLIP,
    MEAN,
    PROMPTS,
    STD,
    ClipConfig,
    ClipTokenizer,
    centre_crop,
    load_clip,
    open_clip_vocab_path,
    preprocess,
    prompt_features,
    resize_bicubic,
    save_text_features,
    shorter_side_size,
    split_words,
    to_uint8,
    tumour_probability,
    zero_shot_probabilities,
)

TINY = dict(width=32, layers=2, patch=8, image=32, context=16, vocab=520, text_width=32, text_layers=2, embed=16)
VIT_B_32 = dict(width=768, layers=12, patch=32, image=224, context=77, vocab=49408, text_width=512, text_layers=12,
                embed=512)


def openai_layout(width, layers, patch, image, context, vocab, text_width, text_layers, embed):
    """Key -> shape of OpenAI's CLIP ViT state dict (clip/model.py), written out by hand."""
    grid = image // patch
    shapes = {
        "visual.class_embedding": (width,), "visual.positional_embedding": (grid * grid + 1, width),
        "visual.proj": (width, embed), "visual.conv1.weight": (width, 3, patch, patch),
        "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
        "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,),
        "positional_embedding": (context, text_width), "text_projection": (text_width, embed), "logit_scale": (),
        "token_embedding.weight": (vocab, text_width),
        "ln_final.weight": (text_width,), "ln_final.bias": (text_width,),
    }
    for tower, w, n in (("visual.transformer", width, layers), ("transformer", text_width, text_layers)):
        for i in range(n):
            block = f"{tower}.resblocks.{i}."
            shapes.update({
                block + "attn.in_proj_weight": (3 * w, w), block + "attn.in_proj_bias": (3 * w,),
                block + "attn.out_proj.weight": (w, w), block + "attn.out_proj.bias": (w,),
                block + "ln_1.weight": (w,), block + "ln_1.bias": (w,),
                block + "mlp.c_fc.weight": (4 * w, w), block + "mlp.c_fc.bias": (4 * w,),
                block + "mlp.c_proj.weight": (w, 4 * w), block + "mlp.c_proj.bias": (w,),
                block + "ln_2.weight": (w,), block + "ln_2.bias": (w,),
            })
    return shapes


def random_state(seed: int = 0, **sizes) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {key: 0.2 * torch.randn(shape, generator=generator)
             for key, shape in openai_layout(**(sizes or TINY)).items()}
    state["logit_scale"] = torch.tensor(math.log(100.0))  # the trained ViT-B/32 value
    return state


@pytest.fixture
def tiny_path(tmp_path):
    path = tmp_path / "tiny_clip.pt"
    torch.save(random_state(), path)
    return path


def one_sentence(err: pytest.ExceptionInfo, path) -> str:
    message = str(err.value)
    assert str(path) in message and "\n" not in message and message.endswith("."), message
    return message


# ---- the network and its checkpoint ----------------------------------------------------------------------------------

def test_vit_b32_has_openai_keys_shapes_and_size():
    with torch.device("meta"):  # shapes only: no 600 MB of random weights
        net = CLIP()
    layout = openai_layout(**VIT_B_32)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == layout
    assert sum(p.numel() for p in net.parameters()) == 151_277_313  # OpenAI's count for ViT-B/32
    assert ClipConfig.from_state_dict(net.state_dict()) == ClipConfig()
    assert (ClipConfig().vision_heads, ClipConfig().text_heads) == (12, 8)


def test_tiny_checkpoint_loads_strictly_with_sizes_from_shapes(tiny_path):
    net = load_clip(tiny_path)
    assert net.config == ClipConfig(embed_dim=16, image_size=32, patch=8, vision_width=32, vision_layers=2,
                                    context_length=16, vocab_size=520, text_width=32, text_layers=2)
    state = random_state()
    assert all(torch.equal(value, state[key]) for key, value in net.state_dict().items())
    assert not net.training
    with torch.no_grad():
        assert net.encode_image(torch.randn(3, 3, 32, 32)).shape == (3, 16)
        assert net.encode_text(torch.randint(0, 519, (2, 16))).shape == (2, 16)
        assert net(torch.randn(3, 3, 32, 32), torch.randint(0, 519, (2, 16))).shape == (3, 2)


def test_training_checkpoint_wrappers_are_unwrapped(tmp_path):
    path = tmp_path / "epoch_32.pt"  # open_clip's training checkpoint of a DDP run
    torch.save({"epoch": 32, "state_dict": {"module." + k: v for k, v in random_state().items()}}, path)
    assert load_clip(path).config.vision_layers == 2


def test_text_features_ignore_tokens_after_end_of_text(tiny_path):
    """The causal mask: padding after the end-of-text token cannot reach the feature read at that token."""
    net = load_clip(tiny_path)
    tokens = torch.tensor([[515, 3, 7, 516] + [0] * 12])
    noisy = tokens.clone()
    noisy[0, 4:] = torch.randint(0, 500, (12,))
    with torch.no_grad():
        torch.testing.assert_close(net.encode_text(tokens), net.encode_text(noisy))


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_mismatched_checkpoint_is_one_sentence_naming_the_file(tmp_path, change):
    state = random_state()
    if change == "missing":
        del state["visual.ln_post.bias"]
    elif change == "extra":
        state["visual.attn_pool.query"] = torch.zeros(4)
    else:
        state["ln_final.bias"] = torch.zeros(31)
    path = tmp_path / f"{change}.pt"
    torch.save(state, path)
    with pytest.raises(ConfigError) as err:
        load_clip(path)
    message = one_sentence(err, path)
    assert {"missing": "missing keys visual.ln_post.bias", "extra": "unexpected keys visual.attn_pool.query",
            "shape": "mis-shaped keys ln_final.bias"}[change] in message


def test_missing_corrupt_or_foreign_file_is_one_sentence(tmp_path):
    absent = tmp_path / "ViT-B-32.pt"
    with pytest.raises(ConfigError) as err:
        load_clip(absent)
    assert "does not exist" in one_sentence(err, absent)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError) as err:
        load_clip(corrupt)
    assert "neither" in one_sentence(err, corrupt)
    foreign = tmp_path / "unet.pt"
    torch.save({"conv.weight": torch.zeros(2)}, foreign)
    with pytest.raises(ConfigError) as err:
        load_clip(foreign)
    assert "lacks 'visual.conv1.weight'" in one_sentence(err, foreign)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_archive_loads_like_openai_pt(tmp_path):
    """OpenAI's .pt files are TorchScript archives holding the weights plus three scalar buffers."""
    source = CLIP(ClipConfig.from_state_dict(random_state()))
    source.load_state_dict(random_state())
    source.eval()
    for name, value in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 520)):
        source.register_buffer(name, torch.tensor(value))
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 519, (3, 16))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace(source, (images, tokens), check_trace=False).save(str(path))
    net = load_clip(path)
    with torch.no_grad():
        torch.testing.assert_close(net(images, tokens), source(images, tokens))


# ---- preprocessing ---------------------------------------------------------------------------------------------------

def test_to_uint8_modes():
    slices = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    assert to_uint8(slices).tolist() == [[[0, 64], [128, 255]], [[0, 0], [0, 0]]]  # 255 * 1/4 = 63.75 -> 64
    z = torch.tensor([[[-0.7, 0.9], [2.5, 300.2]]])
    assert to_uint8(z, "authors_truncate").tolist() == [[[0, 0], [2, 255]]]  # trunc, then clip: almost black
    with pytest.raises(ConfigError, match="clip.input"):
        to_uint8(z, "zscore")


def test_shorter_side_and_centre_crop_follow_torchvision():
    assert shorter_side_size((2, 4), 1) == (1, 2)
    assert shorter_side_size((240, 155), 224) == (int(224 * 240 / 155), 224) == (346, 224)
    grid = torch.arange(12.0).view(1, 3, 4)
    assert centre_crop(grid, 2).tolist() == [[[1, 2], [5, 6]]]  # top round(0.5) = 0, left round(1.0) = 1


def test_bicubic_resize_of_a_2x4_image_by_hand():
    """(2, 4) -> (1, 2). Width pass 4 -> 2: output column 0 is centred on input x = 1.0, pixels at distances
    0.5, 0.5, 1.5, 2.5 -> kernel (a = -0.5, stretched x2) k(.25) = .8671875, k(.25), k(.75) = .2265625,
    k(1.25) = -.0703125, normalised by their sum 1.890625; column 1 is the mirror image. Row [0, 100, 200, 255]
    -> 60.35 -> 60 and 220.68 -> 221; the constant row 20 stays 20. Height pass 2 -> 1: equal weights ->
    (60 + 20) / 2 = 40 and (221 + 20) / 2 = 120.5 -> 121 (PIL rounds half up)."""
    image = torch.tensor([[[[0.0, 100.0, 200.0, 255.0], [20.0, 20.0, 20.0, 20.0]]]])
    assert resize_bicubic(image, (1, 2)).tolist() == [[[[40.0, 121.0]]]]
    expected = [[[(40 / 255 - MEAN[c]) / STD[c]]] for c in range(3)]  # crop (1, 2) -> (1, 1): left round(0.5) = 0
    torch.testing.assert_close(preprocess(image[0, 0][None], image_size=1, mode="authors_truncate"),
                               torch.tensor([expected]))


def test_preprocess_without_resize_crops_and_normalises_by_hand():
    image = torch.tensor([[[0.0, 51.0, 102.0, 255.0], [255.0, 204.0, 153.0, 0.0]]])  # min-max keeps it
    expected = [[[(v / 255 - MEAN[c]) / STD[c] for v in row] for row in ([51, 102], [204, 153])] for c in range(3)]
    torch.testing.assert_close(preprocess(image, image_size=2), torch.tensor([expected]))


def test_resize_matches_pil_within_one_grey_level():
    from PIL import Image

    rng = np.random.default_rng(3)
    for shape, size in (((37, 53), 32), ((20, 12), 30)):
        image = rng.integers(0, 256, shape).astype(np.uint8)
        h, w = shorter_side_size(shape, size)
        reference = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC), dtype=np.float32)
        ours = resize_bicubic(torch.from_numpy(image).float()[None, None], (h, w))[0, 0].numpy()
        assert np.abs(ours - reference).max() <= 1


# ---- the tokenizer ---------------------------------------------------------------------------------------------------

def tiny_vocab(folder, header: str = "#version: 0.2\n"):
    """Byte ids: '!'..'~' are 0..93 ('a' 64, 'e' 68, 'h' 71, 'i' 72, 's' 82, 't' 83, ',' 11, "'" 6, '&' 5, '2' 17,
    '4' 19), '¡'..'¬' 94..105, '®'..'ÿ' 106..187; +256 with </w>; merges 512 'hi</w>', 513 'th', 514 'the</w>';
    515 start, 516 end."""
    path = folder / "bpe_tiny.txt.gz"
    path.write_bytes(gzip.compress((header + "h i</w>\nt h\nth e</w>\n").encode()))
    return path


# CLIP's own file starts '"bpe_simple_vocab_16e6.txt#version: 0.2' (a gzip artefact); both headers are skipped
@pytest.fixture(params=["#version: 0.2\n", '"bpe_simple_vocab_16e6.txt#version: 0.2\n', ""])
def tokenizer(tmp_path, request):
    return ClipTokenizer(tiny_vocab(tmp_path, request.param))


def test_tokenizer_ids_by_hand(tokenizer):
    assert len(tokenizer) == 517
    assert tokenizer("Hi, the a!", context_length=8).tolist() == [[515, 512, 11 + 256, 514, 64 + 256, 256, 516, 0]]
    # "it" has no merge; "'s" is split off; digits one by one; "é" = bytes C3 A9 -> 'Ã' (127), '©' (102) + </w>
    assert tokenizer("it's 42 é", context_length=12).tolist() == [
        [515, 72, 83 + 256, 6, 82 + 256, 19 + 256, 17 + 256, 127, 102 + 256, 516, 0, 0]]
    # "his": the merge is (h, i</w>), not (h, i): nothing merges; HTML entity and whitespace cleaned, lowercased
    assert tokenizer("his  HI&amp;\n\tthe ", context_length=9).tolist() == [
        [515, 71, 72, 82 + 256, 512, 5 + 256, 514, 516, 0]]


def test_tokenizer_truncates_with_end_of_text(tokenizer):
    assert tokenizer(["Hi, the a!", "hi"], context_length=4).tolist() == [[515, 512, 267, 516], [515, 512, 516, 0]]


def test_split_words_follows_clips_pattern():
    assert split_words("<|startoftext|>it's x²!?'ll 3d") == [
        "<|startoftext|>", "it", "'s", "x", "²", "!?'", "ll", "3", "d"]


def test_clips_own_vocabulary_gives_clips_ids():
    vocab = open_clip_vocab_path()  # make install puts the open-clip-torch wheel in (--no-deps): fail, never skip
    assert vocab is not None, "CLIP's vocabulary is absent: pip install --no-deps open-clip-torch==3.3.0"
    tokens = ClipTokenizer(vocab)(["a photo of a cat", *PROMPTS])
    assert tokens[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert tokens.argmax(dim=1).tolist() == [6, 19, 19]  # both prompts: 18 BPE tokens between start and end


def test_bad_vocabulary_file_is_one_sentence(tmp_path):
    bad = tmp_path / "bpe.txt"
    bad.write_text("#version: 0.2\nh i j\n")
    with pytest.raises(ConfigError) as err:
        ClipTokenizer(bad)
    assert "line 2" in one_sentence(err, bad)
    with pytest.raises(ConfigError) as err:
        ClipTokenizer(tmp_path / "absent.txt.gz")
    one_sentence(err, tmp_path / "absent.txt.gz")


# ---- the zero-shot labeller ------------------------------------------------------------------------------------------

def test_labeller_probabilities_sum_to_one_and_ignore_batch_size(tiny_path, tmp_path):
    net = load_clip(tiny_path)
    text = prompt_features(net, PROMPTS, vocab_path=tiny_vocab(tmp_path))
    assert text.shape == (2, 16)
    slices = torch.from_numpy(np.random.default_rng(0).normal(100, 20, (5, 40, 28)).astype(np.float32))
    p = zero_shot_probabilities(net, slices, text, batch_size=5)
    assert p.shape == (5, 2) and torch.all(p >= 0)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(5))
    torch.testing.assert_close(zero_shot_probabilities(net, slices, text, batch_size=2), p)
    torch.testing.assert_close(tumour_probability(net, slices, text, batch_size=1), p[:, 1])
    # by hand for one slice: softmax(logit_scale.exp() * cos)
    with torch.no_grad():
        image = net.encode_image(preprocess(slices[:1], 32))
        cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        torch.testing.assert_close(p[0], torch.softmax(100.0 * cos, dim=0))


def test_precomputed_embeddings_replace_the_vocabulary(tiny_path, tmp_path):
    net = load_clip(tiny_path)
    from_vocab = prompt_features(net, PROMPTS, vocab_path=tiny_vocab(tmp_path))
    path = tmp_path / "prompts.pt"
    save_text_features(path, PROMPTS, from_vocab)
    torch.testing.assert_close(prompt_features(net, PROMPTS, embeddings_path=path), from_vocab)
    with pytest.raises(ConfigError) as err:
        prompt_features(net, PROMPTS[::-1], embeddings_path=path)
    assert "other prompts" in one_sentence(err, path)
    with pytest.raises(ConfigError, match="exactly one"):
        prompt_features(net, PROMPTS)


def test_vocabulary_larger_than_the_checkpoint_is_refused(tmp_path):
    path = tmp_path / "small_vocab.pt"
    torch.save(random_state(**{**TINY, "vocab": 300}), path)
    with pytest.raises(ConfigError) as err:
        prompt_features(load_clip(path), PROMPTS, vocab_path=tiny_vocab(tmp_path))
    one_sentence(err, tmp_path / "bpe_tiny.txt.gz")
