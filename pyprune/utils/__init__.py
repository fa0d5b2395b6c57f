"""Small helpers every pyprune package may import: crash-safe file writes (:mod:`.files`) and model unwrapping
(:mod:`.modules`). They import nothing of pyprune but :mod:`pyprune.errors`."""
