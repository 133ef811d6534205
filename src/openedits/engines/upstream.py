"""The upstream engine: forwards an edit to another server that speaks the contract."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import httpx
from PIL import Image

from openedits.engines.base import (
    Capabilities,
    EngineInfo,
    Preset,
    ProgressCallback,
    ShouldCancel,
    never_cancel,
    no_progress,
)
from openedits.errors import (
    EngineFailed,
    EngineUnavailable,
    InvalidInput,
    OpenEditsError,
    PromptRefused,
    TaskCancelled,
)

if TYPE_CHECKING:
    from openedits.client import Client, TaskRecord
    from openedits.settings import Settings

__all__ = ["UpstreamEngine"]


class UpstreamEngine:
    """A gateway: the edit runs on the hosted service (or another openedits), and the four
    variants are copied back, so the runner stores them and the URLs handed out never expire.

    It goes through the SDK, so it needs nothing the hosted service lacks: the variants come
    from `split_images`, progress from polling `/midjourney/tasks`, and a cancel is passed on.
    """

    name = "upstream"
    capabilities = Capabilities(needs_mask=False, honours_prompt=True)

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 900.0,
        poll_interval: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._transport = transport

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamEngine:
        """Build from OPENEDITS_UPSTREAM_URL and OPENEDITS_UPSTREAM_TOKEN."""
        if not settings.upstream_url:
            raise EngineUnavailable("the upstream engine needs OPENEDITS_UPSTREAM_URL")
        return cls(settings.upstream_url, settings.upstream_token,
                   timeout=settings.sync_timeout_seconds)

    def _client(self) -> Client:
        from openedits.client import Client

        return Client(
            base_url=self.url,
            token=self.token,
            transport=self._transport,
            poll_interval=self.poll_interval,
            max_poll_interval=max(self.poll_interval, 5.0),
        )

    def load(self, device: str = "auto") -> None:
        """Nothing to load: the upstream holds the weights."""

    def info(self) -> EngineInfo:
        """For /healthz."""
        return EngineInfo(name=self.name, device="remote", model=self.url, loaded=True)

    def validate(self, image: Image.Image, mask: Image.Image | None, prompt: str) -> None:
        """The upstream judges the prompt; only the mask's size is ours to check."""
        if mask is not None and mask.size != image.size:
            raise InvalidInput(f"mask size {mask.size} differs from the image size {image.size}")

    def edit(
        self,
        image: Image.Image,
        mask: Image.Image | None,
        prompt: str,
        *,
        n: int,
        seed: int,
        preset: Preset,
        on_progress: ProgressCallback = no_progress,
        should_cancel: ShouldCancel = never_cancel,
    ) -> list[Image.Image]:
        """Submit upstream, follow it, and download its variants (four per upstream task)."""
        from openedits.client import (
            APIConnectionError,
            AuthenticationError,
            BadRequestError,
            OpenEditsClientError,
            PermissionDeniedError,
            TaskFailedError,
            TokenMismatchedError,
        )

        self.validate(image, mask, prompt)
        variants: list[Image.Image] = []
        try:
            with self._client() as client:
                for offset in range(0, n, 4):

                    def scaled(fraction: float, offset: int = offset) -> None:
                        on_progress(min(1.0, (offset + 4 * fraction) / n))

                    variants += self._one_task(
                        client, image, mask, prompt, seed + offset, preset, scaled, should_cancel
                    )
        except OpenEditsError:
            raise
        except (AuthenticationError, TokenMismatchedError) as exc:
            raise EngineUnavailable(f"the upstream {self.url} refused the token: {exc}") from exc
        except BadRequestError as exc:
            raise InvalidInput(f"the upstream refused the edit: {exc}") from exc
        except PermissionDeniedError as exc:
            raise PromptRefused(f"the upstream refused the prompt: {exc}") from exc
        except APIConnectionError as exc:
            raise EngineUnavailable(f"the upstream {self.url} is unreachable: {exc}") from exc
        except TaskFailedError as exc:
            if exc.code in ("bad_request", "forbidden"):
                raise InvalidInput(f"the upstream refused the edit: {exc.message}") from exc
            raise EngineFailed(f"the upstream edit failed ({exc.code}): {exc.message}") from exc
        except OpenEditsClientError as exc:
            raise EngineFailed(f"the upstream {self.url} failed: {exc}") from exc
        if should_cancel():
            raise TaskCancelled("the task was cancelled")
        return [_fit(v, image.size) for v in variants[:n]]

    def _one_task(
        self,
        client: Client,
        image: Image.Image,
        mask: Image.Image | None,
        prompt: str,
        seed: int,
        preset: Preset,
        on_progress: ProgressCallback,
        should_cancel: ShouldCancel,
    ) -> list[Image.Image]:
        # `seed` is an openedits extension; the hosted service ignores unknown keys.
        task_id = client.submit(image, prompt, mask=mask, split_images=True, mode=preset,
                                extra={"seed": seed})

        def follow(record: TaskRecord) -> None:
            if should_cancel():
                client.cancel(task_id)
                raise TaskCancelled("the task was cancelled")
            progress = (record.response or {}).get("progress")
            if isinstance(progress, int | float) and 0 < progress < 100:
                on_progress(progress / 100)

        result = client.wait(task_id, timeout=self.timeout, on_progress=follow)
        urls: list[str] = list(result.sub_image_urls)
        if len(urls) < 4:
            raise EngineFailed(f"the upstream returned {len(urls)} variants, not 4")
        images = [_open(client.download(url), url) for url in urls[:4]]
        on_progress(1.0)
        return images


def _open(data: bytes, url: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise EngineFailed(f"the upstream's variant {url} is not an image: {exc}") from exc


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    # The hosted service may answer at another size; the contract promises the input's.
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


