"""The conformance suite every compressor plugin must pass, and tiny models to run it on.

Plugin authors run it from their own tests, one pytest test per named check::

    from bigain.testing import parametrize_with_checks

    @parametrize_with_checks([MyMethod(), MyMethod(factor=4)])
    def test_conformance(compressor, check):
        check(compressor)

or all at once with ``check_compressor("my_method")`` (a name, a class or an instance), which
raises ``AssertionError`` naming every failed check and returns the names of those that passed. A
check that does not apply warns (:class:`~bigain.conformance.CheckNotApplicable`) instead of
passing. The checks themselves live in :mod:`bigain.checks`; :func:`~bigain.conformance.check`
registers more. Everything runs on the CPU in a few seconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from bigain.compressor import TokenCompressor
from bigain.conformance import CHECKS, Check, CheckNotApplicable, Subject, check

__all__ = ["check_compressor", "iter_checks", "parametrize_with_checks", "CHECKS", "Check", "CheckNotApplicable",
           "Subject", "check", "tiny_unet", "tiny_dit", "tiny_sd3", "tiny_flux", "save_tiny_stable_diffusion",
           "save_tiny_dit", "save_clip_tokenizer", "TINY_UNET_CONFIG", "TINY_DIT_CONFIG", "TINY_SD3_CONFIG",
           "TINY_FLUX_CONFIG"]

#: A two-level SD-style UNet with attention at both levels (~0.8 M parameters).
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

#: A four-block DiT with learned-sigma output channels, like DiT-XL/2 (~0.1 M parameters).
TINY_DIT_CONFIG: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 4,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
}


#: A three-block SD3.5-style MMDiT: joint attention in every block, dual attention (``attn2``) in
#: block 0, RMS-normalised queries and keys.
TINY_SD3_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 10,
    "pos_embed_max_size": 8,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}

#: A Flux transformer with two double-stream and two single-stream blocks and guidance embedding.
TINY_FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 8,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "pooled_projection_dim": 10,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}


def _randomise_zeros(model: nn.Module) -> nn.Module:
    # diffusers' init leaves some output layers at zero; randomise so outputs depend on attention
    for p in model.parameters():
        if p.abs().sum() == 0:
            nn.init.normal_(p, std=0.02)
    return model


def tiny_sd3(seed: int = 0) -> nn.Module:
    """A freshly initialised tiny ``SD3Transformer2DModel`` (eval mode), with non-zero modulation."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _randomise_zeros(SD3Transformer2DModel(**TINY_SD3_CONFIG).eval())


def tiny_flux(seed: int = 0) -> nn.Module:
    """A freshly initialised tiny ``FluxTransformer2DModel`` (eval mode), with non-zero modulation."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _randomise_zeros(FluxTransformer2DModel(**TINY_FLUX_CONFIG).eval())


def tiny_unet(seed: int = 0) -> nn.Module:
    """A freshly initialised tiny ``UNet2DConditionModel`` (eval mode)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def tiny_dit(seed: int = 0) -> nn.Module:
    """A freshly initialised tiny ``DiTTransformer2DModel`` (eval mode), with non-zero modulation."""
    from diffusers import DiTTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiTTransformer2DModel(**TINY_DIT_CONFIG).eval()
        # diffusers' init leaves some output layers at zero; randomise so outputs depend on attention
        for p in model.parameters():
            if p.abs().sum() == 0:
                nn.init.normal_(p, std=0.02)
    return model


def _subject(compressor: Any, params: Mapping[str, Any] | None, seed: int):
    from bigain.conformance import Subject

    return Subject.of(compressor, params=params, seed=seed)


def _selected(checks: Iterable[str] | None) -> list:
    from bigain.conformance import CHECKS

    if checks is None:
        return list(CHECKS.values())
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown conformance check(s) {unknown}; the checks are {list(CHECKS)}")
    return [CHECKS[c] for c in checks]


def iter_checks(
    compressor: str | type[TokenCompressor] | TokenCompressor,
    *,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    checks: Iterable[str] | None = None,
) -> Iterator[tuple[str, Callable[[], bool]]]:
    """``(name, run)`` for every conformance check (or the named ``checks``), in order.

    ``run()`` runs that one check: it returns True when it passed, False with a
    :class:`~bigain.conformance.CheckNotApplicable` warning when it does not apply, and raises
    ``AssertionError`` starting with ``[name]`` when it fails.

    Example:
        >>> from bigain.testing import iter_checks
        >>> names = [name for name, _ in iter_checks("tome")]
        >>> names[0], names[1]
        ('contract', 'shapes')
    """
    from bigain.conformance import run_check

    subject = _subject(compressor, params, seed)
    for chk in _selected(checks):
        yield chk.name, functools.partial(run_check, chk, subject)


def parametrize_with_checks(compressors: Iterable[Any], *, checks: Iterable[str] | None = None):
    """A ``pytest.mark.parametrize`` of ``(compressor, check)``: one test per compressor and check.

    Args:
        compressors: registered names, classes (tested with their defaults) or instances (tested
            with their hyperparameters, e.g. ``MyMethod(factor=4)``).
        checks: the names of the checks to run (default: every registered one).

    Example::

        from bigain.testing import parametrize_with_checks

        @parametrize_with_checks([MyMethod(), MyMethod(factor=4)])
        def test_conformance(compressor, check):
            check(compressor)

    ``check(compressor)`` runs one named check; its pytest id is ``<compressor>-<check>``.
    """
    import pytest

    cases, ids = [], []
    for comp in compressors:
        label = comp if isinstance(comp, str) else _subject(comp, None, 0).label
        for chk in _selected(checks):
            cases.append((comp, chk))
            ids.append(f"{label}-{chk.name}")
    return pytest.mark.parametrize("compressor, check", cases, ids=ids)


def check_compressor(
    compressor: str | type[TokenCompressor] | TokenCompressor,
    *,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    checks: Iterable[str] | None = None,
) -> list[str]:
    """Run every conformance check (or the named ``checks``) on a compressor.

    Args:
        compressor: a registered name (or ``module:Class`` import path), a :class:`TokenCompressor`
            subclass, or an instance (tested with its hyperparameters).
        params: hyperparameters to test a name or class with (default: the class defaults).
        seed: seed of the inputs and of the applications.
        checks: names of the checks to run (default: all, see :data:`bigain.conformance.CHECKS`).

    Returns:
        The names of the checks that passed. Checks that do not apply are left out, each with a
        :class:`~bigain.conformance.CheckNotApplicable` warning saying why.

    Raises:
        AssertionError: one or more checks failed; the message has one ``[check] reason`` line per
            failed check.
    """
    passed, failures = [], []
    for name, run in iter_checks(compressor, params=params, seed=seed, checks=checks):
        try:
            if run():
                passed.append(name)
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        raise AssertionError("\n".join(failures))
    return passed


def save_clip_tokenizer(path, *, max_length: int = 20) -> None:
    """Save a character-level CLIP tokenizer (ids 0-85 for 43 characters with and without ``</w>``,
    86 / 87 for the start / end tokens) to ``path``: built offline, no vocabulary downloaded."""
    import json
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,()'- ":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                      model_max_length=max_length).save_pretrained(path)


def save_tiny_stable_diffusion(path, seed: int = 0) -> str:
    """Save a tiny Stable Diffusion pipeline folder (unet, vae, text_encoder, tokenizer, scheduler)
    built from configs, loadable with ``bigain.backbones.StableDiffusion(path=...)``. 32x32 images
    map to 16x16 latents."""
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DConditionModel(**TINY_UNET_CONFIG).save_pretrained(root / "unet")
        AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                      sample_size=32).save_pretrained(root / "vae")
        CLIPTextModel(CLIPTextConfig(vocab_size=90, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=20, bos_token_id=86,
                                     eos_token_id=87, pad_token_id=87)).save_pretrained(root / "text_encoder")
    save_clip_tokenizer(root / "tokenizer")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return str(root)


def save_tiny_dit(path, seed: int = 0, *, latent: bool = False) -> str:
    """Save a tiny DiT checkpoint folder (transformer, scheduler; plus a VAE when ``latent``),
    loadable with ``bigain.backbones.DiT(path=...)``. Pixel-space: 16x16 RGB images, 10 classes."""
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    root = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        channels = 4 if latent else 3
        DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=channels,
                              out_channels=2 * channels, num_layers=4, sample_size=8 if latent else 16,
                              patch_size=2, num_embeds_ada_norm=10).save_pretrained(root / "transformer")
        if latent:
            AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                          sample_size=16).save_pretrained(root / "vae")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(root / "scheduler")
    return str(root)
