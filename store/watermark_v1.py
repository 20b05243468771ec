"""Scheme v1 of the invisible image watermark, kept so versions published with it still decode (new versions embed
scheme v2, ``store/watermark.py``, which reuses this module's payload, code and residual filter).

Scheme v1: a keyed, tiled spread-spectrum pattern carrying a 64-bit payload
(dataset id, version, sample index) with a CRC-16 and a rate-1/2 convolutional code.

Owns: payload packing, embedding into 16-bit CT (HU + 1024) and 8-bit grey/RGB images, and blind decoding
from any bit depth after windowing, JPEG, rescaling or cropping. See docs/watermark.md for the design and
the measured robustness. No global random state: the pattern comes from a fixed key through a numpy
Generator, so it is identical on every machine.

Layout of the mark
------------------
* One 128x128 pixel *tile* is repeated over the whole image. A tile is a 32x32 grid of 4x4-pixel *cells*;
  each cell adds ``+a`` or ``-a`` to its 16 pixels (``a`` = 4 HU on CT, 2 grey levels on 8-bit images).
* 688 cells carry the 172 coded bits (each bit in 4 cells scattered over the tile, XOR a keyed
  pseudo-noise sign); the other 336 cells are a fixed *pilot* used to find the tile phase after a crop.
* 172 coded bits = rate-1/2, K=7 convolutional code (generators 133/171 octal, zero-tailed) of
  80 bits = 64 payload bits + CRC-16/CCITT. Decoding is a soft-decision Viterbi; the CRC rejects wrong
  payloads.
* Payload (64 bits, big end first): 24-bit dataset id (first 3 bytes of sha256 of the name),
  16-bit version, 24-bit sample index.

Decoding folds the high-passed image modulo the tile (summing all tile copies), finds the pilot by FFT
cross-correlation (any crop offset), reads the cells, Viterbi-decodes and checks the CRC; it retries at a
few scale factors (1, 0.5, 2, 0.75, 1.5) so downscaled or upscaled copies decode too.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import cv2
import numpy as np

TILE = 128
CELL = 4
GRID = TILE // CELL  # 32 cells a side
N_CELLS = GRID * GRID
PAYLOAD_BITS = 64
CRC_BITS = 16
INFO_BITS = PAYLOAD_BITS + CRC_BITS  # 80
K = 7  # constraint length
G1, G2 = 0o133, 0o171
CODED_BITS = 2 * (INFO_BITS + K - 1)  # 172
REPEAT = 4
N_DATA_CELLS = CODED_BITS * REPEAT  # 688
N_PILOT_CELLS = N_CELLS - N_DATA_CELLS  # 336

CT_AMPLITUDE_HU = 4  # max change of any CT pixel, HU (integer, so the stored uint16 changes by exactly this)
U8_AMPLITUDE = 2  # max change of any 8-bit pixel, grey levels (PSNR >= 42.1 dB)
FINDING_MARGIN_PX = 3  # cells that touch a finding (dilated by this) are left unmarked
SCALES = (1.0, 0.5, 2.0, 0.75, 1.5)
_KEY = 0x7061697266_6F726765  # "pairforge": the fixed key of the pattern

SCHEME = f"pairforge-ss-v1 (tile {TILE}px, cell {CELL}px, K={K} r=1/2 conv + CRC-16, {REPEAT}x repetition)"


def _key_tables():
    rng = np.random.Generator(np.random.PCG64(_KEY))
    perm = rng.permutation(N_CELLS)
    pn = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=N_CELLS)
    data_cells = perm[:N_DATA_CELLS]
    pilot_cells = perm[N_DATA_CELLS:]
    bit_of_cell = np.arange(N_DATA_CELLS) % CODED_BITS
    return pn, data_cells, pilot_cells, bit_of_cell


_PN, _DATA_CELLS, _PILOT_CELLS, _BIT_OF_CELL = _key_tables()


def _expand(cells: np.ndarray) -> np.ndarray:
    """GRID x GRID cell values -> TILE x TILE pixels."""
    return np.repeat(np.repeat(cells.reshape(GRID, GRID), CELL, axis=0), CELL, axis=1)


_pilot_cells = np.zeros(N_CELLS, np.float32)
_pilot_cells[_PILOT_CELLS] = _PN[_PILOT_CELLS]
_PILOT_TILE = _expand(_pilot_cells)
_PILOT_FFT_CONJ = np.conj(np.fft.rfft2(_PILOT_TILE))


# ---------------------------------------------------------------- payload
@dataclass(frozen=True)
class Payload:
    dataset_id: int  # 24 bits
    version: int  # 16 bits
    index: int  # 24 bits

    def __post_init__(self):
        if not (0 <= self.dataset_id < 1 << 24 and 0 <= self.version < 1 << 16 and 0 <= self.index < 1 << 24):
            raise ValueError(f"watermark payload out of range: dataset id < 2^24, version < 65536, "
                             f"sample index < 16777216; got {self}")

    @property
    def value(self) -> int:
        return (self.dataset_id << 40) | (self.version << 24) | self.index

    @property
    def hex(self) -> str:
        return f"{self.value:016x}"

    @classmethod
    def from_value(cls, v: int) -> "Payload":
        return cls((v >> 40) & 0xFFFFFF, (v >> 24) & 0xFFFF, v & 0xFFFFFF)

    @classmethod
    def from_hex(cls, h: str) -> "Payload":
        return cls.from_value(int(h, 16))


def dataset_id(name: str) -> int:
    """24-bit dataset id: the first three bytes of sha256(name)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:3], "big")


def payload_for(name: str, version: int, index: int) -> Payload:
    return Payload(dataset_id(name), int(version), int(index))


def _bits(value: int, n: int) -> np.ndarray:
    return np.array([(value >> (n - 1 - i)) & 1 for i in range(n)], dtype=np.uint8)


def _crc16(bits: np.ndarray) -> int:
    crc = 0xFFFF
    for b in bits:
        top = ((crc >> 15) & 1) ^ int(b)
        crc = (crc << 1) & 0xFFFF
        if top:
            crc ^= 0x1021
    return crc


# ---------------------------------------------------------------- convolutional code
def _parity(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    out = np.zeros_like(x)
    while np.any(x):
        out ^= x & 1
        x >>= 1
    return out


_STATES = 1 << (K - 1)
_reg = (np.arange(2)[None, :] << (K - 1)) | np.arange(_STATES)[:, None]  # [state, input] -> 7-bit register
_NEXT = _reg >> 1  # [state, input] -> next state
_OUT = np.stack([_parity(_reg & G1), _parity(_reg & G2)], axis=-1)  # [state, input, 2] bits
_EXP = 1.0 - 2.0 * _OUT.astype(np.float32)  # expected soft symbols (+1 for bit 0)
# predecessors of each next state: next = (b << 5) | (s >> 1), so s = ((next << 1) & 63) | j for j in {0, 1}
_ns = np.arange(_STATES)
_PREV = np.stack([((_ns << 1) & (_STATES - 1)) | 0, ((_ns << 1) & (_STATES - 1)) | 1], axis=1)
_INPUT_OF_NEXT = _ns >> (K - 2)


def conv_encode(info: np.ndarray) -> np.ndarray:
    state = 0
    out = np.empty(2 * (len(info) + K - 1), np.uint8)
    for t, b in enumerate(np.concatenate([info, np.zeros(K - 1, np.uint8)])):
        out[2 * t: 2 * t + 2] = _OUT[state, b]
        state = _NEXT[state, b]
    return out


def viterbi_decode(soft: np.ndarray) -> np.ndarray:
    """Soft-decision Viterbi; ``soft`` > 0 means bit 0. Returns the info bits (tail removed)."""
    n = len(soft) // 2
    y = soft.reshape(n, 2).astype(np.float64)
    pm = np.full(_STATES, -1e18)
    pm[0] = 0.0
    decisions = np.empty((n, _STATES), np.uint8)
    b = _INPUT_OF_NEXT
    exp_p0 = _EXP[_PREV[:, 0], b]  # [next, 2]
    exp_p1 = _EXP[_PREV[:, 1], b]
    for t in range(n):
        m0 = pm[_PREV[:, 0]] + exp_p0 @ y[t]
        m1 = pm[_PREV[:, 1]] + exp_p1 @ y[t]
        choose1 = m1 > m0
        decisions[t] = choose1
        pm = np.where(choose1, m1, m0)
    state = 0  # zero-tailed
    bits = np.empty(n, np.uint8)
    for t in range(n - 1, -1, -1):
        bits[t] = _INPUT_OF_NEXT[state]
        state = _PREV[state, decisions[t, state]]
    return bits[: n - (K - 1)]


def coded_bits(payload: Payload) -> np.ndarray:
    pbits = _bits(payload.value, PAYLOAD_BITS)
    info = np.concatenate([pbits, _bits(_crc16(pbits), CRC_BITS)])
    return conv_encode(info)


# ---------------------------------------------------------------- embedding
def tile_pattern(payload: Payload) -> np.ndarray:
    """The TILE x TILE +-1 pattern (float32) for a payload."""
    code = coded_bits(payload)
    cells = _PN.copy()
    cells[_DATA_CELLS] *= 1.0 - 2.0 * code[_BIT_OF_CELL].astype(np.float32)
    return _expand(cells)


def image_pattern(payload: Payload, height: int, width: int) -> np.ndarray:
    t = tile_pattern(payload)
    reps = (-(-height // TILE), -(-width // TILE))
    return np.tile(t, reps)[:height, :width]


def keep_out_mask(instance: np.ndarray | None, margin_px: int = FINDING_MARGIN_PX) -> np.ndarray | None:
    """Pixels the mark must not touch: every labelled finding (instance > 0), dilated by ``margin_px``."""
    if instance is None or not np.any(instance):
        return None
    m = (instance > 0).astype(np.uint8)
    if margin_px > 0:
        m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin_px + 1, 2 * margin_px + 1)))
    return m.astype(bool)


def apply_delta(image: np.ndarray, delta_for, keep_out: np.ndarray | None, amplitude: int | None,
                ct_amplitude: int, u8_amplitude: int) -> np.ndarray:
    """The embedding step every scheme shares: ``delta_for(height, width, amplitude)`` (int32, |d| <= amplitude)
    added to a uint16 CT image (HU + 1024) or a uint8 grey / RGB image, zero in ``keep_out``, clipped to the
    dtype's range; same dtype and shape back. ``amplitude`` None: the scheme's default for the dtype."""
    if image.dtype == np.uint16:
        amp, hi = (ct_amplitude if amplitude is None else amplitude), 65535
    elif image.dtype == np.uint8:
        amp, hi = (u8_amplitude if amplitude is None else amplitude), 255
    else:
        raise ValueError(f"watermark embeds into uint16 (CT HU+1024) or uint8 images, not {image.dtype}")
    h, w = image.shape[:2]
    delta = delta_for(h, w, int(amp))
    if keep_out is not None:
        delta = delta.copy()  # delta_for may hand out a cached tiling
        delta[keep_out] = 0
    if image.ndim == 3:
        delta = delta[:, :, None]
    out = image.astype(np.int32) + delta
    np.clip(out, 0, hi, out=out)
    return out.astype(image.dtype)


def embed(image: np.ndarray, payload: Payload, keep_out: np.ndarray | None = None,
          amplitude: int | None = None) -> np.ndarray:
    """Add the mark to a uint16 CT image (HU + 1024) or a uint8 grey / RGB image; same dtype and shape back.

    Every pixel changes by at most ``amplitude`` (CT: 4 HU; 8-bit: 2 grey levels); pixels in ``keep_out``
    (e.g. the findings) do not change at all.
    """
    return apply_delta(image, lambda h, w, amp: image_pattern(payload, h, w).astype(np.int32) * amp, keep_out,
                       amplitude, CT_AMPLITUDE_HU, U8_AMPLITUDE)


# ---------------------------------------------------------------- decoding
@dataclass
class Detection:
    found: bool  # CRC passed
    payload: Payload | None
    bits: np.ndarray | None  # best-effort 64 payload bits (also when the CRC failed)
    sync_score: float  # pilot correlation peak, in standard deviations of the correlation surface
    scale: float  # the scale factor the image was found at (0.5 = the copy was downscaled by half)
    shift: tuple[int, int]  # tile phase (dy, dx)
    raw_bit_accuracy_hint: float = 0.0  # mean |soft| / std: a confidence figure
    tried: list[float] = field(default_factory=list)


def to_grey_float(image: np.ndarray) -> np.ndarray:
    """Any dtype, grey or RGB/RGBA -> float32 grey. Linear, so the mark's sign survives any windowing."""
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[:, :, :3].astype(np.float32).mean(axis=2)
    return a.astype(np.float32, copy=False)


def _residual(g: np.ndarray) -> np.ndarray:
    """Matched filter for the cells under correlated host noise: whiten with W (each pixel minus its 8-neighbour
    mean, which removes anatomy and smooth texture), divide by the local residual energy (so edges, vessels and
    noisy regions cannot swamp the correlation), clip, and apply W again (W^T W is the matched filter)."""
    r = _whiten(g)
    s = np.sqrt(cv2.GaussianBlur(r * r, (0, 0), 1.5)) + 1e-3
    s = np.maximum(s, 0.5 * float(np.median(s)))
    return _whiten(np.clip(r / s, -3.0, 3.0))


def _whiten(x: np.ndarray) -> np.ndarray:
    return x - cv2.filter2D(x, -1, _NEIGHBOURS, borderType=cv2.BORDER_REFLECT)


_NEIGHBOURS = np.full((3, 3), 1.0 / 8.0, np.float32)
_NEIGHBOURS[1, 1] = 0.0


def _fold(r: np.ndarray) -> np.ndarray:
    h, w = r.shape
    ph, pw = -(-h // TILE) * TILE, -(-w // TILE) * TILE
    pad = np.zeros((ph, pw), np.float32)
    pad[:h, :w] = r
    return pad.reshape(ph // TILE, TILE, pw // TILE, TILE).sum(axis=(0, 2))


def _decode_folded(f: np.ndarray):
    corr = np.fft.irfft2(np.fft.rfft2(f) * _PILOT_FFT_CONJ, s=f.shape)
    k = int(np.argmax(corr))
    dy, dx = divmod(k, TILE)
    score = float((corr.flat[k] - corr.mean()) / (corr.std() + 1e-12))
    aligned = np.roll(f, (-dy, -dx), axis=(0, 1))
    cells = aligned.reshape(GRID, CELL, GRID, CELL).sum(axis=(1, 3)).ravel()
    chips = cells[_DATA_CELLS] * _PN[_DATA_CELLS]
    soft = np.bincount(_BIT_OF_CELL, weights=chips, minlength=CODED_BITS)
    soft = soft / (np.std(soft) + 1e-12)
    info = viterbi_decode(soft)
    pbits, crc = info[:PAYLOAD_BITS], info[PAYLOAD_BITS:]
    ok = _crc16(pbits) == int("".join(map(str, crc)), 2)
    return ok, pbits, score, (dy, dx), float(np.mean(np.abs(soft)))


def decode(image: np.ndarray, scales: tuple[float, ...] = SCALES) -> Detection:
    """Find the mark in an image of any dtype (16-bit CT, 8-bit windowed, JPEG'd, rescaled, cropped)."""
    g = to_grey_float(image)
    best: Detection | None = None
    tried = []
    for s in scales:
        if s == 1.0:
            gs = g
        else:
            h, w = g.shape
            nh, nw = int(round(h / s)), int(round(w / s))
            if min(nh, nw) < 32 or max(nh, nw) > 8192:
                continue
            gs = cv2.resize(g, (nw, nh), interpolation=cv2.INTER_LINEAR if s < 1 else cv2.INTER_AREA)
        tried.append(s)
        ok, pbits, score, shift, conf = _decode_folded(_fold(_residual(gs)))
        value = int("".join(map(str, pbits)), 2)
        det = Detection(ok, Payload.from_value(value) if ok else None, pbits, score, s, shift, conf)
        if ok:
            det.tried = tried
            return det
        if best is None or score > best.sync_score:
            best = det
    assert best is not None
    best.tried = tried
    return best


def payload_bits(payload: Payload) -> np.ndarray:
    return _bits(payload.value, PAYLOAD_BITS)
