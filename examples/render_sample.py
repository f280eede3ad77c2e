"""Renders examples/in.png, the sample input of the README and the demo: a small drawn scene (a house, a tree, a
sun over hills), made by this script so that it carries no third party's licence. Deterministic: re-running it
writes the same file.

    python examples/render_sample.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

W, H = 256, 256


def render() -> Image.Image:
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)
    for y in range(H):  # sky: light blue at the top to pale at the horizon
        t = y / H
        d.line([(0, y), (W, y)], fill=(int(110 + 120 * t), int(170 + 70 * t), 250))
    d.ellipse([190, 24, 230, 64], fill=(255, 214, 90))  # sun
    d.polygon([(0, 170), (70, 130), (150, 165), (210, 140), (256, 160), (256, 256), (0, 256)], fill=(86, 160, 74))
    d.rectangle([0, 200, 256, 256], fill=(70, 140, 60))  # meadow
    d.rectangle([60, 150, 140, 215], fill=(236, 224, 200))  # house
    d.polygon([(52, 152), (100, 110), (148, 152)], fill=(178, 48, 40))  # roof
    d.rectangle([90, 180, 110, 215], fill=(110, 70, 40))  # door
    d.rectangle([68, 162, 84, 176], fill=(150, 200, 235))  # window
    d.rectangle([116, 162, 132, 176], fill=(150, 200, 235))
    d.rectangle([186, 165, 196, 215], fill=(100, 66, 36))  # tree
    d.ellipse([166, 120, 216, 175], fill=(40, 120, 50))
    return img


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "in.png"
    render().save(out, optimize=True)
    print(f"wrote {out}")
