"""What differs between pipeline kinds, in one place: the denoiser's attribute, how prompts become conditioning,
how the denoiser is called, its scheduler family, LoRA targets and how LoRA weights are saved.

    backbone = backbone_of(pipe)          # from the pipeline's class
    cond = backbone.encode(pipe, prompts) # a Conditioning of len(prompts) rows
    out = cond.call(backbone.denoiser(pipe), latents, t)

Entries (``BACKBONES``, keyed by the diffusers pipeline class name): ``StableDiffusionPipeline`` (SD 1.x / 2.x UNet,
DDIM family), ``StableDiffusionXLPipeline`` (SDXL UNet with two text encoders, pooled embeddings and size ids, DDIM
family) and ``StableDiffusion3Pipeline`` (SD3 / SD3.5 transformer, flow family). A new kind of pipeline is a new
:class:`Backbone` subclass and one registry line; the sampler, re-scoring, finetuning and evaluation do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rewardtune.registry import Registry


@dataclass
class Conditioning:
    """Text conditioning of B prompts, as the denoiser takes it.

    embeds: ``[B,L,D]`` text-encoder states. pooled: ``[B,P]`` pooled text embeddings (SD3, SDXL) or None.
    key_bias: ``[L]`` additive attention bias of the context rows (SD3 without T5: :mod:`rewardtune.diffusion.sd3`)
    or None. kind: how the denoiser is called, ``unet``, ``sdxl`` or ``sd3``. time_ids: ``[B,6]`` SDXL's size
    conditioning (original height, width, crop top, left, target height, width) or None.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    kind: str = "unet"
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def __getitem__(self, index) -> Conditioning:
        """Rows ``index`` (an int tensor or slice); the key bias is shared by all rows."""
        def rows(x):
            return None if x is None else x[index]

        return replace(self, embeds=self.embeds[index], pooled=rows(self.pooled), time_ids=rows(self.time_ids))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Conditioning:
        """The tensors in ``dtype`` on ``device`` (the key bias stays float32: it is added to attention logits)."""
        def move(x, cast=True):
            return None if x is None else x.to(device=device, dtype=dtype if cast else None)

        return replace(self, embeds=move(self.embeds), pooled=move(self.pooled), key_bias=move(self.key_bias, False),
                       time_ids=move(self.time_ids))

    def expand(self, rows: int) -> Conditioning:
        """A one-row conditioning repeated to ``rows`` rows (a view)."""
        if len(self) != 1:
            raise ValueError(f"expand needs a one-row conditioning, got {len(self)} rows")
        def repeat(x):
            return None if x is None else x.expand(rows, -1)

        return replace(self, embeds=self.embeds.expand(rows, -1, -1), pooled=repeat(self.pooled),
                       time_ids=repeat(self.time_ids))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Rows of ``parts`` (same kind and key bias) stacked in order."""
        first = parts[0]

        def stack(name):
            return None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])

        return replace(first, embeds=stack("embeds"), pooled=stack("pooled"), time_ids=stack("time_ids"))

    def call(self, model, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's output ``[B,C,h,w]`` (noise, v or velocity) for ``latents [B,C,h,w]`` at ``t [B]``."""
        if self.kind == "unet":
            return model(latents, t, encoder_hidden_states=self.embeds).sample
        if self.kind == "sdxl":
            return model(latents, t, encoder_hidden_states=self.embeds,
                         added_cond_kwargs={"text_embeds": self.pooled, "time_ids": self.time_ids}).sample
        from rewardtune.diffusion.sd3 import key_bias_mask

        patch = getattr(model, "module", model).config.patch_size
        rows = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        return model(hidden_states=latents, timestep=t, encoder_hidden_states=self.embeds,
                     pooled_projections=self.pooled, joint_attention_kwargs=key_bias_mask(self.key_bias, rows)).sample


class Backbone:
    """A pipeline kind. ``attribute``: the denoiser's attribute on the pipeline; ``family``: its scheduler family
    (:data:`rewardtune.diffusion.settings.SCHEDULER_FAMILIES`); ``lora_targets``: the module names LoRA adapts;
    ``text_encoders``: the pipeline attributes that hold text encoders (frozen in finetuning); ``blocks``: the
    denoiser's attributes holding its blocks, the units FSDP shards (:mod:`rewardtune.utils.fsdp`)."""

    attribute = "unet"
    family = "ddim"
    lora_targets = ["to_k", "to_q", "to_v", "to_out.0"]
    text_encoders = ("text_encoder",)
    blocks = ("down_blocks", "mid_block", "up_blocks")
    load_kwargs: dict = {}

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.attribute)

    def set_denoiser(self, pipe, model: torch.nn.Module) -> None:
        setattr(pipe, self.attribute, model)

    def shard_units(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The denoiser's blocks, each a unit of FSDP sharding (a module list contributes its members)."""
        units = []
        for name in self.blocks:
            part = getattr(model, name, None)
            if isinstance(part, torch.nn.ModuleList):
                units.extend(part)
            elif part is not None:
                units.append(part)
        return units

    def frozen_parts(self, pipe) -> list[torch.nn.Module]:
        """The VAE and text encoders (present ones)."""
        names = ("vae", *self.text_encoders)
        return [m for m in (getattr(pipe, n, None) for n in names) if m is not None]

    def prepare(self, pipe) -> None:
        """Called once after loading (e.g. the scheduler of the family)."""

    def encode(self, pipe, prompts: list[str], height: int | None = None, width: int | None = None) -> Conditioning:
        """The conditioning of ``prompts`` for images of ``height x width`` (None: the native size; only SDXL's
        size conditioning reads them)."""
        raise NotImplementedError

    def encode_negative(self, pipe, prompt: str, height: int | None = None, width: int | None = None
                        ) -> Conditioning:
        """The one-row conditioning of classifier-free guidance's negative (unconditional) prompt."""
        return self.encode(pipe, [prompt], height, width)

    def latent_shape(self, pipe, batch: int, height: int | None = None, width: int | None = None
                     ) -> tuple[int, ...]:
        """``(B, C, h, w)`` of the initial noise for images of ``height x width`` (the native size by default)."""
        model, factor = self.denoiser(pipe), pipe.vae_scale_factor
        height = height or model.config.sample_size * factor
        width = width or model.config.sample_size * factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        return (batch, model.config.in_channels, height // factor, width // factor)

    def save(self, pipe, folder) -> None:
        """``pipe.save_pretrained(folder)``, with every component the pipeline left out (a T5-less SD3's
        ``text_encoder_3``) written as ``[null, null]``, so plain ``from_pretrained`` loads the folder."""
        import json
        from pathlib import Path

        pipe.save_pretrained(folder)
        index_path = Path(folder) / "model_index.json"
        index = json.loads(index_path.read_text())
        for name in missing_components(type(pipe), index):
            index.setdefault(name, [None, None])
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def save_lora(self, pipe, model: torch.nn.Module, folder) -> None:
        """Write the LoRA adapters of ``model`` (the denoiser) in this pipeline's diffusers LoRA format, which
        ``pipe.load_lora_weights`` reads (as diffusers' own LoRA training scripts write it)."""
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(model)
        if self.attribute == "unet":  # SD's LoRA scripts convert peft names; SD3's keep them
            from diffusers.utils import convert_state_dict_to_diffusers

            layers = convert_state_dict_to_diffusers(layers)
        metadata = model.peft_config["default"].to_dict()
        type(pipe).save_lora_weights(folder, **{f"{self.attribute}_lora_layers": layers,
                                                f"{self.attribute}_lora_adapter_metadata": metadata})


class UNetBackbone(Backbone):
    """Stable Diffusion 1.x / 2.x: a ``UNet2DConditionModel`` sampled with DDIM."""

    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def prepare(self, pipe) -> None:
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], height: int | None = None, width: int | None = None) -> Conditioning:
        """Text-encoder states ``[B,L,D]``, padded to the tokenizer's max length (as SD does)."""
        tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return Conditioning(pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0])


class SDXLBackbone(UNetBackbone):
    """Stable Diffusion XL: a ``UNet2DConditionModel`` with added text and size conditioning (two CLIP encoders:
    their penultimate states concatenated, the second's pooled projection, and the size ids), sampled with DDIM."""

    text_encoders = ("text_encoder", "text_encoder_2")
    load_kwargs: dict = {}

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], height: int | None = None, width: int | None = None) -> Conditioning:
        """The pipeline's own ``encode_prompt`` states ``[B,L,D1+D2]`` and pooled ``[B,P]``, and size ids ``[B,6]``
        (original = target = ``height x width``, crop at (0, 0))."""
        prompts = list(prompts)
        device = self.denoiser(pipe).device
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, do_classifier_free_guidance=False)
        native = pipe.default_sample_size * pipe.vae_scale_factor
        size = (height or native, width or native)
        encoder_2 = getattr(pipe, "text_encoder_2", None)
        projection = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection)
        return Conditioning(embeds, pooled, kind="sdxl", time_ids=time_ids.to(device).repeat(len(prompts), 1))

    def encode_negative(self, pipe, prompt: str, height: int | None = None, width: int | None = None
                        ) -> Conditioning:
        """With ``force_zeros_for_empty_prompt`` in the pipeline's config, an empty negative prompt is all zeros
        (states and pooled), as SDXL's ``__call__`` conditions on it when no negative prompt is given."""
        cond = self.encode(pipe, [prompt], height, width)
        if prompt == "" and pipe.config.get("force_zeros_for_empty_prompt", False):
            cond.embeds, cond.pooled = torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled)
        return cond


class SD3Backbone(Backbone):
    """Stable Diffusion 3 / 3.5: an ``SD3Transformer2DModel`` (rectified flow) sampled with the flow SDE step;
    the T5 encoder may be absent (its padding is collapsed exactly, :mod:`rewardtune.diffusion.sd3`)."""

    attribute = "transformer"
    blocks = ("transformer_blocks",)
    family = "flow"
    lora_targets = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def prepare(self, pipe) -> None:
        from rewardtune.diffusion.sd3 import use_key_bias_attention

        use_key_bias_attention(pipe.transformer)

    def encode(self, pipe, prompts: list[str], height: int | None = None, width: int | None = None) -> Conditioning:
        from rewardtune.diffusion.sd3 import encode_sd3

        embeds, pooled, key_bias = encode_sd3(pipe, list(prompts))
        return Conditioning(embeds, pooled, key_bias, kind="sd3")


def missing_components(cls: type, index: dict) -> list[str]:
    """The components of pipeline class ``cls`` that a ``model_index.json`` (``index``) does not name or names as
    ``[null, null]`` (diffusers' ``from_pretrained`` wants those passed as None). Components are the ``__init__``
    arguments without a default plus ``cls._optional_components`` (as diffusers counts them); the other arguments
    are config values (SDXL's ``force_zeros_for_empty_prompt``, ``add_watermarker``), never components."""
    import inspect

    optional = set(getattr(cls, "_optional_components", ()))
    names = [n for n, p in inspect.signature(cls.__init__).parameters.items()
             if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and (p.default is p.empty or n in optional)]
    return [n for n in names if not isinstance(index.get(n), list) or index[n][0] is None]


BACKBONES: Registry[Backbone] = Registry("pipeline kind")
BACKBONES.register("StableDiffusionPipeline", UNetBackbone())
BACKBONES.register("StableDiffusionXLPipeline", SDXLBackbone())
BACKBONES.register("StableDiffusion3Pipeline", SD3Backbone())


def backbone_of(pipe) -> Backbone:
    """The :class:`Backbone` of ``pipe`` (by its class name, or the first base class that is registered)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in BACKBONES:
            return BACKBONES.get(cls.__name__)
    raise ValueError(f"unsupported pipeline {type(pipe).__name__}; rewardtune supports "
                     + ", ".join(BACKBONES.names()))


def family_of(pipe, requested: str = "auto") -> str:
    """The scheduler family to sample ``pipe`` with: ``requested``, or the pipeline's own for ``auto``."""
    return backbone_of(pipe).family if requested == "auto" else requested


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's trainable denoiser (``pipe.unet`` or ``pipe.transformer``)."""
    return backbone_of(pipe).denoiser(pipe)


__all__ = ["Conditioning", "Backbone", "UNetBackbone", "SDXLBackbone", "SD3Backbone", "BACKBONES", "backbone_of",
           "denoiser", "family_of"]
