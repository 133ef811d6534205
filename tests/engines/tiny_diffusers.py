"""Tiny random-weight diffusers pipelines, built offline and saved for the engine to load back.

They follow diffusers' own fast tests (a two-block UNet with `block_out_channels=(32, 64)`, a
two-block VAE, a 5-layer CLIP text model with `hidden_size=32`), so a whole edit runs in well under
a second on a CPU. The CLIP tokenizer is built in code from a byte-level vocabulary (the 256 byte
symbols, each also with `</w>`, plus the start/end tokens) and no merges, so nothing is downloaded
and no weights or vocab files live in the repository: everything is written with `save_pretrained`
into a temporary folder and read back by the engine's real `from_pretrained` code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

Kind = Literal["sd", "inpaint", "pix2pix"]

# UNet input channels per pipeline kind: latents (4), plus mask (1) and masked-image latents (4)
# for an inpainting checkpoint, plus the image latents (4) for InstructPix2Pix.
_UNET_IN_CHANNELS: dict[str, int] = {"sd": 4, "inpaint": 9, "pix2pix": 8}
_PIPELINE_CLASS: dict[str, str] = {
    "sd": "StableDiffusionPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
    "pix2pix": "StableDiffusionInstructPix2PixPipeline",
}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, which CLIP's byte-level BPE uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def byte_level_vocab() -> dict[str, int]:
    """A CLIP vocabulary covering any text without merges: each byte symbol, alone and `</w>`."""
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({f"{s}</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab


def tiny_components(kind: Kind = "sd", seed: int = 0) -> dict[str, Any]:
    """The pipeline's components, with random weights seeded so every build is the same."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = byte_level_vocab()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=_UNET_IN_CHANNELS[kind],
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(vocab),
            max_position_embeddings=77,
        )
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    # Stable Diffusion's own schedule, so the engine's scheduler swap sees a realistic config.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def build_tiny_pipeline(folder: Path, kind: Kind = "sd", seed: int = 0) -> Path:
    """Save a tiny pipeline of `kind` into `folder` (a diffusers layout with model_index.json)."""
    import diffusers

    cls = getattr(diffusers, _PIPELINE_CLASS[kind])
    pipe = cls(**tiny_components(kind, seed))
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    return folder
