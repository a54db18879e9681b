"""Tiny random reward models saved in the real checkpoint formats: one home for every reward test's builders.

Each ``*_options(folder)`` writes one tiny model into ``folder`` (which must exist) and returns the
``load_reward(name, **options)`` options that load it through the real code path; :data:`TINY_OPTIONS` maps every
registered reward name to its builder, so a newly registered reward needs an entry here (the conformance test
fails without one). Lower-level ``save_*`` helpers let a test vary one setting.

| reward | files written (format of the real release) |
|---|---|
| hpsv2, hpsv2.1 | open_clip model-config JSON + ``torch.save({'state_dict': ...})`` (HPS_v2_compressed.pt) |
| clipscore | open_clip model-config JSON + bare open_clip state dict (open_clip_pytorch_model.bin) |
| pickscore | transformers ``CLIPModel`` folder + CLIP BPE tokenizer + ``preprocessor_config.json`` |
| aesthetic | that CLIP folder + the LAION head, ``torch.save`` with keys ``layers.{0,2,4,6,7}.*`` |
| imagereward | ``ImageReward.pt`` (BLIP key layout, written out independently of the loader), med_config, vocab.txt |
| shapes_alignment, shapes_preference | CLIP folder (+ ``head.safetensors`` and ``head_config.json``) |

Import-safe outside pytest (``scripts/bench_score.py`` uses it): heavy libraries are imported inside the builders,
and the global torch RNG is left untouched (weights come from forked, seeded RNG state).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# --- open_clip (HPSv2, CLIPScore) -------------------------------------------------------------------------------

OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def random_open_clip(config: dict = OPEN_CLIP_TINY, seed: int = 0):
    """A randomly initialised ``open_clip.model.CLIP(**config)`` in eval mode (seeded; global RNG untouched)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.model.CLIP(**config).eval()


def save_open_clip_config(folder: Path, stem: str, config: dict = OPEN_CLIP_TINY) -> Path:
    """Write an open_clip model-config JSON; open_clip registers it under ``stem``."""
    path = Path(folder) / f"{stem}.json"
    path.write_text(json.dumps(config))
    return path


def reference_open_clip(arch: str | Path, checkpoint: str | Path):
    """An open_clip CLIP rebuilt from the config JSON and checkpoint by hand (bare or ``{'state_dict'}``,
    ``module.`` prefixes stripped): the reference the tests compare against, independent of rewardtune."""
    import open_clip

    blob = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob)
    model = open_clip.model.CLIP(**json.loads(Path(arch).read_text())).eval()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model


def hpsv2_options(folder: Path) -> dict[str, Any]:
    """Tiny HPS release: ``tiny-hps.json`` + ``HPS_v2_compressed.pt`` = ``{'state_dict': open_clip keys}``."""
    arch = save_open_clip_config(folder, "tiny-hps")
    torch.save({"state_dict": random_open_clip().state_dict()}, Path(folder) / "HPS_v2_compressed.pt")
    return {"checkpoint": str(Path(folder) / "HPS_v2_compressed.pt"), "arch": str(arch)}


def clipscore_options(folder: Path) -> dict[str, Any]:
    """Tiny open_clip weights as a bare state dict (``open_clip_pytorch_model.bin``, as the hub files)."""
    arch = save_open_clip_config(folder, "tiny-clipscore")
    torch.save(random_open_clip().state_dict(), Path(folder) / "open_clip_pytorch_model.bin")
    return {"model": str(arch), "checkpoint": str(Path(folder) / "open_clip_pytorch_model.bin")}


# --- transformers CLIP (PickScore, aesthetic, shapes) -----------------------------------------------------------

CLIP_CORPUS = ["a red circle", "a blue square on a white background", "a small green triangle", "a photo of a dog"]
CLIP_MAX_POSITIONS = 16


def save_tiny_hf_clip(folder: Path, *, image_size: int = 32, projection: int = 16, processor: dict | None = None,
                      logit_scale: float | None = None, seed: int = 0) -> Path:
    """A random ``CLIPModel`` (width 32, 2 layers, 8x8 patches, text positions 16) saved with ``save_pretrained``,
    a CLIP BPE tokenizer learned on :data:`CLIP_CORPUS`, and a ``CLIPImageProcessor`` config built from
    ``processor`` (keyword arguments; default: shortest edge and crop = ``image_size``). Returns ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from rewardtune.shapes.tiny_models import save_clip_tokenizer

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(save_clip_tokenizer(CLIP_CORPUS, folder / "_tokenizer"))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=CLIP_MAX_POSITIONS,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id)
    config = CLIPConfig(text_config=text, vision_config=dict(tower, image_size=image_size, patch_size=8),
                        projection_dim=projection)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = processor or {"size": {"shortest_edge": image_size},
                              "crop_size": {"height": image_size, "width": image_size}}
    CLIPImageProcessor(**processor).save_pretrained(folder)
    return folder


PICKSCORE_MEAN, PICKSCORE_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)   # not OpenAI's: proves they come from the config
PICKSCORE_LOGIT_SCALE = 3.0


def save_pickscore_clip(folder: Path) -> Path:
    """The PickScore test CLIP: 32x32 input, projection 16, logit scale 3, non-OpenAI mean/std in the processor."""
    processor = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
                 "image_mean": list(PICKSCORE_MEAN), "image_std": list(PICKSCORE_STD)}
    return save_tiny_hf_clip(folder, processor=processor, logit_scale=PICKSCORE_LOGIT_SCALE)


def pickscore_options(folder: Path) -> dict[str, Any]:
    clip = str(save_pickscore_clip(folder))
    return {"model": clip, "processor": clip}


AESTHETIC_PROJECTION = 12
AESTHETIC_HEAD_DIMS = [AESTHETIC_PROJECTION, 1024, 128, 64, 16, 1]
AESTHETIC_HEAD_LINEARS = [0, 2, 4, 6, 7]   # nn.Sequential indices of the Linears; 1, 3, 5 are Dropouts
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


def save_aesthetic_clip(folder: Path) -> Path:
    """24x24 ViT input, projection 12; the processor resizes the short side to 28 and centre-crops 24, with the
    OpenAI mean/std left to the processor's defaults."""
    processor = {"size": {"shortest_edge": 28}, "crop_size": {"height": 24, "width": 24}}
    return save_tiny_hf_clip(folder, image_size=24, projection=AESTHETIC_PROJECTION, processor=processor)


def save_aesthetic_head(path: Path, input_dim: int = AESTHETIC_PROJECTION) -> Path:
    """A state dict with exactly the original's keys ``layers.{0,2,4,6,7}.{weight,bias}`` (fan-in scaled)."""
    generator = torch.Generator().manual_seed(5)
    state = OrderedDict()
    fan_ins = [input_dim] + AESTHETIC_HEAD_DIMS[1:-1]
    for index, fan_in, fan_out in zip(AESTHETIC_HEAD_LINEARS, fan_ins, AESTHETIC_HEAD_DIMS[1:]):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) / fan_in ** 0.5
        state[f"layers.{index}.bias"] = 0.1 * torch.randn(fan_out, generator=generator)
    torch.save(state, path)
    return Path(path)


def aesthetic_options(folder: Path) -> dict[str, Any]:
    clip = save_aesthetic_clip(Path(folder) / "clip")
    return {"clip": str(clip), "head": str(save_aesthetic_head(Path(folder) / AESTHETIC_HEAD_FILE))}


# --- shapes world ---------------------------------------------------------------------------------------------

def shapes_alignment_options(folder: Path) -> dict[str, Any]:
    """A stand-in for the shipped ``assets/shapes-clip`` folder (32x32 images, as the shapes world)."""
    return {"model": str(save_tiny_hf_clip(folder))}


def shapes_preference_options(folder: Path, hidden: int = 16) -> dict[str, Any]:
    """A stand-in for ``assets/shapes-preference``: the CLIP folder + ``head.safetensors`` + ``head_config.json``
    ``{"dim", "hidden"}`` (the format ``scripts/train_shapes_rewards.py`` writes)."""
    from safetensors.torch import save_file

    from rewardtune.rewards.shapes import PreferenceHead

    save_tiny_hf_clip(folder)
    dim = json.loads((Path(folder) / "config.json").read_text())["projection_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        head = PreferenceHead(dim, hidden)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, Path(folder) / "head.safetensors")
    (Path(folder) / "head_config.json").write_text(json.dumps({"dim": dim, "hidden": hidden}))
    return {"model": str(folder)}


# --- ImageReward ----------------------------------------------------------------------------------------------

IMAGEREWARD_VISION = {"image_size": 32, "patch_size": 8, "width": 24, "depth": 2, "heads": 2}
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_WORDS = "a red blue green circle square triangle cat dog photo of painting on the small big background".split()


def tiny_med_config(vocab_size: int) -> dict:
    """BLIP's med_config.json fields at toy size (+2 vocab for BLIP's added [DEC] and [ENC] tokens)."""
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
            "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size + 2,
            "encoder_width": 768, "add_cross_attention": True}


def imagereward_layout(vis: dict, med: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor key of ImageReward.pt with its shape, for the given ViT and med_config sizes."""
    w, h, p = vis["width"], med["hidden_size"], vis["patch_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, w),
        "blip.visual_encoder.pos_embed": (1, (vis["image_size"] // p) ** 2 + 1, w),
        "blip.visual_encoder.patch_embed.proj.weight": (w, 3, p, p), "blip.visual_encoder.patch_embed.proj.bias": (w,),
        "blip.text_encoder.embeddings.word_embeddings.weight": (med["vocab_size"], h),
        "blip.text_encoder.embeddings.position_embeddings.weight": (med["max_position_embeddings"], h)}

    def linear(name, n_in, n_out):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (n_out, n_in), (n_out,)

    def norm(name, n):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (n,), (n,)

    for i in range(vis["depth"]):
        block = f"blip.visual_encoder.blocks.{i}"
        norm(f"{block}.norm1", w), linear(f"{block}.attn.qkv", w, 3 * w), linear(f"{block}.attn.proj", w, w)
        norm(f"{block}.norm2", w), linear(f"{block}.mlp.fc1", w, 4 * w), linear(f"{block}.mlp.fc2", 4 * w, w)
    norm("blip.visual_encoder.norm", w)
    norm("blip.text_encoder.embeddings.LayerNorm", h)
    for j in range(med["num_hidden_layers"]):
        layer = f"blip.text_encoder.encoder.layer.{j}"
        for attention, kv_width in (("attention", h), ("crossattention", w)):
            linear(f"{layer}.{attention}.self.query", h, h)
            linear(f"{layer}.{attention}.self.key", kv_width, h)
            linear(f"{layer}.{attention}.self.value", kv_width, h)
            linear(f"{layer}.{attention}.output.dense", h, h), norm(f"{layer}.{attention}.output.LayerNorm", h)
        linear(f"{layer}.intermediate.dense", h, med["intermediate_size"])
        linear(f"{layer}.output.dense", med["intermediate_size"], h), norm(f"{layer}.output.LayerNorm", h)
    widths = (h, 1024, 128, 64, 16, 1)
    for index, n_in, n_out in zip((0, 2, 4, 6, 7), widths[:-1], widths[1:]):
        linear(f"mlp.layers.{index}", n_in, n_out)
    linear("blip.vision_proj", w, 256), linear("blip.text_proj", h, 256)
    return shapes


def imagereward_state(vis: dict, med: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for :func:`imagereward_layout` (LayerNorm weights near 1, everything else small)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in imagereward_layout(vis, med).items():
        is_norm_weight = key.endswith(".weight") and len(shape) == 1
        noise = 0.1 * torch.randn(shape, generator=gen)
        state[key] = 1.0 + noise if is_norm_weight else noise
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    return state


def imagereward_options(folder: Path) -> dict[str, Any]:
    """``ImageReward.pt`` + ``med_config.json`` + a BERT ``tokenizer/vocab.txt``; ``vision`` sizes the tiny ViT."""
    folder = Path(folder)
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(BERT_SPECIALS + BERT_WORDS) + "\n")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    med = tiny_med_config(len(BERT_SPECIALS) + len(BERT_WORDS))
    (folder / "med_config.json").write_text(json.dumps(med))
    torch.save(imagereward_state(IMAGEREWARD_VISION, med), folder / "ImageReward.pt")
    return {"checkpoint": str(folder / "ImageReward.pt"), "med_config": str(folder / "med_config.json"),
            "tokenizer": str(folder / "tokenizer"), "vision": dict(IMAGEREWARD_VISION)}


# --- the registry's builders ----------------------------------------------------------------------------------

def no_files(folder: Path) -> dict[str, Any]:
    """Rewards without model files (JPEG sizes, the shapes oracle)."""
    return {}


TINY_OPTIONS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "jpeg_compressibility": no_files,
    "jpeg_incompressibility": no_files,
    "shapes_gold": no_files,
    "shapes_taste": no_files,
    "shapes_alignment": shapes_alignment_options,
    "shapes_preference": shapes_preference_options,
    "hpsv2": hpsv2_options,
    "hpsv2.1": hpsv2_options,
    "clipscore": clipscore_options,
    "pickscore": pickscore_options,
    "aesthetic": aesthetic_options,
    "imagereward": imagereward_options,
}


def tiny_options(name: str, folder: Path) -> dict[str, Any]:
    """Build reward ``name``'s tiny model in ``folder`` (created if needed) and return its load options."""
    if name not in TINY_OPTIONS:
        raise KeyError(f"reward {name!r} has no tiny builder; add one to TINY_OPTIONS in tests/tiny_rewards.py")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return TINY_OPTIONS[name](Path(folder))


def hand_open_clip_cosine(clip, pixels, prompts: list[str], mean=OPENAI_MEAN, std=OPENAI_STD):
    """Reference score: cosine of L2-normalised open_clip features of already resized ``[B,3,S,S]`` pixels in
    [0,1] (normalised here with ``mean``/``std``), written out with explicit per-pair dot products."""
    import open_clip
    import torch

    m, s = (torch.as_tensor(v, dtype=pixels.dtype).view(1, 3, 1, 1) for v in (mean, std))
    with torch.no_grad():
        image = clip.encode_image((pixels - m) / s)
        text = clip.encode_text(open_clip.tokenize(prompts))
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return torch.stack([torch.dot(image[i], text[i]) for i in range(len(prompts))])


def bicubic(x, size: tuple[int, int]):
    """Antialiased bicubic resize, as the rewards' torch preprocessing does."""
    import torch.nn.functional as F

    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
