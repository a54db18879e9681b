"""Architectures of the shapes world's tiny models and the CLIP-format BPE tokenizer they share.

Everything here is a real transformers / diffusers class at a tiny size, saved in the same file formats as the
real checkpoints (``vocab.json`` + ``merges.txt``, ``config.json`` + ``model.safetensors``), so the code paths that
load SD, CLIP or PickScore load these too.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rewardtune.shapes.world import IMAGE_SIZE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 32
TEXT_WIDTH = 96
LATENT_CHANNELS = 4


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the same table ``CLIPTokenizer`` uses)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def learn_bpe_merges(words: Counter[str]) -> list[tuple[str, str]]:
    """Byte-pair merges, learned until every word of ``words`` (word -> count) is one token.

    Words are split into characters with ``</w>`` on the last one, as CLIP's tokenizer does.
    """
    corpus = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in words.items() if w}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        corpus = {_merge(symbols, best): c for symbols, c in corpus.items()}


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def save_clip_tokenizer(texts: list[str], folder: str | Path) -> Path:
    """Learn a BPE vocabulary on ``texts`` and write a ``CLIPTokenizer`` folder (vocab.json, merges.txt, ...)."""
    import re

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = Counter(w for t in texts for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", t.lower()))
    merges = learn_bpe_merges(words)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {**special, "model_max_length": MAX_TOKENS, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def clip_config(vocab_size: int, bos_id: int, eos_id: int):
    """A tiny ``CLIPConfig``: 96-wide 4-layer text tower, 96-wide 4-layer ViT with 8x8 patches on 32x32."""
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=bos_id, eos_token_id=eos_id,
                pad_token_id=eos_id, hidden_act="quick_gelu")
    vision = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def vae_model():
    """A tiny ``AutoencoderKL``: 32x32x3 <-> 8x8x4 latents (downsampling factor 4)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    )


def unet_model():
    """A tiny ``UNet2DConditionModel`` (4.2M parameters) on 8x8x4 latents with cross-attention to the 96-wide text
    states."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8, norm_num_groups=32,
    )


def scheduler_config() -> dict:
    """SD 1.x's training noise schedule (scaled-linear betas, 1000 steps, epsilon prediction)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
