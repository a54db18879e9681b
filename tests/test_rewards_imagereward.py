"""ImageReward on a tiny random instance saved in the original ``ImageReward.pt`` key layout.

The layout (``tiny_rewards.imagereward_layout``) is written out independently of
``rewardtune.rewards.imagereward`` (whose docstring cites its sources): BLIP_Pretrain under ``blip.`` (timm-style
ViT ``visual_encoder``, BLIP med BERT ``text_encoder`` with cross-attention, no token-type table, plus the unused
``vision_proj``/``text_proj``/``position_ids``) and the head ``mlp.layers.{0,2,4,6,7}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_rewards import BERT_SPECIALS, BERT_WORDS, IMAGEREWARD_VISION, imagereward_options
from torch import nn

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.rewards import load_reward

VISION = IMAGEREWARD_VISION
SPECIALS, WORDS = BERT_SPECIALS, BERT_WORDS
MEAN, STD = 0.16717362830052426, 1.0333394966054072
PROMPTS = ["a red circle", "a photo of a cat on the background", "a big blue square", "dog"]
UNUSED = ("blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
          "blip.text_encoder.embeddings.position_ids")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    options = imagereward_options(root)
    state = torch.load(options["checkpoint"], weights_only=True)
    med = json.loads(Path(options["med_config"]).read_text())
    return {"root": root, "med": med, "state": state, "options": options,
            "reward": load_reward("imagereward", **options)}


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(seed))


def test_keys_map_one_to_one_and_blip_tokenizer(tiny):
    reward, state = tiny["reward"], tiny["state"]
    loaded = reward.model.state_dict()
    assert set(loaded) == set(state) - set(UNUSED)
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    tok = reward.tokenizer
    assert len(tok) == len(SPECIALS) + len(WORDS) + 2 == tiny["med"]["vocab_size"]
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tok) - 2, len(tok) - 1]
    ids, _ = reward.tokenize(PROMPTS)
    assert (ids[:, 0] == tok.cls_token_id).all()  # ImageReward keeps [CLS]; no [ENC] substitution


def hand_pixels(x: torch.Tensor, size: int) -> torch.Tensor:
    """BLIP's transform by hand: shortest side to ``size`` (bicubic, antialiased; long side truncated), centre crop,
    OpenAI mean/std."""
    from tiny_rewards import OPENAI_MEAN, OPENAI_STD, bicubic

    h, w = x.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    top, left = (nh - size) // 2, (nw - size) // 2
    crop = bicubic(x, (nh, nw))[..., top:top + size, left:left + size]
    return (crop - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def test_score_matches_hand_computed_head(tiny):
    reward, state = tiny["reward"], tiny["state"]
    x = images(len(PROMPTS))
    scores = reward(x, PROMPTS)
    pixels = hand_pixels(x, VISION["image_size"])
    assert pixels.shape[-2:] == (VISION["image_size"],) * 2 and x.shape[-2:] != pixels.shape[-2:]
    ids, mask = reward.tokenize(PROMPTS)
    with torch.no_grad():
        blip = reward.model.blip
        h = blip.text_encoder(ids, mask, blip.visual_encoder(pixels))[:, 0]
    for index in (0, 2, 4, 6, 7):  # Linear layers; dropouts in between are identity at eval, no activations
        h = h @ state[f"mlp.layers.{index}.weight"].T + state[f"mlp.layers.{index}.bias"]
    expected = (h[:, 0] - MEAN) / STD
    assert scores.shape == (len(PROMPTS),)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3  # the prompts and images actually change the score


def test_text_encoder_matches_transformers_bert(tiny):
    """Independent reference: transformers' BertModel carrying the same weights. It only builds cross-attention for
    causal decoders with hidden-width keys/values, so the reference is patched to BLIP's bidirectional encoder
    whose cross-attention keys/values read the ViT width; BLIP has no token-type table (zeros here)."""
    from transformers import BertConfig, BertModel

    med, w = tiny["med"], VISION["width"]
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    config = BertConfig(**{k: med[k] for k in fields}, is_decoder=True, add_cross_attention=True)
    config._attn_implementation = "eager"
    ref = BertModel(config, add_pooling_layer=False).eval()
    ref.config.is_decoder = False
    for layer in ref.encoder.layer:
        layer.attention.self.is_causal = False
        layer.crossattention.self.key = nn.Linear(w, med["hidden_size"])
        layer.crossattention.self.value = nn.Linear(w, med["hidden_size"])
    prefix = "blip.text_encoder."
    weights = {k[len(prefix):]: v for k, v in tiny["state"].items()
               if k.startswith(prefix) and "position_ids" not in k}
    weights["embeddings.token_type_embeddings.weight"] = torch.zeros(2, med["hidden_size"])
    ref.load_state_dict(weights, strict=True)

    reward = tiny["reward"]
    ids, mask = reward.tokenize(PROMPTS)
    image_embeds = torch.randn(len(PROMPTS), 17, w, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                       encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long)).last_hidden_state
        got = reward.model.blip.text_encoder(ids, mask, image_embeds)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["mlp.layers.7.bias", "blip.visual_encoder.pos_embed",
                                 "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"])
def test_missing_key_is_a_one_line_error(tiny, tmp_path, key):
    state = {k: v for k, v in tiny["state"].items() if k != key}
    torch.save(state, tmp_path / "ImageReward.pt")
    options = {**tiny["options"], "checkpoint": str(tmp_path / "ImageReward.pt")}
    with pytest.raises(UserError, match="lacks 1 ImageReward keys") as err:
        load_reward("imagereward", **options)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_wrong_sizes_and_extra_keys(tiny, tmp_path, caplog):
    with pytest.raises(UserError, match="has shape .* but the model expects") as err:
        load_reward("imagereward", **{**tiny["options"], "vision": {**VISION, "width": 32}})
    assert "\n" not in str(err.value)
    torch.save({**tiny["state"], "blip.itm_head.weight": torch.zeros(2, 32)}, tmp_path / "ImageReward.pt")
    with caplog.at_level("WARNING", logger="rewardtune.rewards.imagereward"):
        load_reward("imagereward", **{**tiny["options"], "checkpoint": str(tmp_path)})  # a folder holding the file
    assert "blip.itm_head.weight" in caplog.text
    with pytest.raises(UserError, match="unknown vision option 'layers'"):
        load_reward("imagereward", **{**tiny["options"], "vision": {"layers": 2}})


def test_prompts_truncate_to_35_tokens(tiny):
    reward = tiny["reward"]
    ids, mask = reward.tokenize(["dog " * 100, "dog"])
    assert ids.shape == mask.shape == (2, 35)
    assert ids[0, -1] == reward.tokenizer.sep_token_id and mask[0].all() and mask[1].sum() == 3
    x = images(1).expand(3, -1, -1, -1)
    scores = reward(x, ["dog " * 100, "dog " * 33, "dog " * 20])  # 33 words + [CLS] + [SEP] = 35 tokens
    assert scores[0] == scores[1] and abs(scores[0] - scores[2]) > 1e-4


def test_batch_invariance(tiny):
    reward = tiny["reward"]
    x = images(len(PROMPTS), seed=5)
    batch = reward(x, PROMPTS)
    single = torch.cat([reward(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(len(PROMPTS))])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


def test_gradients_reach_pixels_not_weights(tiny):
    reward = tiny["reward"]
    x = images(2, seed=7).requires_grad_(True)
    reward(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


def test_low_precision_keeps_head_fp32(tiny):
    reward = load_reward("imagereward", **tiny["options"], dtype="bfloat16")
    assert reward.model.blip.visual_encoder.cls_token.dtype == torch.bfloat16
    assert reward.model.mlp.layers[0].weight.dtype == torch.float32
    x = images(2, seed=9)
    torch.testing.assert_close(reward(x, PROMPTS[:2]), tiny["reward"](x, PROMPTS[:2]), atol=0.1, rtol=0.05)


def test_missing_files_offline_are_one_line_errors(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(ModelNotFoundError, match="ImageReward.pt of THUDM/ImageReward") as err:
        load_reward("imagereward")
    assert "\n" not in str(err.value) and "checkpoint=PATH" in str(err.value)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "ImageReward.pt").write_bytes((tiny["root"] / "ImageReward.pt").read_bytes())
    with pytest.raises(ModelNotFoundError, match="med_config.json of THUDM/ImageReward"):
        load_reward("imagereward", checkpoint=str(alone / "ImageReward.pt"), vision=VISION)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_reward("imagereward", checkpoint=str(tmp_path / "nope.pt"))
    options = {**tiny["options"], "tokenizer": str(alone)}
    with pytest.raises(ModelNotFoundError, match="no vocab.txt"):
        load_reward("imagereward", **options)
    with pytest.raises(ModelNotFoundError, match="vocab.txt of bert-base-uncased"):
        load_reward("imagereward", **{**tiny["options"], "tokenizer": "bert-base-uncased"})
