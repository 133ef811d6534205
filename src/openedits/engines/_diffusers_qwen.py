"""Qwen-Image-Edit's processor, image side only (private to the diffusers engine).

Qwen-Image-Edit pipelines tokenize the prompt together with the input image through Qwen2-VL's
processor. In transformers 5.x that processor refuses to be built without a video processor, and
the video processor class exists only where torchvision is installed (a CUDA build on the package
index, which will not import beside a CPU torch). An edit never sends video, so the engine builds
the processor from its two real parts, the tokenizer and the PIL image processor, read from the
checkpoint's own `processor` folder: the same tokens and pixels, with or without torchvision.
"""

from __future__ import annotations

from functools import cache
from typing import Any

__all__ = ["image_only_processor", "load_image_only_processor"]


@cache
def _processor_class() -> Any:
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2-VL's processor with no video processor (the attributes follow __init__)."""

        def __init__(
            self,
            image_processor: Any = None,
            tokenizer: Any = None,
            chat_template: str | None = None,
            **kwargs: Any,
        ) -> None:
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(  # type: ignore[no-untyped-call]
                self, image_processor, tokenizer, chat_template=chat_template
            )

    return ImageOnlyQwen2VLProcessor


def image_only_processor(image_processor: Any, tokenizer: Any) -> Any:
    """A Qwen2-VL processor made of `image_processor` and `tokenizer`, with no video side."""
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer)


def load_image_only_processor(model: str, *, local_files_only: bool) -> Any:
    """Read the checkpoint's `processor` folder into an image-only Qwen2-VL processor."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(
        model, subfolder="processor", local_files_only=local_files_only
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model, subfolder="processor", local_files_only=local_files_only
    )
    return image_only_processor(image_processor, tokenizer)
