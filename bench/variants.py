"""The speed options a benchmark row can turn on, by name: ``eager`` or options joined with ``+``.

``compile`` (flowpp.compile, inductor), ``reduce-overhead`` (compile with CUDA graphs), ``fused``
(fused Adam), ``channels_last`` and ``bf16`` (the coupling nets under autocast). Each is the
benchmark's name for a job-spec option: model.compile / compile_mode, train.fused_adam,
model.channels_last, model.precision.
"""

from __future__ import annotations

OPTIONS = ("compile", "reduce-overhead", "fused", "channels_last", "bf16")


def parse_variant(variant: str) -> set[str]:
    """``eager`` or options joined with ``+``; a ValueError names an unknown option."""
    options = set() if variant == "eager" else set(variant.split("+"))
    if bad := sorted(options - set(OPTIONS)):
        raise ValueError(f"unknown option(s) {bad} in variant {variant!r}; choose from eager or {OPTIONS} joined by +")
    return options


def apply_variant(cfg, variant: str):
    """(the config with the variant's build options, whether Adam is fused)."""
    options = parse_variant(variant)
    compiled = bool(options & {"compile", "reduce-overhead"})
    cfg = cfg.replace(
        compile=compiled,
        compile_mode="reduce-overhead" if "reduce-overhead" in options else "default",
        channels_last="channels_last" in options,
        bf16=cfg.bf16 or "bf16" in options,
    )
    return cfg, "fused" in options
