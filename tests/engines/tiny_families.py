"""Tiny random-weight pipelines of the transformer edit families, built offline and saved.

Qwen-Image-Edit (and its Plus revision), FLUX.2 klein, FLUX.1 Kontext and FLUX.1 Fill, each with
the components diffusers' own fast tests use (`get_dummy_components`), except that every part
those tests download is built here: the tokenizers come from in-memory vocabularies (byte-level
symbols for CLIP and Qwen, a Unigram list for T5), the text encoders are random. Everything is
written with `save_pretrained` and read back by the engine's real loader with the hub offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from tests.engines.tiny_diffusers import BOS, EOS, _bytes_to_unicode, byte_level_vocab

Family = Literal["qwen-edit", "qwen-edit-plus", "flux2-klein", "flux-kontext", "flux-fill"]
FAMILIES: tuple[Family, ...] = (
    "qwen-edit",
    "qwen-edit-plus",
    "flux2-klein",
    "flux-kontext",
    "flux-fill",
)
_PIPELINE_CLASS: dict[str, str] = {
    "qwen-edit": "QwenImageEditPipeline",
    "qwen-edit-plus": "QwenImageEditPlusPipeline",
    "flux2-klein": "Flux2KleinPipeline",
    "flux-kontext": "FluxKontextPipeline",
    "flux-fill": "FluxFillPipeline",
}
QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)
# Enough of Qwen3's chat template for FLUX.2 klein, which asks for a generation prompt with
# thinking disabled.
_KLEIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def _qwen_tokenizer(chat_template: str | None = None) -> Any:
    """A byte-level Qwen2 tokenizer without merges (every byte its own token) and the specials."""
    from transformers import Qwen2Tokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    for token in QWEN_SPECIALS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIALS[1:]),
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _t5_tokenizer() -> Any:
    """A Unigram T5 tokenizer over single characters (ids 0, 1, 2: pad, eos, unk)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(32, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip() -> tuple[Any, Any]:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = byte_level_vocab()
    torch.manual_seed(0)
    encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=77,
            projection_dim=32,
        )
    )
    return encoder, CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5() -> tuple[Any, Any]:
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=256,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return encoder, _t5_tokenizer()


def _flux1(in_channels: int, out_channels: int, latent_channels: int) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    text_encoder, tokenizer = _clip()
    text_encoder_2, tokenizer_2 = _t5()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
        "vae": vae,
    }


def _qwen(tokenizer: Any) -> dict[str, Any]:
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tokenizer),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        hidden_size=16,
        vocab_size=len(tokenizer),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        vision_token_id=ids("<|vision_pad|>"),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }


def qwen_processor(tokenizer: Any) -> Any:
    """Qwen2-VL's processor, image side only (the video side needs torchvision)."""
    from transformers import Qwen2VLImageProcessorPil

    from openedits.engines._diffusers_qwen import image_only_processor

    return image_only_processor(Qwen2VLImageProcessorPil(), tokenizer)


def _klein() -> dict[str, Any]:
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _qwen_tokenizer(_KLEIN_CHAT_TEMPLATE)
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,  # 3 stacked text-encoder layers of hidden size 16
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    )
    torch.manual_seed(0)
    # 27 layers: the pipeline reads hidden states 9, 18 and 27 by default.
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            intermediate_size=16,
            hidden_size=16,
            num_hidden_layers=27,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
        )
    )
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
        "vae": vae,
        "is_distilled": True,
    }


def tiny_family_components(family: Family) -> dict[str, Any]:
    """The components of a tiny pipeline of `family`, seeded so every build is the same."""
    if family in ("qwen-edit", "qwen-edit-plus"):
        tokenizer = _qwen_tokenizer()
        components = _qwen(tokenizer)
        components["processor"] = qwen_processor(tokenizer)
        return components
    if family == "flux2-klein":
        return _klein()
    if family == "flux-kontext":
        return _flux1(in_channels=4, out_channels=4, latent_channels=1)
    # FLUX.1 Fill: latents (2 x 4 packed = 8), masked-image latents (8) and the mask's 4 channels.
    return _flux1(in_channels=20, out_channels=8, latent_channels=2)


def build_tiny_family(folder: Path, family: Family) -> Path:
    """Save a tiny pipeline of `family` into `folder` (a diffusers layout with model_index.json)."""
    import diffusers

    cls = getattr(diffusers, _PIPELINE_CLASS[family])
    pipe = cls(**tiny_family_components(family))
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder)
    if family.startswith("qwen"):
        # As the published checkpoints say it: the engine builds the processor itself.
        index = folder / "model_index.json"
        config = json.loads(index.read_text())
        config["processor"] = ["transformers", "Qwen2VLProcessor"]
        index.write_text(json.dumps(config, indent=2))
    return folder
