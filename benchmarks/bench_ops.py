"""Op-level benchmark (gather and single dynamic layers); same as ``pyprune bench ops``.

    .venv/bin/python benchmarks/bench_ops.py [--quick] [--device cuda] [--out bench_out]
"""
import sys

from pyprune.app.bench import main

if __name__ == "__main__":
    sys.exit(main(["ops", *sys.argv[1:]]))
