"""A text corpus every machine has: the Python standard library's own source, as byte tokens in fixed-length blocks.

The files are the ``*.py`` directly in the standard library's folder (``os.path.dirname(os.__file__)``, no
sub-packages), sorted by name; every :data:`VAL_EVERY`-th file (the last of each run of ten) goes to the validation
split, the rest to training, so no file is in both. Tokens are the UTF-8 bytes of the text (vocabulary 256, no
tokenizer to download); the files of a split are joined with a blank line between them.

A :class:`TokenBlocks` item is ``(input_ids, labels)``, two int64 ``[seq_len]`` tensors where ``labels`` is
``input_ids`` shifted by one token (next-token prediction), cut from ``seq_len + 1`` consecutive tokens. When fewer
blocks are asked for than the split holds, the blocks are spread evenly over it (the same ones on every run), so a
small run still sees every part of the corpus. Item order and sharding are the job's
(:class:`~pyprune.app.data.loaders.ResumableSampler`).

The corpus differs between Python versions: :func:`corpus_digest` names the exact text a run used.
"""
import hashlib
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

VOCAB_SIZE = 256  # one token per byte value
VAL_EVERY = 10    # file i of the sorted list is a validation file when i % VAL_EVERY == VAL_EVERY - 1
FILE_SEPARATOR = b"\n\n"


def stdlib_folder() -> Path:
    """The standard library's folder of the running interpreter (where ``os.py`` is)."""
    return Path(os.path.dirname(os.path.abspath(os.__file__)))


def corpus_files(folder: Optional[os.PathLike] = None) -> Tuple[List[Path], List[Path]]:
    """``(train_files, val_files)``: the sorted ``*.py`` files directly in ``folder`` (default
    :func:`stdlib_folder`), split by position. Fewer than :data:`VAL_EVERY` files -> ``ValueError``."""
    folder = Path(folder) if folder is not None else stdlib_folder()
    files = sorted(p for p in folder.glob("*.py") if p.is_file())
    if len(files) < VAL_EVERY:
        raise ValueError(f"text corpus: {folder} holds {len(files)} *.py files, at least {VAL_EVERY} are needed")
    val = [p for i, p in enumerate(files) if i % VAL_EVERY == VAL_EVERY - 1]
    train = [p for i, p in enumerate(files) if i % VAL_EVERY != VAL_EVERY - 1]
    return train, val


def encode(text: str) -> Tensor:
    """``str -> uint8 [num_bytes]``: the UTF-8 bytes (every byte one token)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(tokens: Tensor) -> str:
    """Inverse of :func:`encode` (int ``[N]`` in ``[0, 256)``); bytes that are no valid UTF-8 become U+FFFD."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def read_tokens(files: Sequence[os.PathLike]) -> Tensor:
    """The bytes of ``files`` joined by :data:`FILE_SEPARATOR`, as uint8 ``[num_bytes]``."""
    data = FILE_SEPARATOR.join(Path(f).read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def corpus_digest(files: Sequence[os.PathLike]) -> str:
    """sha256 (first 16 hex digits) over the names and bytes of ``files``: equal digests, equal corpus."""
    hasher = hashlib.sha256()
    for path in files:
        hasher.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    return hasher.hexdigest()[:16]


class TokenBlocks(Dataset):
    """``num_blocks`` blocks of ``seq_len + 1`` consecutive tokens of ``tokens`` (uint8 ``[N]``); item ``i`` is
    ``(input_ids, labels)``, int64 ``[seq_len]`` each, ``labels[t] = input_ids[t + 1]`` of the same text.

    ``num_blocks=None``: every non-overlapping block; fewer: evenly spaced start offsets over the whole text.
    More blocks than the text holds, or a text shorter than one block -> ``ValueError``.
    """

    def __init__(self, tokens: Tensor, seq_len: int, num_blocks: Optional[int] = None):
        if tokens.dim() != 1 or tokens.dtype != torch.uint8:
            raise ValueError(f"TokenBlocks: tokens must be uint8 [N], got {tokens.dtype} {list(tokens.shape)}")
        if seq_len < 1:
            raise ValueError(f"TokenBlocks: seq_len must be >= 1, got {seq_len}")
        available = (tokens.numel() - 1) // seq_len
        if available < 1:
            raise ValueError(f"TokenBlocks: {tokens.numel()} tokens are fewer than one block of {seq_len + 1}")
        if num_blocks is None:
            num_blocks = available
        if not 1 <= num_blocks <= available:
            raise ValueError(f"TokenBlocks: asked for {num_blocks} blocks of {seq_len} tokens, the text holds "
                             f"{available}")
        self.tokens, self.seq_len = tokens, seq_len
        last_start = tokens.numel() - seq_len - 1
        # evenly spaced starts; with every block asked for they are exactly 0, seq_len, 2 * seq_len, ...
        self.starts = (torch.arange(num_blocks, dtype=torch.float64) * (last_start / max(1, num_blocks - 1))
                       ).round().long() if num_blocks < available else torch.arange(num_blocks) * seq_len

    def __len__(self) -> int:
        return self.starts.numel()

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        start = int(self.starts[index])
        block = self.tokens[start:start + self.seq_len + 1].long()
        return block[:-1], block[1:]


def stdlib_splits(seq_len: int, num_train: Optional[int], num_val: Optional[int],
                  folder: Optional[os.PathLike] = None) -> Tuple[TokenBlocks, TokenBlocks, dict]:
    """``(train, val, info)``: :class:`TokenBlocks` of the two splits of :func:`corpus_files` (``None`` counts:
    all blocks; counts above what a split holds are capped to it), and ``info`` describing the corpus (folder,
    file and token counts, :func:`corpus_digest`)."""
    train_files, val_files = corpus_files(folder)
    train_tokens, val_tokens = read_tokens(train_files), read_tokens(val_files)

    def blocks(tokens: Tensor, count: Optional[int]) -> TokenBlocks:
        available = (tokens.numel() - 1) // seq_len
        return TokenBlocks(tokens, seq_len, None if count is None else min(count, available))

    train, val = blocks(train_tokens, num_train), blocks(val_tokens, num_val)
    info = {"corpus": str(Path(train_files[0]).parent), "train_files": len(train_files),
            "val_files": len(val_files), "train_tokens": int(train_tokens.numel()),
            "val_tokens": int(val_tokens.numel()), "digest": corpus_digest(train_files + val_files),
            "seq_len": seq_len, "train_blocks": len(train), "val_blocks": len(val)}
    return train, val, info


__all__ = ["VOCAB_SIZE", "VAL_EVERY", "stdlib_folder", "corpus_files", "encode", "decode", "read_tokens",
           "corpus_digest", "TokenBlocks", "stdlib_splits"]
