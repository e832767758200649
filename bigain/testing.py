"""The conformance suite every compressor plugin must pass, and tiny models to run it on.

Plugin authors call it from their own tests::

    from bigain.testing import check_compressor

    def test_my_compressor():
        check_compressor("my_method")             # or the class, or with params={...}

It raises ``AssertionError`` naming the first check that fails, and returns the names of the checks
that passed. Everything runs on the CPU in a few seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bigain.compressor import LayerContext, TokenCompressor
from bigain.patching import apply
from bigain.registry import create_compressor, get_compressor

__all__ = ["check_compressor", "tiny_unet", "tiny_dit", "save_tiny_stable_diffusion", "save_tiny_dit",
           "TINY_UNET_CONFIG", "TINY_DIT_CONFIG"]

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


def _fail(check: str, message: str) -> None:
    raise AssertionError(f"[{check}] {message}")


def _inputs(family: str, seed: int) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    if family == "unet":
        x = torch.randn(2, 4, 16, 12, generator=g)  # non-square latent
        t = torch.tensor([100, 800])
        enc = torch.randn(2, 5, 32, generator=g)
        return (x, t, enc), {}
    x = torch.randn(2, 4, 8, 8, generator=g)
    return (x,), {"timestep": torch.tensor([100, 800]), "class_labels": torch.tensor([1, 7])}


def _run(model: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    with torch.no_grad():
        return model(*args, **kwargs).sample


def _processors(model: nn.Module) -> dict[str, Any]:
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def check_compressor(
    compressor: str | type[TokenCompressor],
    *,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> list[str]:
    """Check that a compressor honours the plugin contract.

    Args:
        compressor: a registered name or a :class:`TokenCompressor` subclass.
        params: hyperparameters to test with (default: the class defaults).
        seed: seed of the inputs and of the applications.

    Checks: the class contract (keyword-only hyperparameters with defaults, stored under their own
    names); direct calls on square, non-square and non-divisible grids in float32 and bfloat16
    (shapes restored, dtype kept, finite); determinism for a fixed seed; the global RNG untouched;
    a tiny SD UNet and a tiny DiT run compressed, and after ``remove()`` give bitwise the output they
    gave before ``apply()`` with the very same processor objects back; the class's
    ``identity_params`` leave both models bitwise unchanged.
    """
    cls = get_compressor(compressor) if isinstance(compressor, str) else compressor
    passed: list[str] = []

    # -- contract -----------------------------------------------------------------------------
    import inspect

    if not (isinstance(cls, type) and issubclass(cls, TokenCompressor)):
        _fail("contract", f"{cls!r} is not a TokenCompressor subclass")
    sig = inspect.signature(cls.__init__)
    for p in list(sig.parameters.values())[1:]:
        if p.kind is not p.KEYWORD_ONLY:
            _fail("contract", f"__init__ parameter {p.name!r} must be keyword-only (put it after '*')")
        if p.default is p.empty:
            _fail("contract", f"hyperparameter {p.name!r} needs a default")
    comp = create_compressor(cls, **dict(params or {}))
    try:
        hp = comp.hyperparameters()
    except AttributeError as exc:
        _fail("contract", f"every hyperparameter must be stored as an attribute of the same name: {exc}")
    if create_compressor(cls, **hp) != comp:
        _fail("contract", "rebuilding from hyperparameters() gives a different compressor")
    passed.append("contract")

    # -- direct calls -------------------------------------------------------------------------
    rng_before = torch.get_rng_state()
    g = torch.Generator().manual_seed(seed)
    for grid in [(8, 8), (6, 10), (7, 5)]:
        for dtype in (torch.float32, torch.bfloat16):
            n = grid[0] * grid[1]
            x = torch.randn(3, n, 16, generator=g).to(dtype)
            ctx = LayerContext.for_tokens(x, grid=grid, timesteps=torch.tensor([10.0, 500.0, 500.0]), seed=seed)
            if not comp.applies_to(ctx):
                continue
            out = comp.compress(x, ctx)
            out2 = comp.compress(x, LayerContext.for_tokens(x, grid=grid, timesteps=ctx.timesteps, seed=seed))
            where = f"grid {grid}, {dtype}"
            if out.queries.ndim != 3 or out.queries.shape[0] != 3 or out.queries.shape[2] != 16:
                _fail("shapes", f"{where}: queries have shape {tuple(out.queries.shape)}, expected [3, M, 16]")
            if out.context.ndim != 3 or out.context.shape[0] != 3 or out.context.shape[2] != 16:
                _fail("shapes", f"{where}: context has shape {tuple(out.context.shape)}, expected [3, K, 16]")
            y = torch.randn(3, out.queries.shape[1], 24, generator=g).to(dtype)
            restored = out.restore(y)
            if tuple(restored.shape) != (3, n, 24):
                _fail("shapes", f"{where}: restore gave {tuple(restored.shape)}, expected (3, {n}, 24)")
            if out.queries.dtype != dtype or restored.dtype != dtype:
                _fail("dtype", f"{where}: the input dtype {dtype} is not kept")
            if not torch.isfinite(out.queries.float()).all() or not torch.isfinite(out.context.float()).all():
                _fail("finite", f"{where}: non-finite values in the compressed tokens")
            if not (torch.equal(out.queries, out2.queries) and torch.equal(out.context, out2.context)
                    and torch.equal(out.restore(y), out2.restore(y))):
                _fail("deterministic", f"{where}: two calls with the same seed differ")
    passed += ["shapes", "dtype", "deterministic"]

    # -- on models ----------------------------------------------------------------------------
    for family, build, options in (("unet", tiny_unet, {"max_downsample": 2}), ("dit", tiny_dit, {"blocks": "all"})):
        model = build(seed)
        args, kwargs = _inputs(family, seed)
        before = _run(model, args, kwargs)
        procs = _processors(model)
        handle = apply(model, comp, seed=seed, **options)
        first = _run(model, args, kwargs)
        second = _run(model, args, kwargs)
        handle.remove()
        after = _run(model, args, kwargs)
        if first.shape != before.shape or not torch.isfinite(first).all():
            _fail(f"{family}", f"compressed output has shape {tuple(first.shape)} or non-finite values")
        if not torch.equal(first, second):
            _fail("deterministic", f"{family}: two compressed forwards with the same seed differ")
        if not torch.equal(after, before):
            _fail("exact-restore", f"{family}: output after remove() differs from before apply()")
        now = _processors(model)
        if now.keys() != procs.keys() or any(now[k] is not procs[k] for k in procs):
            _fail("exact-restore", f"{family}: remove() did not put back the original processor objects")
        if cls.identity_params is not None:
            ident = create_compressor(cls, **{**dict(params or {}), **dict(cls.identity_params)})
            with apply(model, ident, seed=seed, **options):
                same = _run(model, args, kwargs)
            if not torch.equal(same, before):
                _fail("identity", f"{family}: {ident!r} changed the output; it must be bitwise identical")
        passed.append(family)
    if cls.identity_params is not None:
        passed.append("identity")
    passed.append("exact-restore")

    if not torch.equal(rng_before, torch.get_rng_state()):
        _fail("global-rng", "the compressor consumed or reseeded the global torch RNG; use ctx.generator, "
                            "ctx.sample_randint or ctx.sample_randn")
    passed.append("global-rng")
    return passed


def save_tiny_stable_diffusion(path, seed: int = 0) -> str:
    """Save a tiny Stable Diffusion pipeline folder (unet, vae, text_encoder, tokenizer, scheduler)
    built from configs, loadable with ``bigain.backbones.StableDiffusion(path=...)``. 32x32 images
    map to 16x16 latents."""
    import json
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,()'- ")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=20)
        tok.save_pretrained(root / "tokenizer")
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
