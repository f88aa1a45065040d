"""Write the embedded `digits` dataset (run once, by a developer; needs scikit-learn).

UCI optdigits as scikit-learn ships it: 1797 handwritten digits, 8x8 pixels, values 0..16,
CC BY 4.0 (Alpaydin & Kaynak, UCI Machine Learning Repository). Stored as uint8 0..255 in
src/edgeft/assets/digits.npz, and a few of them as PNG files in examples/digits/ for the quickstart.
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    np.savez_compressed(ROOT / "src/edgeft/assets/digits.npz", images=images, labels=labels)
    examples = ROOT / "examples/digits"
    examples.mkdir(parents=True, exist_ok=True)
    for digit in range(10):
        index = int(np.flatnonzero(labels == digit)[-1])  # the last one of each class
        Image.fromarray(images[index], mode="L").save(examples / f"{digit}.png")


if __name__ == "__main__":
    main()
