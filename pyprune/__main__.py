"""``python -m pyprune prune ...`` (also what ``torchrun -m pyprune`` runs)."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
