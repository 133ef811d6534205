"""Work a batched diffusers call does once, not once per variant (private to the diffusers engine).

The engine asks for n variants as n copies of the prompt, image and mask with one CPU generator per
variant, so that variant i depends only on seed + i. Left to itself, Stable Diffusion's pipeline
then runs the text encoder over n copies of the prompt (and of the empty negative prompt) and the
VAE encoder once per copy of the image (twice on the inpainting path: the image and the masked
image). `share_batch_work` runs each of those once and hands the pipeline the results:

- the prompt is encoded once and passed as `prompt_embeds` / `negative_prompt_embeds`, repeated n
  times;
- the image goes through the VAE encoder once; where the pipeline would sample the latent
  distribution with variant i's generator (the image latents that get noised), each variant still
  samples it with its own generator, before the pipeline draws that variant's noise, exactly the
  draws in the order the pipeline makes them, so a variant's result is the same batched or alone;
- the masked image (only a 9-channel inpainting UNet reads it) is encoded once to the
  distribution's mode, which depends on no seed.

Only pipelines whose internals this was checked against (SD 1.x/2.x inpaint, img2img and
InstructPix2Pix with a plain `AutoencoderKL`) take this path; any other pipeline gets the copies.

At the other end, the feathered mask is computed once per edit and each variant is pasted back
into the original only inside the mask's box.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["feathered_alpha", "paste_back", "share_batch_work"]

_INPAINT = "StableDiffusionInpaintPipeline"
_IMG2IMG = "StableDiffusionImg2ImgPipeline"
_INSTRUCT = "StableDiffusionInstructPix2PixPipeline"
_NEEDED = {
    _INPAINT: {"prompt_embeds", "negative_prompt_embeds", "masked_image_latents"},
    _IMG2IMG: {"prompt_embeds", "negative_prompt_embeds"},
    _INSTRUCT: {"prompt_embeds", "negative_prompt_embeds"},
}


def _supported(pipe: Any) -> bool:
    name = type(pipe).__name__
    vae: Any = getattr(pipe, "vae", None)
    if name not in _NEEDED or type(vae).__name__ != "AutoencoderKL":
        return False  # e.g. SDXL (pooled embeddings) or an asymmetric VAE (re-encodes at the end)
    if getattr(vae.config, "latent_channels", None) != 4:
        return False  # the pipelines recognise latents passed as `image` by their 4 channels
    if getattr(pipe.image_processor.config, "vae_latent_channels", 4) != 4:
        return False
    params = inspect.signature(pipe.__call__).parameters
    return _NEEDED[name] <= params.keys()


def share_batch_work(torch: Any, pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return the pipeline's arguments with the prompt and image encoded once for all variants.

    `kwargs` holds n copies of `prompt`, `image` (and `mask_image`) and n generators, as the engine
    builds them; the generators advance exactly as the pipeline itself would advance them. Run it
    under `torch.inference_mode()`, holding the device. Pipelines it does not know get `kwargs`
    back unchanged.
    """
    prompts, images = kwargs.get("prompt"), kwargs.get("image")
    if not (isinstance(prompts, list) and isinstance(images, list) and prompts and images):
        return kwargs
    if len(set(prompts)) != 1 or kwargs.get("num_images_per_prompt", 1) != 1:
        return kwargs
    if not _supported(pipe):
        return kwargs
    n = len(prompts)
    generators = kwargs.get("generator")
    if not isinstance(generators, list) or len(generators) != n:
        return kwargs
    # Asked once: the pipeline's own lookup walks every module's hooks each time.
    device = pipe._execution_device
    out = dict(kwargs)
    out.update(_encode_prompt_once(pipe, device, prompts[0], n, kwargs))
    name = type(pipe).__name__
    if name == _INSTRUCT:
        out["image"] = _instruct_image_latents(pipe, device, images[0], n)
    elif name == _IMG2IMG:
        pixels = _pixels(pipe, device, images[0], kwargs)
        out["image"] = _sampled_image_latents(torch, pipe, pixels, generators)
    else:
        out.update(_inpaint_latents(torch, pipe, device, images[0], kwargs, generators))
    return out


def _guided(pipe: Any, kwargs: dict[str, Any]) -> bool:
    """Whether the call runs classifier-free guidance (so needs negative prompt embeddings)."""
    if type(pipe).__name__ == _INSTRUCT:
        return bool(
            kwargs.get("guidance_scale", 7.5) > 1.0
            and kwargs.get("image_guidance_scale", 1.5) >= 1.0
        )
    time_cond = getattr(pipe.unet.config, "time_cond_proj_dim", None)
    return bool(kwargs.get("guidance_scale", 7.5) > 1.0 and time_cond is None)


def _encode_prompt_once(
    pipe: Any, device: Any, prompt: str, n: int, kwargs: dict[str, Any]
) -> dict[str, Any]:
    guided = _guided(pipe, kwargs)
    if type(pipe).__name__ == _INSTRUCT:
        # InstructPix2Pix returns [prompt, negative, negative] stacked when guided.
        stacked = pipe._encode_prompt(prompt, device, 1, guided)
        positive, negative = stacked[:1], (stacked[1:2] if guided else None)
    else:
        positive, negative = pipe.encode_prompt(prompt, device, 1, guided)
    shared: dict[str, Any] = {"prompt": None, "prompt_embeds": positive.repeat(n, 1, 1)}
    if negative is not None:
        shared["negative_prompt_embeds"] = negative.repeat(n, 1, 1)
    return shared


def _pixels(pipe: Any, device: Any, image: Any, kwargs: dict[str, Any]) -> Any:
    """The image as the pipeline preprocesses it, on the VAE's device and dtype."""
    pixels = pipe.image_processor.preprocess(
        image, height=kwargs.get("height"), width=kwargs.get("width")
    )
    return pixels.to(device=device, dtype=pipe.vae.dtype)


def _sampled_image_latents(torch: Any, pipe: Any, pixels: Any, generators: list[Any]) -> Any:
    """One VAE encode; variant i samples its latents with generator i, as the pipeline would."""
    dist = pipe.vae.encode(pixels).latent_dist
    latents = torch.cat([dist.sample(generator=g) for g in generators], dim=0)
    return pipe.vae.config.scaling_factor * latents


def _instruct_image_latents(pipe: Any, device: Any, image: Any, n: int) -> Any:
    """InstructPix2Pix conditions on the (unscaled) mode of the image's latents: one encode."""
    pixels = pipe.image_processor.preprocess(image).to(device=device, dtype=pipe.vae.dtype)
    return pipe.vae.encode(pixels).latent_dist.mode().repeat(n, 1, 1, 1)


def _inpaint_latents(
    torch: Any,
    pipe: Any,
    device: Any,
    image: Any,
    kwargs: dict[str, Any],
    generators: list[Any],
) -> dict[str, Any]:
    four_channels = pipe.unet.config.in_channels == 4
    shared: dict[str, Any] = {"mask_image": kwargs["mask_image"][0], "image": image}
    pixels = _pixels(pipe, device, image, kwargs)
    # The pipeline noises encoded image latents with a 4-channel UNet (to blend the kept region
    # back each step) or when strength < 1; with a 9-channel UNet at strength 1 it never encodes
    # the image, and neither does this.
    if four_channels or kwargs.get("strength", 1.0) < 1.0:
        shared["image"] = _sampled_image_latents(torch, pipe, pixels, generators)
    if four_channels:
        # Only a 9-channel UNet reads the masked image's latents; the pipeline still wants a
        # 4-channel tensor of the batch's shape there, so it gets the image latents, unread.
        shared["masked_image_latents"] = shared["image"]
        return shared
    mask = pipe.mask_processor.preprocess(
        shared["mask_image"], height=kwargs.get("height"), width=kwargs.get("width")
    ).to(device=pixels.device, dtype=pixels.dtype)
    masked = pipe.vae.encode(pixels * (mask < 0.5)).latent_dist.mode()
    shared["masked_image_latents"] = pipe.vae.config.scaling_factor * masked
    return shared


# ---------------------------------------------------------------- pasting the variants back


def feathered_alpha(mask: Image.Image, feather: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Blend weight per pixel: 0 wherever the mask keeps, ramping up inward from its edge.

    A blur of the mask capped by the mask itself softens seams without reaching outside it.
    """
    inside = np.asarray(mask, dtype=np.float32) / 255.0
    if feather <= 0:
        return inside
    blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(feather)), dtype=np.float32)
    alpha: np.ndarray[Any, np.dtype[np.float32]] = np.minimum(inside, blurred / 255.0)
    return alpha


def paste_back(
    original: Image.Image, edited: Image.Image, alpha: np.ndarray[Any, np.dtype[np.float32]]
) -> Image.Image:
    """Blend `edited` into `original` by `alpha`; wherever alpha is 0, bit-identical.

    Only the box around the mask is computed: the rest is a copy of the original.
    """
    orig = np.asarray(original)
    out = orig.copy()
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return Image.fromarray(out, "RGB")
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    weight, kept = alpha[box], orig[box]
    base = kept.astype(np.float32)
    blended = base + (np.asarray(edited)[box] - base) * weight[..., None]
    part = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    keep = weight <= 0.0
    part[keep] = kept[keep]
    out[box] = part
    return Image.fromarray(out, "RGB")
