"""Synthetic 3D faces: identities with shape and albedo, rendered to aligned RGB + depth.

An identity is a head surface — a tapered ellipsoid displaced along its normal by smooth,
identity-specific bumps (nose ridge and tip, brow ridge, eye sockets, cheekbones, lips,
chin, forehead, temples) plus a low-frequency random field — and an albedo texture (skin
tone from a shared palette, blotches, eyebrows, eyes, lips, hair line, moles, beard). Each
sample poses it (yaw, pitch, roll), deforms it with an expression (smile, open mouth, brow
raise, squint, random local bumps), lights it (direction, intensity, tint, specular), moves
it (translation, scale), sometimes occludes it, and adds sensor noise; a z-buffer splatting
renderer (vectorised numpy) makes a 112x112 RGB image and the aligned depth map.

Identity lives in both modalities: shape shows in depth and, through shading, in RGB;
albedo only in RGB. Skin tone is drawn from a small palette and re-lit per sample, so no
single colour statistic names an identity.

Difficulty: ``SynthConfig`` holds every knob (pose ranges, expression, lighting, noise,
occlusion rate, translation/scale jitter) and ``difficulty`` scales all nuisances at once;
``id_scale`` spreads identities further apart (easier). Presets: ``demo`` (300 identities x
40, learnable by a small CNN in ~25k samples on a CPU: bench/results/probe_study.md),
``small`` (2,000 x 30), ``full`` (10,000 x 50), ``search`` (60 x 20, easier: search demos),
``tiny`` (tests). Depth is stored as in
``fastface.data.codec`` (16-bit, 0 = no measurement, nearer is brighter), as a PGM by
default (``depth_format``: fast to decode) or a PNG (compact).

Everything is a pure function of (seed, split, identity, sample): training identities
(split 0) and the two verification sets (splits 1 and 2) are different draws, so they are
disjoint by construction.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from fastface.data.codec import DEPTH_FORMATS, DEPTH_SCALE, DEPTH_ZERO, encode_depth, encode_rgb
from fastface.data.recordio import FaceRecordWriter, write_property
from fastface.data.verification import write_bin

GENERATOR_VERSION = 2
IMAGE_SIZE = 112
SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST = 0, 1, 2

# Parameter grid over the front and sides of the head: theta around the vertical axis,
# phi up/down. 200x180 points give >= 1 point per pixel on a frontal face at scale 62.
_NT, _NP = 200, 180
_THETA = np.linspace(-1.75, 1.75, _NT, dtype=np.float32)
_PHI = np.linspace(-1.2, 1.25, _NP, dtype=np.float32)
_TH, _PH = np.meshgrid(_THETA, _PHI)
_ABS_TH = np.abs(_TH)
# A feature coordinate that keeps growing past the ear (sin would fold back onto the face).
_U = np.where(_ABS_TH <= np.pi / 2, np.sin(_TH), np.sign(_TH) * (1.0 + _ABS_TH - np.pi / 2)).astype(np.float32)
X0 = (_U * np.cos(_PH)).astype(np.float32)  # frontal "image" coordinates of the surface
Y0 = np.sin(_PH).astype(np.float32)


@dataclass
class SynthConfig:
    """What to generate and how hard it is; ``difficulty`` scales every nuisance at once."""

    n_ids: int = 300
    samples_per_id: int = 40
    val_ids: int = 100
    val_pairs: int = 600
    test_ids: int = 100
    test_pairs: int = 600
    seed: int = 0
    difficulty: float = 1.0
    yaw_deg: float = 35.0
    pitch_deg: float = 15.0
    roll_deg: float = 10.0
    expression: float = 1.0
    lighting: float = 1.15
    noise: float = 1.0
    occlusion_p: float = 0.1
    shift_px: float = 5.0  # translation jitter of the face centre, pixels at 112
    scale_jitter: float = 0.08  # relative
    id_scale: float = 1.5  # spread of identity shape/albedo variation (larger = easier)
    jpeg_quality: int = 92
    depth_format: str = "pgm"  # pgm: ~1.5x the bytes of png, decodes 8-20x faster (fastface.data.codec)

    def __post_init__(self) -> None:
        if self.depth_format not in DEPTH_FORMATS:
            raise ValueError(f"depth_format must be one of {DEPTH_FORMATS}, got {self.depth_format!r}")

    def to_dict(self) -> dict:
        """A plain dict (for manifests)."""
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # Learnable by a MobileNetV2-sized net in a few CPU minutes; see bench/results/probe_study.md.
    "demo": dict(n_ids=300, samples_per_id=40, val_ids=100, val_pairs=600, test_ids=100, test_pairs=600),
    "small": dict(n_ids=2000, samples_per_id=30, val_ids=300, val_pairs=3000, test_ids=300, test_pairs=3000),
    "full": dict(n_ids=10000, samples_per_id=50, val_ids=1000, val_pairs=6000, test_ids=1000, test_pairs=6000),
    # For search demos: easier (nuisances at 0.4, identities spread 2.5x) and small, so that
    # candidates trained for ~100 steps on a CPU separate well above chance (bench/test_bench_search.py).
    "search": dict(n_ids=60, samples_per_id=20, val_ids=30, val_pairs=300, test_ids=30, test_pairs=300,
                   difficulty=0.4, id_scale=2.5),
    # For tests: seconds to make.
    "tiny": dict(n_ids=8, samples_per_id=6, val_ids=6, val_pairs=20, test_ids=6, test_pairs=20),
}


def preset(name: str, **overrides: object) -> SynthConfig:
    """The named preset (demo, small, full, search, tiny) with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown synth preset {name!r}; choose from {sorted(PRESETS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SynthConfig)}
    if unknown:
        raise ValueError(f"unknown SynthConfig fields: {sorted(unknown)}")
    return SynthConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([GENERATOR_VERSION, *[int(k) for k in key]])


def _gauss(cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((X0 - cx) / sx) ** 2 + ((Y0 - cy) / sy) ** 2)).astype(np.float32)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3 - 2 * t)


# Skin tones (linear-ish RGB albedo); identities share them, so tone alone is weak evidence.
_SKIN = np.array([[0.93, 0.76, 0.65], [0.86, 0.64, 0.52], [0.74, 0.53, 0.40], [0.58, 0.40, 0.29],
                  [0.42, 0.28, 0.20], [0.90, 0.70, 0.58]], np.float32)
_HAIR = np.array([[0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.45, 0.30, 0.16], [0.75, 0.62, 0.40],
                  [0.55, 0.22, 0.10], [0.55, 0.55, 0.55]], np.float32)
_IRIS = np.array([[0.25, 0.14, 0.07], [0.30, 0.42, 0.55], [0.30, 0.40, 0.22], [0.12, 0.08, 0.05]], np.float32)


@dataclass
class FaceIdentity:
    """One synthetic person: base surface, displacement, albedo and feature positions."""

    key: tuple[int, int, int]
    base: np.ndarray  # (3, NP, NT) undisplaced surface points, one plane per coordinate
    normal0: np.ndarray  # (3, NP, NT) normals of the undisplaced surface
    disp: np.ndarray  # (NP, NT) identity displacement along normal0
    albedo: np.ndarray  # (NP*NT, 3)
    expr_basis: np.ndarray  # (4, NP, NT): smile, smile (mouth corners), brow raise, squint
    jaw: np.ndarray  # (NP, NT) weight of the jaw drop (1 below the mouth)
    eye_x: float
    eye_y: float
    mouth_y: float
    brow_y: float
    params: np.ndarray = field(repr=False)  # every draw, for checking identities differ


def make_identity(seed: int, split: int, index: int, cfg: SynthConfig | None = None) -> FaceIdentity:
    """The identity ``index`` of ``split`` under ``seed`` (pure function of its arguments)."""
    cfg = cfg or SynthConfig()
    r = _rng(seed, split, index, 0)
    k = float(cfg.id_scale)
    draws: list[float] = []

    def n(mean: float, sd: float) -> float:
        v = float(mean + k * sd * r.standard_normal())
        draws.append(v)
        return v

    def pick(m: int) -> int:
        v = int(r.integers(m))
        draws.append(v)
        return v

    a, b, c = n(0.80, 0.045), n(1.02, 0.05), n(0.88, 0.06)
    taper = float(np.clip(n(0.28, 0.08), 0.05, 0.5))
    eye_x, eye_y = n(0.33, 0.025), n(0.22, 0.025)
    mouth_y, brow_y = n(-0.40, 0.03), eye_y + n(0.16, 0.02)
    nose_len, nose_w = n(0.30, 0.04), n(0.075, 0.015)

    # Base: ellipsoid narrowing towards the chin.
    sx = a * (1.0 - taper * _smoothstep(-Y0 / 0.9) ** 1.5)
    base = np.stack([sx * np.sin(_TH) * np.cos(_PH), b * np.sin(_PH), c * np.cos(_TH) * np.cos(_PH)], 0).astype(np.float32)
    normal0 = base / np.stack([sx**2, np.full_like(sx, b * b), np.full_like(sx, c * c)], 0)
    normal0 /= np.linalg.norm(normal0, axis=0, keepdims=True)

    d = np.zeros((_NP, _NT), np.float32)
    nose_top, nose_tip_y = eye_y - 0.02, eye_y - nose_len
    ridge = np.exp(-0.5 * (X0 / nose_w) ** 2) * _smoothstep((Y0 - nose_tip_y) / 0.12) * _smoothstep((nose_top + 0.12 - Y0) / 0.15)
    d += n(0.20, 0.05) * ridge * (0.55 + 0.45 * np.clip((nose_top - Y0) / max(nose_len, 0.1), 0, 1))
    d += n(0.10, 0.03) * _gauss(0, nose_tip_y + 0.03, nose_w * 1.1, 0.06)
    ala = n(0.045, 0.015)
    nw = n(0.11, 0.02)
    d += ala * (_gauss(-nw, nose_tip_y + 0.02, 0.045, 0.04) + _gauss(nw, nose_tip_y + 0.02, 0.045, 0.04))
    brow = n(0.05, 0.025)
    d += brow * (_gauss(-eye_x, brow_y, 0.16, 0.05) + _gauss(eye_x, brow_y, 0.16, 0.05))
    sock_w = n(0.10, 0.015)
    d -= n(0.09, 0.03) * (_gauss(-eye_x, eye_y, sock_w, sock_w * 0.8) + _gauss(eye_x, eye_y, sock_w, sock_w * 0.8))
    d += 0.035 * (_gauss(-eye_x, eye_y, 0.05, 0.035) + _gauss(eye_x, eye_y, 0.05, 0.035))  # eyeballs
    cb_x, cb_y = n(0.47, 0.04), n(0.0, 0.05)
    d += n(0.05, 0.03) * (_gauss(-cb_x, cb_y, 0.13, 0.10) + _gauss(cb_x, cb_y, 0.13, 0.10))
    d += n(0.0, 0.035) * (_gauss(-0.35, mouth_y + 0.07, 0.14, 0.12) + _gauss(0.35, mouth_y + 0.07, 0.14, 0.12))
    lip = n(0.035, 0.012)
    lip_w = n(0.17, 0.025)
    d += lip * (_gauss(0, mouth_y + 0.035, lip_w, 0.03) + 1.1 * _gauss(0, mouth_y - 0.04, lip_w * 0.9, 0.035))
    d += n(0.06, 0.035) * _gauss(0, mouth_y - 0.3, 0.12, 0.09)  # chin
    d += n(0.0, 0.04) * _gauss(0, 0.72, 0.35, 0.2)  # forehead slope
    d -= n(0.03, 0.015) * (_gauss(-0.62, brow_y + 0.05, 0.1, 0.12) + _gauss(0.62, brow_y + 0.05, 0.1, 0.12))
    # A low-frequency random field, mostly symmetric, for what the named parts do not cover.
    for _ in range(10):
        fx, fy, ph = r.uniform(1.0, 4.0), r.uniform(1.0, 4.0), r.uniform(0, 2 * math.pi)
        amp = n(0.0, 0.012)
        asym = r.uniform(0, 0.3)
        draws += [fx, fy, ph, asym]
        d += amp * (np.cos(fx * X0) + asym * np.sin(fx * X0)) * np.cos(fy * Y0 + ph)
    # Keep the displacement on the face: fade it out towards the back of the head.
    d *= _smoothstep((1.25 - np.abs(X0)) / 0.3)

    # Albedo.
    # Tones pulled halfway to the palette mean: skin colour is a weak cue, not a name tag.
    skin = (0.5 * _SKIN[pick(len(_SKIN))] + 0.5 * _SKIN.mean(0)) * (1 + k * 0.04 * r.standard_normal(3)).astype(np.float32)
    alb = np.broadcast_to(skin, (_NP, _NT, 3)).astype(np.float32).copy()
    # Blotches at several scales: a local texture a CNN can key on, misaligned for a pixel probe.
    for _ in range(8):
        fx, fy, ph = r.uniform(2, 9), r.uniform(2, 9), r.uniform(0, 2 * math.pi)
        col = k * 0.03 * r.standard_normal(3).astype(np.float32)
        draws += [fx, fy, ph, *col.tolist()]
        alb += np.cos(fx * X0 + ph)[..., None] * np.cos(fy * Y0)[..., None] * col
    hair = _HAIR[pick(len(_HAIR))]
    hair_line = n(0.80, 0.05)
    hair_curve = n(0.25, 0.12)
    hair_mask = _smoothstep((Y0 - (hair_line + hair_curve * X0**2)) / 0.05)
    side = _smoothstep((np.abs(X0) - n(0.93, 0.04)) / 0.06) * _smoothstep((Y0 + 0.05) / 0.2)
    hair_mask = np.maximum(hair_mask, side)
    # Eyebrows: an arch above each eye.
    bw, bt, barch, bdark = n(0.14, 0.03), max(0.01, n(0.024, 0.01)), n(0.04, 0.025), float(np.clip(n(0.7, 0.2), 0.2, 1.0))
    ex = np.abs(X0) - eye_x
    brow_curve = brow_y + barch * (1 - (ex / bw) ** 2)
    brow_mask = np.exp(-0.5 * ((Y0 - brow_curve) / bt) ** 2) * _smoothstep((bw - np.abs(ex)) / 0.03) * bdark
    # Eyes: sclera, iris, dark lash line.
    iris = _IRIS[pick(len(_IRIS))]
    eye_d2 = (ex / 0.07) ** 2 + ((Y0 - eye_y) / 0.028) ** 2
    eye_mask = _smoothstep((1.0 - eye_d2) / 0.3)
    iris_mask = _smoothstep((1.0 - ((ex / 0.026) ** 2 + ((Y0 - eye_y) / 0.026) ** 2)) / 0.3)
    lips_col = skin * np.array([0.95, 0.55, 0.55], np.float32) * (1 + k * 0.08 * r.standard_normal(3)).astype(np.float32)
    lip_mask = np.maximum(_gauss(0, mouth_y + 0.03, lip_w * 0.85, 0.022), _gauss(0, mouth_y - 0.035, lip_w * 0.8, 0.026))
    lip_mask = _smoothstep((lip_mask - 0.3) / 0.4)
    alb = alb * (1 - hair_mask[..., None]) + hair * hair_mask[..., None]
    alb = alb * (1 - brow_mask[..., None]) + hair * 0.8 * brow_mask[..., None]
    alb = alb * (1 - lip_mask[..., None]) + lips_col * lip_mask[..., None]
    alb = alb * (1 - eye_mask[..., None]) + np.float32(0.85) * eye_mask[..., None]
    alb = alb * (1 - iris_mask[..., None]) + iris * iris_mask[..., None]
    n_moles = pick(6)
    for _ in range(n_moles):
        mx, my, ms, mdark = r.uniform(-0.6, 0.6), r.uniform(-0.7, 0.5), r.uniform(0.015, 0.04), r.uniform(0.3, 0.7)
        draws += [mx, my, ms, mdark]
        alb *= (1 - mdark * _gauss(mx, my, ms, ms))[..., None]
    if r.random() < 0.3:
        beard = float(r.uniform(0.2, 0.7))
        draws.append(beard)
        bm = _smoothstep((mouth_y + 0.05 - Y0) / 0.12) * _smoothstep((0.75 - np.abs(X0)) / 0.2) * (1 - lip_mask)
        alb = alb * (1 - beard * bm[..., None]) + hair * beard * bm[..., None]
    alb = np.clip(alb, 0.02, 1.0).astype(np.float32).reshape(-1, 3)
    my, by = mouth_y, brow_y
    expr = np.stack([
        _gauss(-0.3, my + 0.12, 0.1, 0.08) + _gauss(0.3, my + 0.12, 0.1, 0.08),
        _gauss(-0.2, my, 0.05, 0.04) + _gauss(0.2, my, 0.05, 0.04),
        _gauss(-eye_x, by + 0.04, 0.15, 0.06) + _gauss(eye_x, by + 0.04, 0.15, 0.06),
        _gauss(-eye_x, eye_y - 0.05, 0.07, 0.03) + _gauss(eye_x, eye_y - 0.05, 0.07, 0.03),
    ]).astype(np.float32)
    jaw = _smoothstep((my - Y0) / 0.12).astype(np.float32)
    return FaceIdentity((seed, split, index), base, normal0.astype(np.float32), d.astype(np.float32), alb, expr, jaw,
                        eye_x, eye_y, mouth_y, brow_y, np.asarray(draws, np.float64))


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch), math.cos(roll), math.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return (rz @ rx @ ry).astype(np.float32)


def _background(r: np.random.Generator, size: int) -> np.ndarray:
    # A colour gradient plus soft blobs, made at 8x8 and upsampled (cheap, and smooth).
    c0, c1 = r.uniform(0.05, 0.95, 3), r.uniform(0.05, 0.95, 3)
    ang = r.uniform(0, 2 * math.pi)
    t = np.linspace(-1, 1, 8)
    g = (math.cos(ang) * t[None, :] + math.sin(ang) * t[:, None]) * 0.5 + 0.5
    small = c0 * (1 - g[..., None]) + c1 * g[..., None] + 0.08 * r.standard_normal((8, 8, 1))
    img = cv2.resize(small.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(img, 0, 1)


_NOISE_BANK: np.ndarray | None = None


def _noise(r: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit Gaussian noise of ``shape``: a random window of a fixed bank (4x cheaper than drawing)."""
    global _NOISE_BANK
    if _NOISE_BANK is None:
        _NOISE_BANK = np.random.default_rng(12345).standard_normal((4, 256, 256, 3), dtype=np.float32)
    k = int(r.integers(4))
    y, x = (int(v) for v in r.integers(0, 256 - max(shape[0], shape[1]), 2))
    win = _NOISE_BANK[k, y : y + shape[0], x : x + shape[1]]
    return win if len(shape) == 3 else win[..., int(r.integers(3))]


def _normals(pts: np.ndarray) -> np.ndarray:
    """Unit normals (3, NP, NT) of a gridded surface (3, NP, NT), by central differences."""
    du = np.empty_like(pts)
    dv = np.empty_like(pts)
    du[:, :, 1:-1] = pts[:, :, 2:] - pts[:, :, :-2]
    du[:, :, 0] = pts[:, :, 1] - pts[:, :, 0]
    du[:, :, -1] = pts[:, :, -1] - pts[:, :, -2]
    dv[:, 1:-1] = pts[:, 2:] - pts[:, :-2]
    dv[:, 0] = pts[:, 1] - pts[:, 0]
    dv[:, -1] = pts[:, -1] - pts[:, -2]
    n = np.stack([du[1] * dv[2] - du[2] * dv[1], du[2] * dv[0] - du[0] * dv[2], du[0] * dv[1] - du[1] * dv[0]])
    n /= np.sqrt(n[0] * n[0] + n[1] * n[1] + n[2] * n[2]) + np.float32(1e-12)
    return n


def render(ident: FaceIdentity, sample: int, cfg: SynthConfig | None = None, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``sample`` of an identity: (HxWx3 uint8 RGB, HxW uint16 depth)."""
    cfg = cfg or SynthConfig()
    seed, split, index = ident.key
    r = _rng(seed, split, index, 1 + sample)
    dif = float(cfg.difficulty)
    ex = cfg.expression * dif

    # Expression: displacement along the normal plus a jaw drop.
    smile, mouth_open, brow_up, squint = (ex * v for v in (r.uniform(-0.3, 1.0), max(0.0, r.uniform(-0.6, 1.0)), r.uniform(-0.5, 1.0), r.uniform(0, 1.0)))
    my, eyx, eyy = ident.mouth_y, ident.eye_x, ident.eye_y
    w = np.array([0.035 * smile, -0.02 * smile, 0.03 * brow_up, -0.02 * squint], np.float32)
    d = ident.disp + np.tensordot(w, ident.expr_basis, 1)
    for _ in range(2):
        d += np.float32(ex * 0.02 * r.standard_normal()) * _gauss(r.uniform(-0.5, 0.5), r.uniform(-0.7, 0.5), 0.1, 0.1)
    pts = ident.base + d * ident.normal0
    if mouth_open > 0:
        drop = np.float32(0.10 * mouth_open) * ident.jaw
        pts[1] -= drop
        pts[2] -= 0.3 * drop
    nrm = _normals(pts)

    yaw = math.radians(cfg.yaw_deg * dif) * r.uniform(-1, 1)
    pitch = math.radians(cfg.pitch_deg * dif) * r.uniform(-1, 1)
    roll = math.radians(cfg.roll_deg * dif) * r.uniform(-1, 1)
    rot = _rotation(yaw, pitch, roll)
    px = (rot[0, 0] * pts[0] + rot[0, 1] * pts[1] + rot[0, 2] * pts[2]).reshape(-1)
    py = (rot[1, 0] * pts[0] + rot[1, 1] * pts[1] + rot[1, 2] * pts[2]).reshape(-1)
    pz = (rot[2, 0] * pts[0] + rot[2, 1] * pts[1] + rot[2, 2] * pts[2]).reshape(-1)
    nzz = (rot[2, 0] * nrm[0] + rot[2, 1] * nrm[1] + rot[2, 2] * nrm[2]).reshape(-1)
    scale = size / 112 * 68.0 * (1 + cfg.scale_jitter * dif * r.uniform(-1, 1))
    cx = size / 2 + size / 112 * cfg.shift_px * dif * r.uniform(-1, 1)
    cy = size / 2 + 0.12 * size + size / 112 * cfg.shift_px * dif * r.uniform(-1, 1)

    ix = np.rint(cx + scale * px).astype(np.int32)
    iy = np.rint(cy - scale * py).astype(np.int32)
    ok = (nzz > 0) & (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
    sel = np.flatnonzero(ok)
    pix = iy[sel] * size + ix[sel]
    z = pz[sel]
    zbuf = np.full(size * size, -np.inf, np.float32)
    np.maximum.at(zbuf, pix, z)
    win = z >= zbuf[pix]
    owner = np.full(size * size, -1, np.int64)
    owner[pix[win]] = sel[win]

    # Shade only the visible points.
    filled = owner >= 0
    vis = owner[filled]
    alb = ident.albedo[vis]
    if mouth_open > 0:
        xv, yv = X0.reshape(-1)[vis], Y0.reshape(-1)[vis]
        cavity = _smoothstep(1 - np.abs(yv - (my - 0.01 - 0.05 * mouth_open)) / (0.012 + 0.05 * mouth_open)) * _smoothstep((0.11 - np.abs(xv)) / 0.04)
        alb = alb * (1 - 0.85 * cavity[:, None])
    lit = cfg.lighting * dif
    el = math.radians(r.uniform(-35, 45) * min(1.0, lit))
    az = math.radians(r.uniform(-65, 65) * min(1.0, lit))
    light = np.array([math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)], np.float32)
    kd = r.uniform(0.55, 0.95)
    amb = r.uniform(0.15, 0.45)
    tint = (1 + 0.06 * lit * r.standard_normal(3)).astype(np.float32)
    expo = r.uniform(1 - 0.25 * lit, 1 + 0.2 * lit)
    nv = nrm.reshape(3, -1)[:, vis].T @ rot.T
    ndl = np.clip(nv @ light, 0, None)
    half = light + np.array([0, 0, 1], np.float32)
    half /= np.linalg.norm(half)
    spec = r.uniform(0.0, 0.25) * np.clip(nv @ half, 0, None) ** 20
    col = (alb * (amb + kd * ndl)[:, None] + spec[:, None]) * tint * expo

    img = _background(r, size).reshape(-1, 3)
    img[filled] = col
    depth = np.zeros(size * size, np.float32)
    depth[filled] = pz[vis]
    img = img.reshape(size, size, 3)
    depth = depth.reshape(size, size)
    mask = filled.reshape(size, size).astype(np.float32)

    # Fill one-pixel splatting holes from their filled neighbours.
    cnt = cv2.boxFilter(mask, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
    hole = (mask == 0) & (cnt >= 5)
    if hole.any():
        sc = cv2.boxFilter(img * mask[..., None], -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        sd = cv2.boxFilter(depth * mask, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        img[hole] = sc[hole] / cnt[hole, None]
        depth[hole] = sd[hole] / cnt[hole]
        mask[hole] = 1

    # Occlusion: something in front of the face (glasses band, hand, scarf, random box).
    if r.random() < cfg.occlusion_p * dif:
        occ = np.zeros((size, size), bool)
        kind = r.integers(3)
        yy, xx = np.mgrid[0:size, 0:size]
        if kind == 0:  # dark glasses at eye level
            ey = cy - scale * eyy
            occ = np.abs(yy - ey) < r.uniform(5, 9)
            occ &= np.abs(xx - cx) < scale * (eyx + 0.12)
            occ_col = r.uniform(0.0, 0.2, 3)
        elif kind == 1:  # lower face (hand or scarf)
            occ = yy > cy - scale * (my + r.uniform(-0.1, 0.15))
            occ_col = r.uniform(0.1, 0.9, 3)
        else:
            x0, y0 = r.integers(0, size - 30, 2)
            w, h = r.integers(20, 45, 2)
            occ = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            occ_col = r.uniform(0.0, 1.0, 3)
        img[occ] = occ_col * (0.8 + 0.2 * r.random())
        depth[occ] = float(pz.max()) + r.uniform(0.05, 0.3)
        mask[occ] = 1

    # Sensor: blur, noise, depth noise, quantisation and holes.
    nl = cfg.noise * dif
    if r.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), r.uniform(0.3, 0.3 + 0.6 * nl))
    img = img + np.float32(r.uniform(0.003, 0.02 * nl)) * _noise(r, (size, size, 3))
    rgb = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    depth = depth + mask * np.float32(0.004 + 0.008 * nl * r.random()) * _noise(r, (size, size))
    if r.random() < 0.5 * nl:  # dropouts, as structured-light sensors have
        holes = cv2.resize(r.random((14, 14)).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR) < 0.04 * nl
        mask[holes] = 0
    dq = np.clip(np.rint(DEPTH_ZERO + depth * DEPTH_SCALE), 1, 65535).astype(np.uint16)
    dq[mask == 0] = 0
    return rgb, dq


def render_key(seed: int, split: int, index: int, sample: int, cfg: SynthConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one sample from its key (builds the identity; use ``render`` to reuse one)."""
    return render(make_identity(seed, split, index, cfg), sample, cfg)


# ---------------------------------------------------------------------------------------
# Writing a data set: train.rec/.idx (+ folder), val.bin, test.bin, a manifest for caching.

MANIFEST = "manifest.json"


@dataclass
class SynthResult:
    """What ``generate`` produced (or found already there)."""

    out_dir: str
    reused: bool
    files: dict[str, int]
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        """Images rendered per second (0 when the set was reused)."""
        return self.images / self.seconds if self.seconds > 0 and not self.reused else 0.0


def _encode(rgb: np.ndarray, depth: np.ndarray, quality: int, depth_format: str) -> tuple[bytes, bytes]:
    # PNG compression 1: depth maps compress nearly as well and encode several times faster.
    return encode_rgb(rgb, quality), encode_depth(depth, compression=1, fmt=depth_format)


def _render_job(job: tuple[SynthConfig, int, int, list[int]]) -> list[tuple[bytes, bytes]]:
    cfg, split, index, samples = job
    ident = make_identity(cfg.seed, split, index, cfg)
    return [_encode(*render(ident, s, cfg), cfg.jpeg_quality, cfg.depth_format) for s in samples]


def _worker_init() -> None:
    cv2.setNumThreads(1)


def pair_plan(cfg: SynthConfig, split: int) -> tuple[list[tuple[int, int]], list[bool]]:
    """The (identity, sample) of each of the 2N images of a verification split, and issame."""
    n_ids, n_pairs = (cfg.val_ids, cfg.val_pairs) if split == SPLIT_VAL else (cfg.test_ids, cfg.test_pairs)
    if n_ids < 2:
        raise ValueError(f"a verification split needs at least 2 identities, got {n_ids}")
    r = _rng(cfg.seed, 100 + split)
    same = np.zeros(n_pairs, bool)
    same[: n_pairs // 2] = True
    r.shuffle(same)
    images: list[tuple[int, int]] = []
    for k, s in enumerate(same):
        a = int(r.integers(n_ids))
        b = a if s else int((a + 1 + r.integers(n_ids - 1)) % n_ids)
        # Every image is its own sample: pairs never share a rendering.
        images += [(a, 2 * k), (b, 2 * k + 1)]
    return images, same.tolist()


def _manifest_key(cfg: SynthConfig, folder: bool) -> dict:
    return {"generator": "fastface.data.synth", "generator_version": GENERATOR_VERSION, "config": cfg.to_dict(), "folder": bool(folder)}


def cached(out_dir: str, cfg: SynthConfig, folder: bool = False) -> dict | None:
    """The manifest of ``out_dir`` if it holds exactly this set (same generator, args, seed)."""
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path) as f:
            man = json.load(f)
    except (OSError, ValueError):
        return None
    if {k: man.get(k) for k in ("generator", "generator_version", "config", "folder")} != _manifest_key(cfg, folder):
        return None
    for name, size in man.get("files", {}).items():
        p = os.path.join(out_dir, name)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return None
    return man


def generate(cfg: SynthConfig, out_dir: str, workers: int = 2, folder: bool = False, force: bool = False, progress: bool = True) -> SynthResult:
    """Write the set described by ``cfg`` to ``out_dir``, or reuse it if it is already there.

    Files: ``train.rec``/``train.idx``/``property`` (RGB-D records), ``val.bin`` and
    ``test.bin`` (pairs of identities disjoint from training and from each other),
    ``val_pairs.json``/``test_pairs.json`` (identity and sample of each image), optionally
    ``train/<identity>/<sample>.jpg`` + ``_depth.pgm`` (or ``.png``, per ``depth_format``),
    and ``manifest.json`` written last.
    Output is byte-identical for any ``workers``.
    """
    os.makedirs(out_dir, exist_ok=True)
    if not force:
        man = cached(out_dir, cfg, folder)
        if man is not None:
            return SynthResult(out_dir, True, man["files"], 0, 0.0)
    if cfg.n_ids < 1 or cfg.samples_per_id < 1:
        raise ValueError("need at least one identity and one sample per identity")

    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=".tmp-synth-", dir=out_dir)
    val_plan = pair_plan(cfg, SPLIT_VAL)
    test_plan = pair_plan(cfg, SPLIT_TEST)
    jobs: list[tuple[SynthConfig, int, int, list[int]]] = [(cfg, SPLIT_TRAIN, i, list(range(cfg.samples_per_id))) for i in range(cfg.n_ids)]
    for split, (imgs, _) in ((SPLIT_VAL, val_plan), (SPLIT_TEST, test_plan)):
        by_id: dict[int, list[int]] = {}
        for ident, sample in imgs:
            by_id.setdefault(ident, []).append(sample)
        jobs += [(cfg, split, i, sorted(s)) for i, s in sorted(by_id.items())]
    total = cfg.n_ids * cfg.samples_per_id + len(val_plan[0]) + len(test_plan[0])

    ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
    pool = ctx.Pool(workers, initializer=_worker_init) if workers > 1 else None
    results = pool.imap(_render_job, jobs, chunksize=1) if pool else map(_render_job, jobs)
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn(), transient=True)
        bar.start()
        task = bar.add_task("render", total=total, rate="-")
    done = 0
    try:
        rec = FaceRecordWriter(os.path.join(tmp, "train.rec"), cfg.n_ids * cfg.samples_per_id, cfg.n_ids)
        rendered: dict[tuple[int, int, int], tuple[bytes, bytes]] = {}
        for job, out in zip(jobs, results):
            _, split, ident, samples = job
            if split == SPLIT_TRAIN:
                for s, (jpg, png) in zip(samples, out):
                    rec.add(ident, jpg, png)
                    if folder:
                        d = os.path.join(tmp, "train", f"{ident:06d}")
                        os.makedirs(d, exist_ok=True)
                        with open(os.path.join(d, f"{s:04d}.jpg"), "wb") as f:
                            f.write(jpg)
                        with open(os.path.join(d, f"{s:04d}_depth.{cfg.depth_format}"), "wb") as f:
                            f.write(png)
            else:
                for s, enc in zip(samples, out):
                    rendered[(split, ident, s)] = enc
            done += len(samples)
            if bar:
                bar.update(task, completed=done, rate=f"{done / (time.perf_counter() - t0):.0f}")
        rec.close()
        write_property(os.path.join(tmp, "property"), cfg.n_ids)
        for split, name, (imgs, same) in ((SPLIT_VAL, "val", val_plan), (SPLIT_TEST, "test", test_plan)):
            write_bin(os.path.join(tmp, f"{name}.bin"), [b"".join(rendered[(split, i, s)]) for i, s in imgs], same)
            with open(os.path.join(tmp, f"{name}_pairs.json"), "w") as f:
                json.dump({"split": split, "images": imgs, "issame": same}, f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar:
            bar.stop()
        if pool:
            pool.terminate()
            pool.join()
    seconds = time.perf_counter() - t0

    # Publish: the old manifest goes first (a crash now leaves no stale "complete" set), then
    # each file is renamed into place and the new manifest is written last.
    man_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(man_path):
        os.unlink(man_path)
    files: dict[str, int] = {}
    for name in sorted(os.listdir(tmp)):
        src, dst = os.path.join(tmp, name), os.path.join(out_dir, name)
        if os.path.isdir(src):
            if os.path.exists(dst):
                shutil.rmtree(dst)
            for root, _, fs in os.walk(src):
                for fn in fs:
                    p = os.path.join(root, fn)
                    files[os.path.relpath(p, tmp)] = os.path.getsize(p)
        else:
            files[name] = os.path.getsize(src)
        os.replace(src, dst)
    if folder is False and os.path.isdir(os.path.join(out_dir, "train")):
        shutil.rmtree(os.path.join(out_dir, "train"))
    os.rmdir(tmp)
    man = {**_manifest_key(cfg, folder), "files": files, "images": total, "seconds": round(seconds, 2),
           "images_per_second": round(total / seconds, 1), "workers": workers}
    fd, mtmp = tempfile.mkstemp(prefix=".tmp-", dir=out_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(man, f, indent=1)
    os.chmod(mtmp, 0o644)
    os.replace(mtmp, man_path)
    return SynthResult(out_dir, False, files, total, seconds)
