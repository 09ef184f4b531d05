"""The README's quick-tour pictures, made by the embedded model on the CPU (seeded, so reruns give the same files).

    python scripts/make_tour_images.py --out docs/images

Writes tour_img2img.png (input, strength 0.4, 0.7), tour_inpaint.png (input with the masked rectangle, two
prompts) and tour_decoding.png (every other step, 1, 3, 5, 7 of the model's 8, greyed where still masked, over
each step's confidence map), tiles upscaled 2x.
"""

import argparse
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch

from amused.embedded import embedded_model_path
from amused.images import make_image_grid
from amused import AmusedImg2ImgPipeline, AmusedInpaintPipeline, AmusedPipeline
from amused.steps import confidence_map, step_frames

RECT = (12, 34, 52, 58)  # left, top, right, bottom in pixels: the mouth of a 64 px face
SCALE = 2


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def big(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.resize((image.width * SCALE, image.height * SCALE), PIL.Image.NEAREST)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/images"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = embedded_model_path()
    pipe = AmusedPipeline.from_pretrained(path)

    face = pipe("grinning face, google style", generator=seeded(args.seed)).images[0]

    img2img = AmusedImg2ImgPipeline.from_pretrained(path)
    redrawn = [img2img("grinning face, openmoji style", image=face, strength=s, generator=seeded(args.seed)).images[0]
               for s in (0.4, 0.7)]
    make_image_grid([big(x) for x in [face, *redrawn]], rows=1, cols=3).save(args.out / "tour_img2img.png")

    mask = PIL.Image.new("L", face.size, 0)
    PIL.ImageDraw.Draw(mask).rectangle([RECT[0], RECT[1], RECT[2] - 1, RECT[3] - 1], fill=255)
    shown = face.copy()
    shown.paste(PIL.Image.new("RGB", face.size, (230, 40, 200)), mask=mask.point(lambda v: v * 3 // 4))
    inpaint = AmusedInpaintPipeline.from_pretrained(path)
    filled = [inpaint(prompt, image=face, mask_image=mask, generator=seeded(args.seed)).images[0]
              for prompt in ("face with tears of joy, google style", "grinning face, google style")]
    make_image_grid([big(x) for x in [shown, *filled]], rows=1, cols=3).save(args.out / "tour_inpaint.png")

    out = pipe("red apple, google style", generator=seeded(args.seed), return_steps=True)
    picked = out.steps[::2]  # every other step: 1, 3, 5, 7 (1-based) of the model's 8
    frames = step_frames(pipe, picked, scale=SCALE)
    maps = [confidence_map(s, size=frames[0].width) for s in picked]
    make_image_grid(frames + maps, rows=2, cols=len(frames)).save(args.out / "tour_decoding.png")
    print("wrote", *(args.out / n for n in ("tour_img2img.png", "tour_inpaint.png", "tour_decoding.png")))


if __name__ == "__main__":
    main()
