"""Verification pair sets in the insightface ``.bin`` layout: read, write, decode to tensors.

A ``.bin`` is a pickle of ``(bins, issame)``: ``bins`` a list of 2N encoded images, ``issame``
a list of N booleans; pair k is images (2k, 2k+1). For RGB-D each entry holds both images of
that pair member as one payload, ``RGB JPEG ‖ 16-bit depth PGM/PNG`` (``fastface.data.codec``):
insightface's loader decodes the RGB part of it unchanged, ours splits off the depth.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from fastface.data.codec import DecodeError, decode_depth, decode_rgb, normalize_depth, normalize_rgb, split_rgbd
from fastface.data.errors import DataError


class VerificationFileError(DataError):
    """A ``.bin`` that is not a valid pair set; names the file (and the image when known)."""


def write_bin(path: str, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a pair set (2N encoded images, N booleans) atomically."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs (need exactly 2 per pair)")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".bin", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(([bytes(b) for b in images], [bool(s) for s in issame]), f, protocol=4)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_bin(path: str) -> tuple[list[bytes], list[bool]]:
    """(2N encoded images, N booleans) of a ``.bin`` (also the Python 2 pickles insightface ships)."""
    try:
        with open(path, "rb") as f:
            # insightface's sets were pickled by Python 2: their str are bytes.
            obj = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise VerificationFileError(path, "no such file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise VerificationFileError(path, f"not a pickled pair set ({e})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise VerificationFileError(path, f"expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    bins = [bytes(b) if not isinstance(b, np.ndarray) else b.tobytes() for b in bins]
    issame = [bool(s) for s in issame]
    if len(bins) != 2 * len(issame):
        raise VerificationFileError(path, f"{len(bins)} images for {len(issame)} pairs (need exactly 2 per pair)")
    return bins, issame


def decode_entry(entry: bytes, path: str = "<bin>", index: int = -1) -> tuple[np.ndarray, np.ndarray | None]:
    """(HxWx3 uint8 RGB, HxW uint16 depth or None) of one ``.bin`` entry."""
    try:
        rgb_b, depth_b = split_rgbd(entry)
        return decode_rgb(rgb_b), (decode_depth(depth_b) if depth_b is not None else None)
    except DecodeError as e:
        raise VerificationFileError(path, str(e), f"image {index}") from None


def load_pairs(path: str, channels: str = "auto", image_size: int = 112) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a ``.bin``: (images (2N, C, S, S) float32 normalised, issame (N,) bool).

    ``channels``: ``rgb``, ``depth``, ``rgbd``, or ``auto`` (rgbd when the set has depth).
    RGB is (x - 127.5) / 127.5, depth (v - 32767.5) / 32767.5; channel order R, G, B, D.
    """
    bins, issame = read_bin(path)
    if not bins:
        raise VerificationFileError(path, "empty pair set")
    _, first_depth = decode_entry(bins[0], path, 0)
    if channels == "auto":
        channels = "rgbd" if first_depth is not None else "rgb"
    if channels not in ("rgb", "depth", "rgbd"):
        raise ValueError(f"channels must be rgb, depth, rgbd or auto, got {channels!r}")
    c = {"rgb": 3, "depth": 1, "rgbd": 4}[channels]
    out = np.empty((len(bins), c, image_size, image_size), np.float32)
    for i, b in enumerate(bins):
        rgb, depth = decode_entry(b, path, i)
        if "d" in channels and depth is None:
            raise VerificationFileError(path, f"channels={channels!r} needs depth, but the entry has none", f"image {i}")
        parts = []
        if channels != "depth":
            if rgb.shape[:2] != (image_size, image_size):
                rgb = cv2.resize(rgb, (image_size, image_size), interpolation=cv2.INTER_LINEAR)
            parts.append(normalize_rgb(rgb))
        if "d" in channels:
            if depth.shape != (image_size, image_size):
                depth = cv2.resize(depth, (image_size, image_size), interpolation=cv2.INTER_NEAREST)
            parts.append(normalize_depth(depth))
        out[i] = np.concatenate(parts, 0) if len(parts) > 1 else parts[0]
    return torch.from_numpy(out), torch.tensor(issame, dtype=torch.bool)
