import sys

from diffusers import StableDiffusionPipeline

import bigain

model = sys.argv[1] if len(sys.argv) > 1 else "stabilityai/stable-diffusion-2-base"  # or a local folder
pipe = StableDiffusionPipeline.from_pretrained(model)
with bigain.apply(pipe, "bigain_tm", ratio=0.7) as handle:  # or "tome", "todo", "bigain_td", "sito"
    image = pipe("a photo of a corgi").images[0]
print(handle.stats()[0])  # measured tokens in / queries / keys-values of the first compressed layer
image.save("corgi.png")
