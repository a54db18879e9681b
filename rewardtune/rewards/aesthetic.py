"""LAION aesthetic predictor v2: ``score = MLP(e / |e|)``, ``e`` = CLIP ViT-L/14 image embedding (``[B,768]``).

The head is the original ``sac+logos+ava1-l14-linearMSE.pth`` (christophschuhmann/improved-aesthetic-predictor):
Linear(D,1024), Dropout(0.2), Linear(1024,128), Dropout(0.2), Linear(128,64), Dropout(0.1), Linear(64,16),
Linear(16,1), with no activations (so an affine map in eval mode); state-dict keys ``layers.{0,2,4,6,7}.{weight,
bias}``. Scores are on the AVA 1-10 rating scale.

Where the head file is looked up when ``head`` is not given, in order:
``$REWARDTUNE_AESTHETIC_HEAD``; ``$XDG_CACHE_HOME/rewardtune/`` (default ``~/.cache/rewardtune/``); the Hugging Face
cache (or hub, when online) copy ``trl-lib/ddpo-aesthetic-predictor`` / ``aesthetic-model.pth`` (the same file).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from rewardtune.errors import ModelNotFoundError, UserError
from rewardtune.modelfiles import hub_file
from rewardtune.rewards.base import Reward
from rewardtune.rewards.clip_hf import CLIPTowers, load_clip_towers

logger = logging.getLogger(__name__)

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_ENV = "REWARDTUNE_AESTHETIC_HEAD"
HEAD_MIRROR = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
HEAD_SOURCE = "github.com/christophschuhmann/improved-aesthetic-predictor"


class AestheticHead(nn.Module):
    """The LAION MLP ``[B,D] -> [B,1]`` (D = CLIP projection dim, 768 for ViT-L/14); always in eval mode."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
        self.eval()

    def train(self, mode: bool = True) -> AestheticHead:
        return super().train(False)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def find_aesthetic_head() -> Path:
    """The head file from the env var, the rewardtune cache folder or the HF cache; else one-line
    :class:`ModelNotFoundError` naming the file and where it comes from."""
    if os.environ.get(HEAD_ENV):
        path = Path(os.environ[HEAD_ENV]).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"${HEAD_ENV}={str(path)!r} is not a file; point it at {HEAD_FILE}")
        return path
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rewardtune" / HEAD_FILE
    if cache.is_file():
        return cache
    return hub_file(*HEAD_MIRROR, what=f"aesthetic head {HEAD_FILE} (3.7 MB, from {HEAD_SOURCE})", option="head",
                    more=[f"set ${HEAD_ENV}", f"put it at {cache}"])


def load_aesthetic_head(path: str | Path, input_dim: int) -> AestheticHead:
    """An :class:`AestheticHead` from a ``torch.save``-d state dict in the original key layout (fp32, on CPU)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"aesthetic head file {str(path)!r} does not exist; pass the path of {HEAD_FILE}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types
        raise UserError(f"cannot read aesthetic head {str(path)!r} as a state dict: {exc}".splitlines()[0]) from None
    head = AestheticHead(input_dim)
    expected = head.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        found = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{str(path)!r} is not a LAION aesthetic head: expected keys {sorted(expected)}, got {found}")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise UserError(f"aesthetic head {str(path)!r} has {bad[0]} of shape {tuple(state[bad[0]].shape)}, expected "
                        f"{tuple(expected[bad[0]].shape)} (the CLIP projection dim is {input_dim})")
    head.load_state_dict({k: v.float() for k, v in state.items()})
    return head


class Aesthetic(Reward):
    """Prompt-independent aesthetic score ``[B]`` (differentiable); the head runs in fp32."""

    differentiable = True

    def __init__(self, towers: CLIPTowers, head: AestheticHead) -> None:
        super().__init__()
        self.towers = towers
        self.head = head.requires_grad_(False)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] -> ``[B]`` = ``MLP(e / |e|)`` (a zero embedding stays zero, as the original)."""
        emb = self.towers.encode_images(images).float()
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.head(emb.to(next(self.head.parameters()).device)).squeeze(-1).to(images.device)


def load_aesthetic(clip: str = AESTHETIC_CLIP, head: str | None = None, device: str = "cpu",
                   dtype: str = "float32") -> Reward:
    """The LAION aesthetic predictor: ``clip`` is a hub id or local ``CLIPModel`` folder (with its
    ``preprocessor_config.json``), ``head`` the MLP state dict (looked up as in the module docstring when None)."""
    head_path = Path(head) if head is not None else find_aesthetic_head()
    if not head_path.expanduser().is_file():
        raise ModelNotFoundError(f"aesthetic head file {str(head)!r} does not exist; pass the path of {HEAD_FILE}")
    towers = load_clip_towers(clip, device=device, dtype=dtype, text=False, what="aesthetic CLIP",
                              option="clip", processor_option="clip")
    mlp = load_aesthetic_head(head_path, int(towers.model.config.projection_dim)).to(device)
    logger.info("aesthetic head from %s", head_path)
    return Aesthetic(towers, mlp)
