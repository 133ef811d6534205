"""GPU check: a real-size edit model with random weights, timed through the engine, in one run.

Builds FLUX.2 [klein] 4B (or another family with a file in bench/configs/) at its REAL size from
the configuration shipped there, with random weights (a GPU without hub access holds no weights,
and speed and memory do not depend on the values), hands it to the diffusers engine as a loaded
model, and runs a four-variant edit with and without a mask for each speed option:

- plain bf16 (the reference),
- + TaylorSeer step cache (the cache this family supports),
- + fp8 weight-only quantization (torchao, compute capability 8.9+),
- + fp8 and torch.compile of the repeated blocks.

It prints seconds per edit, peak device memory, and each option's gain over plain bf16, all
measured side by side in this one run. Without CUDA it refuses (exit 2), unless `--tiny`, which
runs the same code path on the tiny test model on the CPU:

    python bench/gpu_check.py                      # on a CUDA machine
    python bench/gpu_check.py --tiny               # anywhere: exercises the code path
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # for tests.engines.tiny_families

from tests.engines.contract import make_test_image, make_test_mask  # noqa: E402

from openedits.engines._diffusers_families import family_for  # noqa: E402
from openedits.engines._diffusers_options import SpeedOptions  # noqa: E402
from openedits.engines._diffusers_pipes import finish_loading, transformer_model  # noqa: E402
from openedits.engines.diffusers import DiffusersEngine  # noqa: E402

CONFIGS = ROOT / "bench" / "configs"
PROMPT = "make the cat wear a red hat"
_GiB = 1024**3


def build_real(torch: Any, diffusers: Any, config: dict[str, Any], device: str) -> Any:
    """The pipeline at its published size, random weights, built directly on `device` in bf16."""
    import transformers
    from tests.engines.tiny_families import _KLEIN_CHAT_TEMPLATE, _qwen_tokenizer

    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            parts = {}
            for name in ("transformer", "vae"):
                spec = config[name]
                parts[name] = getattr(diffusers, spec["class"]).from_config(spec["config"])
            spec = config["text_encoder"]
            te_cls = getattr(transformers, spec["class"])
            te_config = getattr(transformers, spec["class"].replace("ForCausalLM", "Config"))(
                **spec["config"]
            )
            parts["text_encoder"] = te_cls(te_config)
    finally:
        torch.set_default_dtype(torch.float32)
    # The tokenizer only sets the sequence length (klein pads to 512 tokens whatever the prompt).
    parts["tokenizer"] = _qwen_tokenizer(_KLEIN_CHAT_TEMPLATE)
    parts["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = getattr(diffusers, config["pipeline"])(**parts, **config.get("pipeline_config", {}))
    return pipe.to(device)


def build_tiny(diffusers: Any) -> Any:
    from tests.engines.tiny_families import tiny_family_components

    return diffusers.Flux2KleinPipeline(**tiny_family_components("flux2-klein"))


def engine_for(
    diffusers: Any, pipe: Any, family_key: str, device: str, steps: int | None
) -> DiffusersEngine:
    """A DiffusersEngine holding `pipe` as its loaded model, exactly as after load()."""
    family = family_for({"_class_name": type(pipe).__name__, "is_distilled": True})
    assert family.key.startswith(family_key.split("-")[0])
    engine = DiffusersEngine(f"random:{family.key}", device, steps=steps, memory_saving="off")
    loaded = transformer_model(engine.model or "", family, type(pipe).__name__, pipe)
    loaded = finish_loading(diffusers, loaded, SpeedOptions(), device, pipe.transformer.dtype)
    presets = loaded.family_presets
    if steps is not None:
        from dataclasses import replace

        presets = {k: replace(p, steps=steps) for k, p in presets.items()}
    loaded.family_presets = presets
    engine._main, engine._device = loaded, device
    return engine


def measure(
    torch: Any, engine: DiffusersEngine, size: int, repeats: int, device: str
) -> dict[str, float]:
    """Best-of seconds per 4-variant edit without and with a mask, and the peak memory."""
    image, mask = make_test_image((size, size)), make_test_mask((size, size))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out: dict[str, float] = {}
    for label, m in (("no mask", None), ("mask", mask)):
        engine.edit(image, m, PROMPT, n=4, seed=0, preset="fast")  # warm: kernels, compile
        times = []
        for r in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            engine.edit(image, m, PROMPT, n=4, seed=r, preset="fast")
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[label] = min(times)
    out["peak GiB"] = torch.cuda.max_memory_allocated() / _GiB if cuda else float("nan")
    return out


def fp8_possible(torch: Any, device: str) -> str | None:
    """None when fp8 can run here, else why not."""
    if not device.startswith("cuda"):
        return "needs CUDA"
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return "torchao not installed"
    if torch.cuda.get_device_capability() < (8, 9):
        return "compute capability below 8.9"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="flux2-klein-4b", help="a file in bench/configs/")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (CPU is fine)")
    parser.add_argument("--size", type=int, help="input side (default 1024; tiny: 64)")
    parser.add_argument("--steps", type=int, help="override the preset's steps (tiny: 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure (best of)")
    parser.add_argument("--compile", action="store_true", help="tiny: also try torch.compile")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print(
            f"gpu_check needs a CUDA device (torch {torch.__version__} sees none); "
            "run it on a GPU machine, or pass --tiny to exercise the code path on the CPU",
            file=sys.stderr,
        )
        return 2
    import diffusers

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    config = json.loads((CONFIGS / f"{args.config}.json").read_text())
    size = args.size or (64 if args.tiny else 1024)
    steps = args.steps or (2 if args.tiny else None)
    start = time.perf_counter()
    pipe = build_tiny(diffusers) if args.tiny else build_real(torch, diffusers, config, device)
    params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e9
    text = sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e9
    print(f"model    {'tiny ' if args.tiny else ''}{config['family']} ({args.config}): "
          f"transformer {params:.2f}B + text encoder {text:.2f}B parameters, random weights, "
          f"built in {time.perf_counter() - start:.1f} s")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device   {name}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    engine = engine_for(diffusers, pipe, config["family"], device, steps)
    if args.tiny:
        engine.work_size = "input"  # the tiny model at the family's 1 MP would take minutes
    preset = engine._main.family_presets["fast"] if engine._main else None
    print(f"edit     4 variants, {size}x{size} input, {preset and preset.steps} steps, "
          f"work {engine.work_size_for((size, size))}")
    print()
    rows: list[tuple[str, dict[str, float] | str]] = []
    rows.append(("bf16" if device == "cuda" else "fp32 (cpu)", measure(
        torch, engine, size, args.repeats, device)))
    transformer = pipe.transformer
    transformer.enable_cache(
        diffusers.TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3)
    )
    engine.options = SpeedOptions(cache="taylorseer")
    rows.append(("+ taylorseer cache", measure(torch, engine, size, args.repeats, device)))
    transformer.disable_cache()
    engine.options = SpeedOptions()
    why_not = fp8_possible(torch, device)
    if why_not is None:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_

        quantize_(transformer, Float8WeightOnlyConfig())
        rows.append(("+ fp8 weights", measure(torch, engine, size, args.repeats, device)))
    else:
        rows.append(("+ fp8 weights", f"skipped: {why_not}"))
    if device == "cuda" or args.compile:
        start = time.perf_counter()
        transformer.compile_repeated_blocks(fullgraph=True)
        label = "+ fp8 + compile" if why_not is None else "+ compile"
        rows.append((label, measure(torch, engine, size, args.repeats, device)))
        print(f"(compile and its warm-up: {time.perf_counter() - start:.1f} s in all)")
    else:
        rows.append(("+ compile", "skipped: tiny on CPU (pass --compile to try)"))
    print(f"{'option':22s} {'s/edit no mask':>15s} {'s/edit mask':>12s} {'peak GiB':>9s} "
          f"{'gain':>6s}")
    base = rows[0][1]
    assert isinstance(base, dict)
    for label, figures in rows:
        if isinstance(figures, str):
            print(f"{label:22s} {figures}")
            continue
        gain = (base["no mask"] + base["mask"]) / (figures["no mask"] + figures["mask"])
        print(f"{label:22s} {figures['no mask']:15.3f} {figures['mask']:12.3f} "
              f"{figures['peak GiB']:9.2f} {gain:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
