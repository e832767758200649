"""The embedded default: a procedural dataset and small models shipped with the package."""

#: The toy DiT blocks the demo and the model card compress: all but the first and the last of its 6.
#: (The paper's selection scaled to 6 blocks, ``default_dit_blocks(6)``, is blocks 1-2 only; there
#: 70% ToMe costs the toy fewer than 5 points, too little to compare methods by.)
TOY_COMPRESSED_BLOCKS: tuple[int, ...] = (1, 2, 3, 4)

#: The two toy denoisers: the backbone each loads through, its folder in a toy models folder, and the
#: layers the demo and the model card compress (the UNet: its full-resolution level, as on Stable
#: Diffusion, selected by the ``unet`` adapter's default; the toy UNet has only that one).
TOY_DENOISERS: dict[str, dict] = {
    "dit": {"backbone": "toy", "folder": "toy-dit", "blocks": list(TOY_COMPRESSED_BLOCKS),
            "label": "toy DiT", "layers": "blocks 1-4 of 6"},
    "unet": {"backbone": "toy-unet", "folder": "toy-unet", "blocks": "paper",
             "label": "toy UNet", "layers": "its one level (16x16 patches)"},
}
