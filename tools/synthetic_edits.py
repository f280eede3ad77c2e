"""The shapes editing task: scenes of two or three coloured shapes on a plain background, an instruction that names
one shape (by its kind or by its colour) and one change (a new colour, or removal), the ground-truth edited image and
the mask of the pixels that may change. Everything is drawn with PIL from a seed, so the task needs no download.

    scene(seed)   -> Scene           the shapes of one picture
    example(seed) -> Example         a scene, one edit of it, its ground truth and mask
    pair(seed)    -> (Example, Example)   one scene with two edits of different shapes (does the instruction matter?)

Splits are by seed: TRAIN_SEEDS and HELDOUT_SEEDS never meet, and the training script draws only from the first.

Why these choices: 64 px is the smallest side every backend's profile takes, and the tiny preset's VAE turns it into
an 8x8 latent that its UNet sees at two scales; a shape is 18-26 px wide (2-3 latent pixels), large enough for the
VAE to keep its colour and outline. Three kinds and six colours give 57 distinct instructions: the LLM side must read
the characters of the instruction to find the shape (by kind or by colour) and the change, and the image side must
find that shape in the picture. Shapes in a scene differ in kind and in colour, so every instruction names exactly one.

    python tools/synthetic_edits.py OUT_DIR [--count 8]     # writes input / target / mask PNGs of held-out examples
    python tools/synthetic_edits.py --sample examples/shapes.png    # the README's sample picture (held out)
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64  # px, the side of every picture of the task
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges, as a camera would see them
KINDS = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "white": (250, 250, 250),
}
BACKGROUNDS = ((128, 128, 128), (96, 104, 112), (150, 140, 120))  # grey, slate, khaki: far from every shape colour
TRAIN_SEEDS = range(0, 1_000_000)
HELDOUT_SEEDS = range(1_000_000, 1_010_000)  # the evaluation uses the first HELDOUT_COUNT of these
HELDOUT_COUNT = 200
SAMPLE_SEED = 1_009_995  # examples/shapes.png: a held-out picture beyond the evaluated ones
REMOVE_SHARE = 0.3  # the rest are recolourings


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: float  # centre and radius in px at RESOLUTION
    cy: float
    r: float


@dataclass(frozen=True)
class Scene:
    seed: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Edit:
    target: int  # index of the shape the instruction names
    by: str  # "kind" or "colour": how the instruction names it
    new_colour: str | None  # None: remove the shape

    def instruction(self, scene: Scene) -> str:
        s = scene.shapes[self.target]
        name = f"the {s.kind}" if self.by == "kind" else f"the {s.colour} shape"
        return f"remove {name}" if self.new_colour is None else f"make {name} {self.new_colour}"


@dataclass
class Example:
    seed: int
    scene: Scene
    edit: Edit
    instruction: str
    image: Image.Image  # the input, RGB, RESOLUTION x RESOLUTION
    target: Image.Image  # the ground truth after the edit
    mask: np.ndarray  # [R, R] bool: the pixels the edit may change (the target shape, one pixel wider)
    core: np.ndarray  # [R, R] bool: the target shape's inner pixels, where its colour is read
    others: list[np.ndarray]  # the inner pixels of every other shape, which must keep their colours

    @property
    def asked(self) -> tuple[int, int, int]:
        """The colour the edited shape's pixels should have: the new colour, or the background for a removal."""
        c = self.edit.new_colour
        return self.scene.background if c is None else COLOURS[c]


def scene(seed: int) -> Scene:
    rng = random.Random(seed)
    n = rng.choice((2, 3))
    kinds = rng.sample(KINDS, n)
    colours = rng.sample(sorted(COLOURS), n)
    shapes: list[Shape] = []
    while len(shapes) < n:  # rejection sampling: shapes apart by 3 px at least, inside the frame
        r = rng.uniform(9.0, 13.0)
        cx, cy = rng.uniform(r + 2, RESOLUTION - r - 2), rng.uniform(r + 2, RESOLUTION - r - 2)
        if all((cx - s.cx) ** 2 + (cy - s.cy) ** 2 > (r + s.r + 3) ** 2 for s in shapes):
            shapes.append(Shape(kinds[len(shapes)], colours[len(shapes)], cx, cy, r))
    return Scene(seed, rng.choice(BACKGROUNDS), tuple(shapes))


def _outline(s: Shape, k: float) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    """The shape's outline at scale k: a box for circles and squares, three corners for a triangle."""
    cx, cy, r = s.cx * k, s.cy * k, s.r * k
    if s.kind == "triangle":  # equilateral, point up, centred on its circumcircle
        return [(cx, cy - r), (cx - 0.866 * r, cy + 0.5 * r), (cx + 0.866 * r, cy + 0.5 * r)]
    if s.kind == "square":  # the side is 1.6 r: about a circle's area
        return (cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r)
    return (cx - r, cy - r, cx + r, cy + r)


def _draw(d: ImageDraw.ImageDraw, s: Shape, fill, k: float) -> None:
    xy = _outline(s, k)
    if s.kind == "circle":
        d.ellipse(xy, fill=fill)
    elif s.kind == "square":
        d.rectangle(xy, fill=fill)
    else:
        d.polygon(xy, fill=fill)


def render(sc: Scene, colours: list[str | None] | None = None) -> Image.Image:
    """The scene as an RGB picture; `colours` overrides each shape's colour (None: the shape is not drawn)."""
    k = SUPERSAMPLE
    big = Image.new("RGB", (RESOLUTION * k, RESOLUTION * k), sc.background)
    d = ImageDraw.Draw(big)
    for i, s in enumerate(sc.shapes):
        c = s.colour if colours is None else colours[i]
        if c is not None:
            _draw(d, s, COLOURS[c], k)
    return big.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)


def coverage(s: Shape) -> np.ndarray:
    """[R, R] float in [0, 1]: how much of each pixel the shape covers."""
    k = SUPERSAMPLE
    big = Image.new("L", (RESOLUTION * k, RESOLUTION * k), 0)
    _draw(ImageDraw.Draw(big), s, 255, k)
    return np.asarray(big.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _grow(m: np.ndarray, px: int) -> np.ndarray:
    out = m.copy()
    for _ in range(px):
        p = np.pad(out, 1)
        out = out | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


def _shrink(m: np.ndarray, px: int) -> np.ndarray:
    return ~_grow(~m, px)


def pick_edit(sc: Scene, rng: random.Random, target: int | None = None) -> Edit:
    target = rng.randrange(len(sc.shapes)) if target is None else target
    by = rng.choice(("kind", "colour"))
    if rng.random() < REMOVE_SHARE:
        return Edit(target, by, None)
    used = {s.colour for s in sc.shapes}  # a new colour no shape of the scene has: every name stays unique
    return Edit(target, by, rng.choice(sorted(set(COLOURS) - used)))


def make(sc: Scene, edit: Edit) -> Example:
    image, target = pictures(sc, edit)
    cover = [coverage(s) for s in sc.shapes]
    return Example(seed=sc.seed, scene=sc, edit=edit, instruction=edit.instruction(sc), image=image,
                   target=target, mask=_grow(cover[edit.target] > 0, 1),
                   core=_shrink(cover[edit.target] >= 1.0, 1),
                   others=[_shrink(c >= 1.0, 1) for i, c in enumerate(cover) if i != edit.target])


def drawn_edit(seed: int) -> tuple[Scene, Edit]:
    """The scene of a seed and the edit drawn for it."""
    sc = scene(seed)
    return sc, pick_edit(sc, random.Random(seed * 7919 + 1))


def pictures(sc: Scene, edit: Edit) -> tuple[Image.Image, Image.Image]:
    """-> (input, ground truth): what training needs, without the masks."""
    colours: list[str | None] = [s.colour for s in sc.shapes]
    colours[edit.target] = edit.new_colour
    return render(sc), render(sc, colours)


def example(seed: int) -> Example:
    """One scene and one edit of it, both drawn from the seed."""
    return make(*drawn_edit(seed))


def pair(seed: int) -> tuple[Example, Example]:
    """One scene and two edits of two different shapes: their ground truths differ in two places."""
    sc = scene(seed)
    rng = random.Random(seed * 7919 + 2)
    a, b = rng.sample(range(len(sc.shapes)), 2)
    return make(sc, pick_edit(sc, rng, a)), make(sc, pick_edit(sc, rng, b))


def heldout(count: int = HELDOUT_COUNT) -> list[Example]:
    return [example(s) for s in HELDOUT_SEEDS[:count]]


def instructions() -> list[str]:
    """Every instruction the task can give (57): 3 kinds x 6 colours + 6 x 5 recolourings by colour, 9 removals."""
    out = [f"make the {k} {c}" for k in KINDS for c in COLOURS]
    out += [f"make the {a} shape {b}" for a in COLOURS for b in COLOURS if a != b]
    out += [f"remove the {k}" for k in KINDS] + [f"remove the {c} shape" for c in COLOURS]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, nargs="?", help="folder for the PNGs (created)")
    ap.add_argument("--count", type=int, default=8, help="held-out examples to write (default 8)")
    ap.add_argument("--sample", type=Path, help=f"write the picture of seed {SAMPLE_SEED} to this file instead")
    args = ap.parse_args(argv)
    if args.sample:
        render(scene(SAMPLE_SEED)).save(args.sample, optimize=True)
        print(f"wrote {args.sample}")
        return
    if args.out is None:
        ap.error("give OUT_DIR or --sample FILE")
    args.out.mkdir(parents=True, exist_ok=True)
    for ex in heldout(args.count):
        ex.image.save(args.out / f"{ex.seed}-input.png")
        ex.target.save(args.out / f"{ex.seed}-target.png")
        Image.fromarray(ex.mask.astype(np.uint8) * 255).save(args.out / f"{ex.seed}-mask.png")
        print(f"{ex.seed}: {ex.instruction}")


if __name__ == "__main__":
    main()
