"""Image codecs of fastface data sets: RGB JPEG, 16-bit depth (PNG or PGM), and the RGB-D payload.

An RGB-D sample travels as one byte string: the RGB JPEG (or PNG) followed directly by the
depth map (``JPEG ‖ depth``), where the depth map is a 16-bit grayscale image in one of two
standard formats:

- ``pgm`` (the default of ``fastface data synth``): binary PGM, ``P5`` with maxval 65535,
  big-endian samples. Uncompressed: about 1.5x the bytes of the PNG, but it decodes 8-20x
  faster (OpenCV ~7 µs, DALI ~30 µs per 112x112 map instead of ~190-250 µs), and depth
  decoding is otherwise the largest single cost of a CPU data pipeline. A set's PGMs share
  one header, so the dali backend's CPU pipeline skips decoding: it byte-swaps the samples
  behind the header into uint16 maps (``RecordSource.pgm_layout``).
- ``png``: 16-bit grayscale PNG, the compact choice (and what image folders and older sets
  hold).

Readers accept either, per sample, with no flag: both decoders (OpenCV and DALI's) sniff
the format. JPEG decoders stop at the end-of-image marker, so tools that know nothing of
depth (insightface, mxnet, DALI) still decode the RGB part; ``split_rgbd`` finds the
boundary by walking the JPEG marker segments, never by guessing.

Depth values (uint16): 0 means "no measurement" (background, sensor hole); a measured point
stores ``32768 + z * DEPTH_SCALE`` with z the distance towards the camera from the head
centre in face units (nearer is brighter). Loaders normalise depth like RGB, by the type's
range: ``(v - 32767.5) / 32767.5``, so a hole is -1.0 and the head centre about 0.
"""
from __future__ import annotations

import cv2
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND\xaeB`\x82"  # the last 8 bytes of every complete PNG
PGM_MAGIC = b"P5"
JPEG_SOI = b"\xff\xd8"
DEPTH_FORMATS = ("pgm", "png")
# One face unit is about 9.6 cm (a synthetic head is about 1.6 units wide): 1 step ~ 4.8 µm,
# and a face (|z| < 1.6 units) uses most of the 16-bit range.
DEPTH_SCALE = 20000.0
DEPTH_ZERO = 32768


class DecodeError(ValueError):
    """An image payload that cannot be decoded."""


def encode_rgb(rgb: np.ndarray, quality: int = 95) -> bytes:
    """Encode an HxWx3 uint8 RGB image as JPEG."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_rgb wants an HxWx3 uint8 array, got {rgb.dtype} {rgb.shape}")
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise DecodeError("OpenCV could not encode the image as JPEG")
    return buf.tobytes()


def encode_png(img: np.ndarray, compression: int = 3) -> bytes:
    """Encode an HxW (gray, uint8/uint16) or HxWx3 (RGB uint8) image as lossless PNG."""
    if img.ndim == 3:
        img = np.ascontiguousarray(img[:, :, ::-1])
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise DecodeError("OpenCV could not encode the image as PNG")
    return buf.tobytes()


def encode_pgm(depth: np.ndarray) -> bytes:
    """Encode an HxW uint16 map as a binary PGM (P5, maxval 65535, big-endian samples)."""
    if depth.dtype != np.uint16 or depth.ndim != 2:
        raise ValueError(f"encode_pgm wants an HxW uint16 array, got {depth.dtype} {depth.shape}")
    h, w = depth.shape
    return b"P5\n%d %d\n65535\n" % (w, h) + depth.astype(">u2").tobytes()


def encode_depth(depth: np.ndarray, compression: int = 3, fmt: str = "png") -> bytes:
    """Encode an HxW uint16 depth map as a 16-bit PNG (``compression`` 0-9) or PGM (``fmt``)."""
    if depth.dtype != np.uint16 or depth.ndim != 2:
        raise ValueError(f"encode_depth wants an HxW uint16 array, got {depth.dtype} {depth.shape}")
    if fmt == "pgm":
        return encode_pgm(depth)
    if fmt != "png":
        raise ValueError(f"depth format must be one of {DEPTH_FORMATS}, got {fmt!r}")
    return encode_png(depth, compression)


def pgm_header(buf: bytes | memoryview) -> tuple[int, int, int, int]:
    """(width, height, maxval, offset of the samples) of a binary PGM; DecodeError if malformed."""
    head = bytes(buf[:512])
    if head[:2] != PGM_MAGIC:
        raise DecodeError("not a binary PGM (no P5 magic)")
    i, vals = 2, []
    while len(vals) < 3:
        # Netpbm: fields separated by whitespace, '#' comments to the end of the line.
        while i < len(head) and head[i : i + 1] in b" \t\r\n#":
            if head[i : i + 1] == b"#":
                j = head.find(b"\n", i)
                i = len(head) if j < 0 else j
            i += 1
        j = i
        while j < len(head) and head[j : j + 1].isdigit():
            j += 1
        if j == i or j >= len(head):
            raise DecodeError("malformed PGM header")
        vals.append(int(head[i:j]))
        i = j
    if head[i : i + 1] not in (b" ", b"\t", b"\r", b"\n"):
        raise DecodeError("malformed PGM header")
    w, h, maxval = vals
    if w < 1 or h < 1 or not 0 < maxval < 65536:
        raise DecodeError(f"PGM header out of range ({w}x{h}, maxval {maxval})")
    return w, h, maxval, i + 1


def _as_array(buf: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, np.uint8)


def decode_rgb(buf: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Decode a JPEG/PNG/... payload to an HxWx3 uint8 RGB array (gray images are expanded)."""
    arr = _as_array(buf)
    img = cv2.imdecode(arr, cv2.IMREAD_COLOR) if arr.size else None
    if img is None:
        raise DecodeError(f"undecodable image ({arr.size} bytes)")
    return img[:, :, ::-1]


def decode_depth(buf: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Decode a depth PNG or PGM to an HxW uint16 array (8-bit depth is scaled to 16 bits)."""
    arr = _as_array(buf)
    img = cv2.imdecode(arr, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_GRAYSCALE) if arr.size else None
    if img is None:
        raise DecodeError(f"undecodable depth image ({arr.size} bytes)")
    if img.dtype == np.uint8:
        # 8-bit depth from other tools: spread over the 16-bit range the loaders expect.
        img = img.astype(np.uint16) * 257
    if img.dtype != np.uint16:
        raise DecodeError(f"depth image has type {img.dtype}, expected 8- or 16-bit")
    return img


def jpeg_end(buf: bytes | memoryview) -> int:
    """Offset just past the JPEG end-of-image marker; raises DecodeError if there is none."""
    data = bytes(buf) if isinstance(buf, memoryview) else buf
    n = len(data)
    if data[:2] != JPEG_SOI:
        raise DecodeError("not a JPEG (no start-of-image marker)")
    i = 2
    while i + 1 < n:
        if data[i] != 0xFF:
            raise DecodeError(f"JPEG marker expected at byte {i}")
        while i + 1 < n and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        marker = data[i + 1]
        if marker == 0xD9:
            return i + 2
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        if i + 4 > n:
            break
        seg = int.from_bytes(data[i + 2 : i + 4], "big")
        i += 2 + seg
        if marker == 0xDA:
            # Entropy-coded data: a 0xFF in it is followed by 0x00 (stuffing) or a restart
            # marker; anything else is the next real marker (DHT, SOS, EOI...).
            while True:
                j = data.find(b"\xff", i)
                if j < 0 or j + 1 >= n:
                    raise DecodeError("truncated JPEG (no end-of-image marker)")
                nxt = data[j + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7 or nxt == 0xFF:
                    i = j + 1 if nxt == 0xFF else j + 2
                    continue
                i = j
                break
    raise DecodeError("truncated JPEG (no end-of-image marker)")


def png_end(buf: bytes | memoryview) -> int:
    """Offset just past a PNG's IEND chunk, by walking its chunks; raises DecodeError if none."""
    data = bytes(buf)
    if data[:8] != PNG_SIGNATURE:
        raise DecodeError("not a PNG (no signature)")
    i, n = 8, len(data)
    while i + 8 <= n:
        length = int.from_bytes(data[i : i + 4], "big")
        ctype = data[i + 4 : i + 8]
        i += 12 + length  # length, type, data, CRC
        if ctype == b"IEND":
            if i > n:
                break
            return i
    raise DecodeError("truncated PNG (no IEND chunk)")


def check_complete(buf: bytes | memoryview) -> None:
    """Raise DecodeError for an empty or visibly truncated JPEG/PNG/PGM (decoders grey-fill those silently)."""
    n = len(buf)
    if n == 0:
        raise DecodeError("empty image payload")
    head = bytes(buf[:8])
    if head[:2] == JPEG_SOI:
        tail = bytes(buf[-2:])
        if tail != b"\xff\xd9":
            jpeg_end(bytes(buf))  # tolerates bytes after EOI, raises when there is no EOI
    elif head == PNG_SIGNATURE:
        if bytes(buf[-8:]) != PNG_IEND:
            raise DecodeError("truncated PNG (no IEND chunk at the end)")
    elif head[:2] == PGM_MAGIC:
        w, h, maxval, start = pgm_header(buf)
        if maxval not in (255, 65535):
            # Decoders disagree on other ranges (OpenCV keeps the raw values, DALI rescales).
            raise DecodeError(f"PGM maxval {maxval}: depth PGMs must use 255 or 65535")
        need = start + w * h * (2 if maxval > 255 else 1)
        if n < need:
            raise DecodeError(f"truncated PGM ({n} bytes, its header needs {need})")


def pack_rgbd(rgb_jpeg: bytes, depth: bytes) -> bytes:
    """Join an RGB JPEG and a depth PNG/PGM into one RGB-D payload."""
    return rgb_jpeg + depth


def split_rgbd(payload: bytes | memoryview, rgb_len: int | None = None) -> tuple[bytes, bytes | None]:
    """Split a payload into (rgb bytes, depth PNG/PGM bytes or None).

    ``rgb_len`` (from the record header) skips the walk over the RGB image's markers (JPEG)
    or chunks (PNG); a payload with nothing after its image is RGB only.
    """
    data = bytes(payload)
    if rgb_len is None:
        if data[:2] == JPEG_SOI:
            rgb_len = jpeg_end(data)
        elif data[:8] == PNG_SIGNATURE:
            rgb_len = png_end(data)
        else:
            return data, None
    if rgb_len > len(data):
        raise DecodeError(f"RGB length {rgb_len} exceeds the payload ({len(data)} bytes)")
    rest = data[rgb_len:]
    if not rest:
        return data, None
    if rest[:8] != PNG_SIGNATURE and rest[:2] != PGM_MAGIC:
        # Some encoders leave padding after EOI; only a PNG or PGM there is depth.
        if rest.strip(b"\x00") == b"":
            return data[:rgb_len], None
        raise DecodeError("bytes after the RGB image are not a depth PNG or PGM")
    return data[:rgb_len], rest


def normalize_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 → float32 3xHxW in [-1, 1]: (x - 127.5) / 127.5, the insightface convention."""
    # Multiplying by the float32 reciprocal is what DALI's crop_mirror_normalize does: the
    # backends then agree bit for bit, not just to an ulp.
    return ((rgb.astype(np.float32) - np.float32(127.5)) * np.float32(1 / 127.5)).transpose(2, 0, 1)


def normalize_depth(depth: np.ndarray) -> np.ndarray:
    """uint16 HxW → float32 1xHxW in [-1, 1]: (v - 32767.5) / 32767.5 (a hole is -1)."""
    return ((depth.astype(np.float32) - np.float32(32767.5)) * np.float32(1 / 32767.5))[None]
