"""The embedded default: a procedural dataset and two small models shipped with the package."""

#: The toy DiT blocks the demo and the model card compress: all but the first and the last of its 6.
#: (The paper's selection scaled to 6 blocks, ``default_dit_blocks(6)``, is blocks 1-2 only; there
#: 70% ToMe costs the toy fewer than 5 points, too little to compare methods by.)
TOY_COMPRESSED_BLOCKS: tuple[int, ...] = (1, 2, 3, 4)
