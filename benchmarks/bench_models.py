"""Model-level benchmark (ResNet-18/50, MobileNetV2, ViT-B/16 at several ratios); same as ``pyprune bench models``.

    .venv/bin/python benchmarks/bench_models.py [--quick] [--device cuda] [--out bench_out]
"""
import sys

from pyprune.app.bench import main

if __name__ == "__main__":
    sys.exit(main(["models", *sys.argv[1:]]))
