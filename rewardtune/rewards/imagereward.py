"""ImageReward v1.0 (THUDM): BLIP ViT-L/16 image tower, BERT text encoder cross-attending to the image, affine head.

    r(x, p) = (MLP(h_CLS(p | ViT(x))) - 0.16717362830052426) / 1.0333394966054072          (≈ N(0, 1))

Written in plain PyTorch (transformers only tokenises), loading the original ``ImageReward.pt``: a bare state dict
saved by ``torch.save`` from ``ImageReward(nn.Module)`` with submodules ``blip`` (``BLIP_Pretrain``) and ``mlp``.
Module names here mirror that layout, so checkpoint keys map 1:1 (:func:`checkpoint_to_model_state`):

    blip.visual_encoder.{cls_token [1,1,W], pos_embed [1,(S/P)^2+1,W], patch_embed.proj.{weight,bias}}
    blip.visual_encoder.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}   (i < depth)
    blip.visual_encoder.norm.{weight,bias}
    blip.text_encoder.embeddings.{word_embeddings,position_embeddings}.weight, .LayerNorm.{weight,bias}
    blip.text_encoder.encoder.layer.{j}.{attention,crossattention}.self.{query,key,value}.{weight,bias}
    blip.text_encoder.encoder.layer.{j}.{attention,crossattention}.output.{dense,LayerNorm}.{weight,bias}
    blip.text_encoder.encoder.layer.{j}.{intermediate.dense,output.dense,output.LayerNorm}.{weight,bias}
    mlp.layers.{0,2,4,6,7}.{weight,bias}   Linear H->1024->128->64->16->1 (1,3,5 are Dropouts; ReLUs commented out)
    ignored: blip.vision_proj.*, blip.text_proj.*, blip.text_encoder.embeddings.position_ids (unused by the score)

Sources: research/reward_models.md §3 (ViT-L/16 width 1024 depth 24 heads 16 at 224, BERT with cross-attention
from med_config.json, head order, 35 tokens, normalisation, preprocessing). Not in the sheet, taken from BLIP's
``vit.py``/``med.py`` as remembered (unverified against the file): timm-style ViT names with qkv bias, pre-norm,
LayerNorm eps 1e-6, exact GELU; BLIP's BertEmbeddings has **no** token-type table; cross-attention key/value take
the ViT width (``encoder_width`` := vision width); no pooler. Size check: this layout at ViT-L/16 + BERT-base
(vocab 30524) + head + the two 256-d projections is 446,665,953 fp32 parameters = 1,786,663,812 B, against the
sheet's file size 1,786,880,927 B (217 kB of pickle metadata), which leaves no room for momentum encoders, queues
or a decoder. The tokenizer is BLIP's: ``bert-base-uncased`` plus ``[DEC]`` (bos) and ``[ENC]`` (vocab 30522 ->
30524); ImageReward's ``score`` feeds ``[CLS]`` as the first token (no ``[ENC]`` substitution as in BLIP's ITM).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.modelfiles import hub_file
from rewardtune.rewards.base import Reward
from rewardtune.rewards.preprocess import clip_pixels
from rewardtune.utils.devices import to_dtype

logger = logging.getLogger(__name__)

REPO_ID = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
VIT_L16 = {"image_size": 224, "patch_size": 16, "width": 1024, "depth": 24, "heads": 16, "mlp_ratio": 4.0}
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
IGNORED_KEYS = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None):
    """Multi-head softmax(q k^T / sqrt(d)) v: q [B,L,C], k/v [B,N,C], mask [B,N] bool (True = keep) -> [B,L,C]."""
    b, n_q, c = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(b, n_q, c)


class VitAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attend(q, k, v, self.heads))


class VitBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + fc2(gelu(fc1(norm2(x))))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn = VitAttention(width, heads)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(width, int(width * mlp_ratio)))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(int(width * mlp_ratio), width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """BLIP's ViT: pixels [B,3,S,S] -> all token states [B, 1+(S/P)^2, W] after the final LayerNorm."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2 + 1, width))
        self.blocks = nn.ModuleList(VitBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, :x.shape[1] + 1]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class BertAttention(nn.Module):
    """``LayerNorm(x + dense(attend(query(x), key(ctx), value(ctx))))``; names ``self.{query,key,value}``,
    ``output.{dense,LayerNorm}`` as in BERT. ``ctx`` is ``x`` (self-attention) or the image tokens (width kv_width)."""

    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.self = nn.ModuleDict({"query": nn.Linear(hidden, hidden), "key": nn.Linear(kv_width, hidden),
                                   "value": nn.Linear(kv_width, hidden)})
        self.output = nn.ModuleDict({"dense": nn.Linear(hidden, hidden), "LayerNorm": nn.LayerNorm(hidden, eps=eps)})

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = self.self
        out = _attend(s["query"](x), s["key"](context), s["value"](context), self.heads, mask)
        return self.output["LayerNorm"](x + self.output["dense"](out))


class BertLayer(nn.Module):
    """Post-norm BERT layer with cross-attention (BLIP ``mode='multimodal'``): self-attn, cross-attn, FFN."""

    def __init__(self, cfg: dict, encoder_width: int) -> None:
        super().__init__()
        hidden, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
        self.act = _ACTIVATIONS[cfg["hidden_act"]]
        self.attention = BertAttention(hidden, heads, hidden, eps)
        self.crossattention = BertAttention(hidden, heads, encoder_width, eps)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(hidden, cfg["intermediate_size"])})
        self.output = nn.ModuleDict({"dense": nn.Linear(cfg["intermediate_size"], hidden),
                                     "LayerNorm": nn.LayerNorm(hidden, eps=eps)})

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image_embeds)
        h = self.output["dense"](self.act(self.intermediate["dense"](x)))
        return self.output["LayerNorm"](x + h)


class CrossAttentionBert(nn.Module):
    """BLIP's ``med.BertModel`` without pooler: ids [B,L], mask [B,L], image tokens [B,N,Wv] -> states [B,L,H].

    Embeddings are ``LayerNorm(word[ids] + position[0..L-1])`` (no token-type table)."""

    def __init__(self, cfg: dict, encoder_width: int) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(cfg["vocab_size"], hidden),
            "position_embeddings": nn.Embedding(cfg["max_position_embeddings"], hidden),
            "LayerNorm": nn.LayerNorm(hidden, eps=cfg["layer_norm_eps"])})
        layers = nn.ModuleList(BertLayer(cfg, encoder_width) for _ in range(cfg["num_hidden_layers"]))
        self.encoder = nn.ModuleDict({"layer": layers})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = emb["LayerNorm"](emb["word_embeddings"](input_ids) + emb["position_embeddings"](positions))
        mask = attention_mask.bool()
        for layer in self.encoder["layer"]:
            x = layer(x, mask, image_embeds)
        return x


class ImageRewardModel(nn.Module):
    """``blip.visual_encoder``, ``blip.text_encoder`` and ``mlp.layers`` under the checkpoint's own names."""

    def __init__(self, vision: dict, med_config: dict) -> None:
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = VisionTransformer(**vision)
        self.blip.text_encoder = CrossAttentionBert(med_config, encoder_width=vision["width"])
        widths = (med_config["hidden_size"], *HEAD_WIDTHS)
        head: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            head.append(nn.Linear(n_in, n_out))
            if i < 3:
                head.append(nn.Dropout((0.2, 0.2, 0.1)[i]))
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(*head)

    def text_features(self, pixels: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B,3,S,S], ids/mask [B,L] -> fp32 [CLS] state [B,H] of the image-conditioned text."""
        image_embeds = self.blip.visual_encoder(pixels)
        return self.blip.text_encoder(input_ids, mask, image_embeds)[:, 0].float()

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """-> standardised reward [B] = ``(mlp(h_CLS) - mean) / std``."""
        raw = self.mlp.layers(self.text_features(pixels, input_ids, mask)).squeeze(-1)
        return (raw - REWARD_MEAN) / REWARD_STD


class ImageReward(Reward):
    """ImageReward on images [B,3,H,W] in [0,1]: differentiable bicubic resize + centre crop, OpenAI mean/std."""

    differentiable = True

    def __init__(self, model: ImageRewardModel, tokenizer) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = model.blip.visual_encoder.image_size

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids, mask [B,35]: ``[CLS] tokens [SEP] [PAD]...``, truncated to 35 tokens (the original setting)."""
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = clip_pixels(images.float(), self.image_size)  # bicubic, shortest side + centre crop, OpenAI mean/std
        dtype = self.model.blip.visual_encoder.cls_token.dtype
        ids, mask = self.tokenize(prompts)
        return self.model(pixels.to(device=self.device, dtype=dtype), ids, mask)


def read_med_config(path: Path, vocab_needed: int | None = None) -> dict:
    """BLIP's med_config.json (a BertConfig) -> the fields the text encoder uses, validated."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read med_config {str(path)!r}: {str(exc).splitlines()[0]}") from None
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings")
    missing = [k for k in need if k not in raw]
    if missing:
        raise UserError(f"med_config {str(path)!r} lacks {', '.join(missing)}; pass ImageReward's med_config.json")
    cfg = {k: raw[k] for k in need}
    cfg.update(layer_norm_eps=raw.get("layer_norm_eps", 1e-12), hidden_act=raw.get("hidden_act", "gelu"))
    if not raw.get("add_cross_attention", False):
        raise UserError(f"med_config {str(path)!r} has add_cross_attention false; ImageReward's text encoder "
                        "cross-attends to the image")
    if cfg["hidden_act"] not in _ACTIVATIONS:
        raise UserError(f"med_config hidden_act {cfg['hidden_act']!r} is not supported; use one of "
                        f"{', '.join(_ACTIVATIONS)}")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise UserError(f"med_config hidden_size {cfg['hidden_size']} is not divisible by num_attention_heads")
    if cfg["max_position_embeddings"] < MAX_TOKENS:
        raise UserError(f"med_config max_position_embeddings must be >= {MAX_TOKENS}")
    return cfg


def vision_config(vision: dict | None) -> dict:
    """Defaults (ViT-L/16 at 224) overridden by ``vision``; unknown keys or inconsistent sizes are errors."""
    vision = dict(vision or {})
    unknown = sorted(set(vision) - set(VIT_L16))
    if unknown:
        raise UserError(f"unknown vision option {unknown[0]!r}; expected some of {', '.join(VIT_L16)}")
    cfg = {**VIT_L16, **vision}
    if cfg["image_size"] % cfg["patch_size"] or cfg["width"] % cfg["heads"]:
        raise UserError(f"vision config {cfg} needs image_size % patch_size == 0 and width % heads == 0")
    return cfg


def checkpoint_to_model_state(state: dict) -> dict[str, torch.Tensor]:
    """Original ``ImageReward.pt`` keys -> :class:`ImageRewardModel` keys (identity; unused keys dropped)."""
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_KEYS)}


def load_checkpoint_into(model: ImageRewardModel, path: Path) -> None:
    """Load ``path`` strictly: every model key present with its shape, else a one-line :class:`UserError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors have many types; report one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read checkpoint {str(path)!r}: {reason}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {str(path)!r} is not a state dict of tensors (the layout of ImageReward.pt)")
    state = checkpoint_to_model_state(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(f"checkpoint {str(path)!r} lacks {len(missing)} ImageReward keys, e.g. {missing[0]!r}; "
                        "pass the original ImageReward.pt")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise UserError(f"checkpoint key {key!r} has shape {tuple(state[key].shape)} but the model expects "
                            f"{tuple(value.shape)}; check med_config and the vision options")
    extra = sorted(set(state) - set(expected))
    if extra:
        logger.warning("ignoring %d unexpected ImageReward checkpoint keys, e.g. %s", len(extra), extra[0])
    model.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)


def load_bert_tokenizer(tokenizer: str):
    """BLIP's tokenizer: ``BertTokenizer`` (a folder with vocab.txt or a hub id) + ``[DEC]`` bos + ``[ENC]``."""
    from transformers import BertTokenizer

    folder = Path(tokenizer).expanduser()
    if not folder.exists():
        folder = hub_file(tokenizer, "vocab.txt", option="tokenizer", local="folder").parent
    if not (folder / "vocab.txt").is_file():  # without it BertTokenizer silently builds an empty vocabulary
        raise ModelNotFoundError(f"tokenizer folder {str(folder)!r} has no vocab.txt; pass tokenizer=FOLDER "
                                 "holding bert-base-uncased's vocab.txt")
    tok = BertTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def load_imagereward(checkpoint: str | None = None, med_config: str | None = None,
                     tokenizer: str = "bert-base-uncased", device: str = "cpu", dtype: str = "float32",
                     vision: dict | None = None) -> ImageReward:
    """ImageReward v1.0 from ``checkpoint`` (ImageReward.pt, or a folder holding it) or the HF cache of
    THUDM/ImageReward. ``med_config`` defaults to med_config.json next to the checkpoint, else the hub cache.
    ``vision`` overrides the ViT (image_size, patch_size, width, depth, heads). The head runs in fp32."""
    if checkpoint is None:
        path = hub_file(REPO_ID, CHECKPOINT_FILE, option="checkpoint")
    else:
        path = Path(checkpoint).expanduser()
        path = path / CHECKPOINT_FILE if path.is_dir() else path
        if not path.is_file():
            raise ModelNotFoundError(f"ImageReward checkpoint {str(path)!r} does not exist; pass the path of "
                                     f"{CHECKPOINT_FILE} (from the {REPO_ID} hub repo)")
    if med_config is None:
        sibling = path.parent / MED_CONFIG_FILE
        med_path = sibling if sibling.is_file() else hub_file(REPO_ID, MED_CONFIG_FILE, option="med_config")
    else:
        med_path = Path(med_config).expanduser()
    cfg, vis = read_med_config(med_path), vision_config(vision)
    tok = load_bert_tokenizer(tokenizer)
    if len(tok) > cfg["vocab_size"]:
        raise UserError(f"tokenizer has {len(tok)} tokens but med_config vocab_size is {cfg['vocab_size']}")
    with torch.device("meta"):
        model = ImageRewardModel(vis, cfg)
    load_checkpoint_into(model, path)
    model.blip.to(device=device, dtype=to_dtype(dtype))
    model.mlp.to(device=device, dtype=torch.float32)
    logger.info("loaded ImageReward from %s (%s, %s)", path, dtype, device)
    return ImageReward(model, tok)
