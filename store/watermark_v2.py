"""Scheme v2 of the invisible image watermark, kept so versions published with it still decode (new versions embed
scheme v3, ``store/watermark.py``, which reuses this module's template search and warp, and reads v2 marks with
``read_folded`` below). Scheme v2: a keyed, tiled spread-spectrum mark carrying a 64-bit payload (dataset id,
version, sample index) with a 32-bit keyed check, plus a fixed sinusoidal *synchronisation template* from which the
decoder estimates any rescale and rotation blindly (no list of factors), before it reads the payload.

Owns: embedding into 16-bit CT (HU + 1024) and 8-bit grey/RGB images, blind decoding from any bit depth after
windowing, JPEG, rescaling, rotation and cropping, and the acceptance rule (explicit sync threshold + keyed check).
Images marked with scheme v1 (``store/watermark_v1.py``, CRC-16, fixed scale list) still decode. See
docs/watermark.md for the design, the distortion bound, the measured robustness and the false-accept bound.
No global random state: every pattern comes from a fixed key through a numpy Generator.

Layout of the v2 mark (one 128x128 tile, repeated over the image)
-----------------------------------------------------------------
* *Cells*: a 32x32 grid of 4x4-pixel cells, each adding ``+c`` or ``-c``. 816 cells carry the 204 coded bits
  (each bit in 4 cells, XOR a keyed pseudo-noise sign); 208 cells are a fixed *pilot* that gives the tile phase.
* 204 coded bits = rate-1/2, K=7 convolutional code of 96 bits = 64 payload bits + a 32-bit keyed check
  (the first 4 bytes of sha256(key || payload)). Soft-decision Viterbi decoding.
* *Template*: four sinusoids at fixed lattice frequencies of the tile (0.12-0.14 cycles/px, at 23, 69, 115 and
  160 deg: none near an axis), keyed phases, scaled so the sum stays within ``+-t``. In the Fourier magnitude of a
  copy they are four peaks whose positions move with the copy's scale and rotation only (not with crops or shifts).
* Every pixel changes by at most ``c + t`` (CT: 6 + 8 = 14 HU; 8-bit: 2 + 3 = 5 grey levels); finding pixels
  (dilated) not at all.

Decoding (blind)
----------------
1. Whitened, locally normalised residual of the copy; Hann-windowed power spectrum; each bin's log power minus
   its neighbourhood's mean (a unit-free peak statistic).
2. Template search: every (scale 0.45-2.2, rotation -6..6 deg) hypothesis on a grid finer than a bin's tolerance
   scores the sum of the four peak statistics it predicts (capped); the four best are refined on two finer grids
   with the bilinearly interpolated statistic (a joint sub-bin fit of the four peaks).
3. The copy is warped back once per hypothesis, its residual folded modulo the tile, template bins notched out,
   the pilot found by FFT correlation; the cells are read, Viterbi-decoded, and the keyed check tested.
4. Accepted only if the pilot correlation peak is at least ``SYNC_THRESHOLD`` standard deviations AND the 32-bit
   keyed check matches. Read order: the four candidates, the copy as it is, then neighbours of the best candidate
   (+-0.4 % scale, +-0.2 deg); at most ``MAX_READS`` reads.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import cv2
import numpy as np

from store import watermark_v1 as v1
from store.watermark_v1 import (CELL, FINDING_MARGIN_PX, GRID, K, N_CELLS, PAYLOAD_BITS, TILE, Payload,  # noqa: F401
                                _bits, _expand, apply_delta, conv_encode, dataset_id, keep_out_mask, payload_for,
                                payload_bits, to_grey_float, viterbi_decode)

VERSION = 2
CHECK_BITS = 32
INFO_BITS = PAYLOAD_BITS + CHECK_BITS  # 96
CODED_BITS = 2 * (INFO_BITS + K - 1)  # 204
REPEAT = 4
N_DATA_CELLS = CODED_BITS * REPEAT  # 816
N_PILOT_CELLS = N_CELLS - N_DATA_CELLS  # 208

CT_AMPLITUDE_HU = 14  # max change of any CT pixel, HU: cells 6 + template 8
U8_AMPLITUDE = 5  # max change of any 8-bit pixel, grey levels: cells 2 + template 3
# template frequencies, (kx, ky) cycles per 128-px tile; radius 14.3-19.0 (0.11-0.15 cycles/px)
TEMPLATE_K = np.array([(14, 6), (6, 16), (-7, 15), (-17, 6)], np.float64)
SYNC_THRESHOLD = 6.0  # pilot correlation peak, standard deviations of the 128x128 correlation surface
TEMPLATE_THRESHOLD = 0.0  # template score a candidate needs to be read (0: the four best are always read)
SCALE_RANGE = (0.45, 2.2)  # searched rescale factors of a copy (copy size / published size)
ROTATION_RANGE_DEG = 6.0
_KEY = 0x7061697266_6F726765_02  # "pairforge" + scheme 2
_CHECK_KEY = b"pairforge-watermark-v2-check"

SCHEME = (f"pairforge-ss-v2 (tile {TILE}px, cell {CELL}px, K={K} r=1/2 conv + 32-bit keyed check, {REPEAT}x "
          f"repetition, 6-peak DFT sync template, sync threshold {SYNC_THRESHOLD:g} sd)")


def _key_tables():
    rng = np.random.Generator(np.random.PCG64(_KEY))
    perm = rng.permutation(N_CELLS)
    pn = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=N_CELLS)
    # template phases: the keyed phase set (of 256 draws) with the smallest peak, so the amplitude is well used
    yy, xx = np.mgrid[0:TILE, 0:TILE].astype(np.float64)
    arg = 2 * np.pi * (TEMPLATE_K[:, 0, None, None] * xx + TEMPLATE_K[:, 1, None, None] * yy) / TILE
    best, best_peak = None, np.inf
    for _ in range(256):
        ph = rng.uniform(0, 2 * np.pi, len(TEMPLATE_K))
        t = np.cos(arg + ph[:, None, None]).sum(axis=0)
        peak = float(np.abs(t).max())
        if peak < best_peak:
            best, best_peak = t, peak
    return pn, perm[:N_DATA_CELLS], perm[N_DATA_CELLS:], np.arange(N_DATA_CELLS) % CODED_BITS, best / best_peak


_PN, _DATA_CELLS, _PILOT_CELLS, _BIT_OF_CELL, _TEMPLATE = _key_tables()  # _TEMPLATE: max |value| = 1
_pilot_cells = np.zeros(N_CELLS, np.float32)
_pilot_cells[_PILOT_CELLS] = _PN[_PILOT_CELLS]
_PILOT_TILE = _expand(_pilot_cells)
_PILOT_FFT_CONJ = np.conj(np.fft.rfft2(_PILOT_TILE))
# rfft2 bins (row, col) of the folded tile that hold the template (and a 1-bin ring), notched before reading cells
_NOTCH = np.ones((TILE, TILE // 2 + 1), np.float32)
for _kx, _ky in TEMPLATE_K.astype(int):
    if _kx < 0:
        _kx, _ky = -_kx, -_ky
    for _dy in (-1, 0, 1):
        for _dx in (-1, 0, 1):
            if 0 <= _kx + _dx <= TILE // 2:
                _NOTCH[(_ky + _dy) % TILE, _kx + _dx] = 0.0


# ---------------------------------------------------------------- keyed check
@dataclass(frozen=True, eq=False)
class SchemeKeys:
    """What a scheme's key fixes for making cells and reading them back (v2 and v3 differ only in these)."""
    pn: np.ndarray  # +-1 per cell
    data_cells: np.ndarray  # cell indices carrying coded bits
    bit_of_cell: np.ndarray  # coded bit of each data cell
    pilot_fft_conj: np.ndarray  # conj(rfft2) of the pilot cells' tile
    check_key: bytes  # key of the 32-bit check


def keyed_check(check_key: bytes, pbits: np.ndarray) -> np.ndarray:
    """32-bit keyed check of the 64 payload bits: first 4 bytes of sha256(key || payload bytes)."""
    digest = hashlib.sha256(check_key + np.packbits(pbits.astype(np.uint8)).tobytes()).digest()
    return np.unpackbits(np.frombuffer(digest[:4], np.uint8))


def keyed_cells(keys: SchemeKeys, code: np.ndarray) -> np.ndarray:
    """The TILE x TILE +-1 cell pattern (float32) of coded bits ``code`` under ``keys`` (pilot + data)."""
    cells = keys.pn.copy()
    cells[keys.data_cells] *= 1.0 - 2.0 * code[keys.bit_of_cell].astype(np.float32)
    return _expand(cells)


def fold_spectrum(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Folded residual tile(s) (..., 128, 128) -> (notched rfft2, its image): what every scheme's read starts from."""
    F = np.fft.rfft2(f.reshape(-1, TILE, TILE)) * _NOTCH
    return F, np.fft.irfft2(F, s=(TILE, TILE))


def read_spectrum(keys: SchemeKeys, F: np.ndarray, fn: np.ndarray):
    """``fold_spectrum``'s output read under ``keys`` -> (ok, payload bits, sync score, shift, confidence) per tile."""
    corr = np.fft.irfft2(F * keys.pilot_fft_conj, s=(TILE, TILE))
    B = F.shape[0]
    cflat = corr.reshape(B, -1)
    k = np.argmax(cflat, axis=1)
    score = (cflat[np.arange(B), k] - cflat.mean(1)) / (cflat.std(1) + 1e-12)
    dy, dx = np.divmod(k, TILE)
    rows = (np.arange(TILE)[None, :] + dy[:, None]) % TILE
    cols = (np.arange(TILE)[None, :] + dx[:, None]) % TILE
    aligned = fn[np.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]
    cells = aligned.reshape(B, GRID, CELL, GRID, CELL).sum(axis=(2, 4)).reshape(B, -1)
    chips = cells[:, keys.data_cells] * keys.pn[keys.data_cells]
    soft = np.zeros((B, CODED_BITS))
    np.add.at(soft, (slice(None), keys.bit_of_cell), chips)
    soft = soft / (np.std(soft, axis=1, keepdims=True) + 1e-12)
    info = viterbi_batch(soft)
    pbits, chk = info[:, :PAYLOAD_BITS], info[:, PAYLOAD_BITS:]
    ok = np.array([np.array_equal(keyed_check(keys.check_key, pbits[i]), chk[i]) for i in range(B)])
    return ok, pbits, score, np.stack([dy, dx], 1), np.mean(np.abs(soft), axis=1)


KEYS = SchemeKeys(_PN, _DATA_CELLS, _BIT_OF_CELL, _PILOT_FFT_CONJ, _CHECK_KEY)


def check_bits(pbits: np.ndarray) -> np.ndarray:
    """32-bit keyed check of the 64 payload bits (v2 key)."""
    return keyed_check(_CHECK_KEY, pbits)


def info_bits(payload: Payload) -> np.ndarray:
    pbits = _bits(payload.value, PAYLOAD_BITS)
    return np.concatenate([pbits, check_bits(pbits)])


def coded_bits(payload: Payload) -> np.ndarray:
    return conv_encode(info_bits(payload))


# ---------------------------------------------------------------- embedding
def cell_pattern(payload: Payload) -> np.ndarray:
    """The TILE x TILE +-1 cell pattern (float32) for a payload (pilot + data)."""
    return keyed_cells(KEYS, coded_bits(payload))


def split_amplitude(amplitude: int) -> tuple[int, int]:
    """Max total change -> (cell amplitude, template amplitude), both integers: 3/7 (at least 1) to the cells."""
    c = max(1, int(round(int(amplitude) * 3 / 7)))
    return c, int(amplitude) - c


def tile_delta(payload: Payload, amplitude: int) -> np.ndarray:
    """The integer TILE x TILE change of one tile: cells * c + round(template * t); max |value| <= amplitude."""
    c, t = split_amplitude(amplitude)
    return (cell_pattern(payload) * c).astype(np.int32) + np.rint(_TEMPLATE * t).astype(np.int32)


_TILE_CACHE: dict[tuple[int, int], np.ndarray] = {}


def tiled_delta(tile_fn, cache: dict, payload: Payload, height: int, width: int, amplitude: int) -> np.ndarray:
    """A scheme's ``tile_fn(payload, amplitude)`` tiled over height x width; tiles kept in ``cache`` (65 at most)."""
    key = (payload.value, int(amplitude))
    t = cache.get(key)
    if t is None:
        t = tile_fn(payload, amplitude)
        if len(cache) > 64:
            cache.clear()
        cache[key] = t
    reps = (-(-height // TILE), -(-width // TILE))
    return np.tile(t, reps)[:height, :width]


def image_delta(payload: Payload, height: int, width: int, amplitude: int) -> np.ndarray:
    return tiled_delta(tile_delta, _TILE_CACHE, payload, height, width, amplitude)


def embed(image: np.ndarray, payload: Payload, keep_out: np.ndarray | None = None,
          amplitude: int | None = None) -> np.ndarray:
    """Add the v2 mark to a uint16 CT image (HU + 1024) or a uint8 grey / RGB image; same dtype and shape back.

    Every pixel changes by at most ``amplitude`` (CT: 8 HU; 8-bit: 4 grey levels); pixels in ``keep_out`` (the
    findings, dilated) do not change at all.
    """
    return apply_delta(image, lambda h, w, amp: image_delta(payload, h, w, amp), keep_out, amplitude, CT_AMPLITUDE_HU,
                       U8_AMPLITUDE)


# ---------------------------------------------------------------- decoding
@dataclass
class Detection:
    found: bool  # sync score >= SYNC_THRESHOLD and the keyed check (v2) / CRC (v1) passed
    payload: Payload | None
    bits: np.ndarray | None  # best-effort 64 payload bits (also when not found)
    sync_score: float  # pilot correlation peak, in standard deviations of the correlation surface
    scale: float  # estimated copy size / published size (0.5: the copy was downscaled by half)
    shift: tuple[int, int]  # tile phase (dy, dx)
    raw_bit_accuracy_hint: float = 0.0  # mean |soft| / std: a confidence figure
    tried: list = field(default_factory=list)  # hypotheses read: (scale, rotation deg)
    rotation: float = 0.0  # estimated rotation of the copy, degrees (counter-clockwise as cv2.getRotationMatrix2D)
    template_score: float = 0.0  # sum of the four capped template peak statistics at the hypothesis read
    scheme: int = VERSION  # 2, or 1 for a copy of an image marked with scheme v1
    attempts: int = 0  # payload reads (each is one 2^-32 chance of a false accept)


def _residual(g: np.ndarray) -> np.ndarray:
    return v1._residual(g)


_HANN_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _hann(h: int, w: int) -> np.ndarray:
    k = (h, w)
    if k not in _HANN_CACHE:
        if len(_HANN_CACHE) > 16:
            _HANN_CACHE.clear()
        _HANN_CACHE[k] = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    return _HANN_CACHE[k]


def peak_statistic(g: np.ndarray) -> np.ndarray:
    """fftshifted map of log spectral power of the windowed residual minus its 15x15 neighbourhood mean.

    For a host whose residual spectrum is locally flat (complex Gaussian bins) the value at a bin is
    log(E) + 0.577 with E ~ Exp(1): P(value > q) = exp(-exp(q - 0.577)); the template makes large values.
    """
    r = _residual(g)
    h, w = r.shape
    p = np.abs(np.fft.fft2(r * _hann(h, w))) ** 2
    lp = np.log(np.fft.fftshift(p) + 1e-12).astype(np.float32)
    return lp - cv2.blur(lp, (15, 15), borderType=cv2.BORDER_REFLECT)


_CAP = 6.0  # one bin can add at most this much to a template score (a host peak cannot win alone)


def _grid(h: int, w: int):
    """Hypothesis grid (log-scale, rotation), steps within the 3x3-max tolerance of one bin.

    A template peak of radius r cycles/px (published frame) sits r * N / s bins from the centre of the spectrum of a
    copy N px wide at scale s, so the log-scale step is 0.8 s / (r N) and the rotation step 0.8 s_min / (r N)."""
    rn = float(np.max(np.hypot(TEMPLATE_K[:, 0], TEMPLATE_K[:, 1]))) / TILE * max(h, w)
    ls = [np.log(SCALE_RANGE[0])]
    while ls[-1] < np.log(SCALE_RANGE[1]):
        ls.append(ls[-1] + 0.8 * np.exp(ls[-1]) / rn)
    step = 0.8 * SCALE_RANGE[0] / rn
    rot = np.deg2rad(ROTATION_RANGE_DEG)
    return np.array(ls), np.arange(-rot, rot + step / 2, step)


def _predict(A: np.ndarray, h: int, w: int) -> np.ndarray:
    """Template peak positions (row, col) in the fftshifted spectrum of an h x w copy for maps A (..., 2, 2)."""
    f = TEMPLATE_K / TILE  # (6, 2) (fx, fy) cycles/px in the published frame
    fa = np.einsum("...ij,kj->...ki", A, f)  # (..., 6, 2)
    col = fa[..., 0] * w + w // 2
    row = fa[..., 1] * h + h // 2
    return np.stack([row, col], axis=-1)


def _maps(ls: np.ndarray, th: np.ndarray) -> np.ndarray:
    """A = R(theta) / s for every (log s, theta): f_copy = A f_published, (x, y) = (col, row) order."""
    s = np.exp(ls)[:, None]
    c, sn = np.cos(th)[None, :] / s, np.sin(th)[None, :] / s
    # a copy rotated counter-clockwise on screen (y down) by theta: frequencies rotate the same way
    return np.stack([np.stack([c, sn], -1), np.stack([-sn, c], -1)], -2)  # (S, T, 2, 2)


def _bilinear(q: np.ndarray, pos: np.ndarray) -> np.ndarray:
    h, w = q.shape
    r = np.clip(pos[..., 0], 0, h - 1.001)
    c = np.clip(pos[..., 1], 0, w - 1.001)
    r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    fr, fc = r - r0, c - c0
    v = (q[r0, c0] * (1 - fr) * (1 - fc) + q[r0 + 1, c0] * fr * (1 - fc) + q[r0, c0 + 1] * (1 - fr) * fc
         + q[r0 + 1, c0 + 1] * fr * fc)
    inside = (pos[..., 0] >= 1) & (pos[..., 0] < h - 1) & (pos[..., 1] >= 1) & (pos[..., 1] < w - 1)
    return np.where(inside, v, 0.0)


def template_search(q: np.ndarray, top: int = 2):
    """Best (map A, score) hypotheses for a peak-statistic map ``q``.

    Coarse: every grid hypothesis scores the sum of the 3x3-max of the capped statistic at its four predicted peaks.
    Fine: around each of the ``top`` best (distinct) ones, two finer grids (1/5 and 1/25 of the coarse step) score
    the sum of the bilinearly interpolated statistic, which locates the peaks jointly to a fraction of a bin."""
    h, w = q.shape
    qc = np.minimum(q, _CAP)
    qm = cv2.dilate(qc, np.ones((3, 3), np.uint8))
    ls, th = _grid(h, w)
    A = _maps(ls, th)
    pos = np.rint(_predict(A, h, w)).astype(np.int64)
    r, c = pos[..., 0], pos[..., 1]
    inside = (r >= 1) & (r < h - 1) & (c >= 1) & (c < w - 1)
    vals = np.where(inside, qm[np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)], 0.0)
    score = vals.sum(axis=-1)  # (S, T)
    dls = float(np.median(np.diff(ls))) if len(ls) > 1 else 0.01
    dth = float(th[1] - th[0]) if len(th) > 1 else 0.01
    out = []
    flat = score.ravel()
    order = np.argsort(flat)[::-1]
    taken: list[tuple[int, int]] = []
    for k in order[:400]:
        i, j = divmod(int(k), score.shape[1])
        if any(abs(i - a) <= 4 and abs(j - b) <= 4 for a, b in taken):
            continue
        taken.append((i, j))
        l0, t0 = ls[i], th[j]
        # the step in log-scale at this scale (the grid is finer at small scales)
        d_l = (ls[min(i + 1, len(ls) - 1)] - ls[max(i - 1, 0)]) / 2 if len(ls) > 1 else dls
        best_fine = -1.0
        for frac in (0.2, 0.04):
            off = np.arange(-6, 7) * frac
            L = l0 + off * d_l
            T = t0 + off * dth
            Af = _maps(L, T)
            sf = _bilinear(qc, _predict(Af, h, w)).sum(-1)
            a, b = np.unravel_index(int(np.argmax(sf)), sf.shape)
            l0, t0, best_fine = L[a], T[b], float(sf[a, b])
        out.append((_maps(np.array([l0]), np.array([t0]))[0, 0], float(flat[k]), best_fine))
        if len(out) >= top:
            break
    return out


def _warp_back(g: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Resample the copy into the published frame: out(y) = g(M y + t) with M = A^-T, centres aligned."""
    M = np.linalg.inv(A).T  # copy coordinates per published coordinate, (x, y)
    s = float(np.sqrt(abs(np.linalg.det(M))))
    h, w = g.shape
    src = g
    if s > 1.1:  # shrinking: area-average first so the host does not alias onto the mark
        nh, nw = max(8, int(round(h / s))), max(8, int(round(w / s)))
        src = cv2.resize(g, (nw, nh), interpolation=cv2.INTER_AREA)
        M = M * np.array([[nw / w], [nh / h]])
        h, w = nh, nw
    oh, ow = int(round(g.shape[0] / s)), int(round(g.shape[1] / s))
    if min(oh, ow) < 32 or max(oh, ow) > 8192:
        return np.zeros((0, 0), np.float32)
    c_src = np.array([(w - 1) / 2, (h - 1) / 2])
    c_dst = np.array([(ow - 1) / 2, (oh - 1) / 2])
    t = c_src - M @ c_dst
    mat = np.concatenate([M, t[:, None]], 1).astype(np.float64)
    return cv2.warpAffine(src, mat, (ow, oh), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _fold(r: np.ndarray) -> np.ndarray:
    return v1._fold(r)


def read_folded(f: np.ndarray):
    """Folded residual tile(s) (..., 128, 128) -> (ok, payload bits, sync score, shift, confidence) per tile."""
    return read_spectrum(KEYS, *fold_spectrum(f))


def viterbi_batch(soft: np.ndarray) -> np.ndarray:
    """Soft-decision Viterbi over a batch (B, 2n); ``soft`` > 0 means bit 0. Returns (B, n - K + 1) info bits."""
    B, n2 = soft.shape
    n = n2 // 2
    y = soft.reshape(B, n, 2).astype(np.float64)
    S = v1._STATES
    pm = np.full((B, S), -1e18)
    pm[:, 0] = 0.0
    dec = np.empty((n, B, S), bool)
    b = v1._INPUT_OF_NEXT
    e0 = v1._EXP[v1._PREV[:, 0], b]  # (S, 2)
    e1 = v1._EXP[v1._PREV[:, 1], b]
    p0, p1 = v1._PREV[:, 0], v1._PREV[:, 1]
    for t in range(n):
        m0 = pm[:, p0] + y[:, t] @ e0.T
        m1 = pm[:, p1] + y[:, t] @ e1.T
        c = m1 > m0
        dec[t] = c
        pm = np.where(c, m1, m0)
    state = np.zeros(B, np.int64)
    bits = np.empty((B, n), np.uint8)
    ar = np.arange(B)
    for t in range(n - 1, -1, -1):
        bits[:, t] = b[state]
        state = v1._PREV[state, dec[t, ar, state].astype(np.int64)]
    return bits[:, : n - (K - 1)]


def accepted(check_ok: bool, sync_score: float) -> bool:
    """The acceptance rule: the pilot correlation peak reaches SYNC_THRESHOLD sd AND the 32-bit keyed check matches."""
    return bool(check_ok) and float(sync_score) >= SYNC_THRESHOLD


def false_accept_bound(reads: int) -> float:
    """Upper bound on the chance that an unmarked image is accepted after ``reads`` payload reads.

    Each read accepts only a decoded word whose 32 check bits equal a keyed hash of its 64 payload bits; for an
    image that carries no mark the decoded word does not depend on the key, so each read passes with probability
    2^-32 (union bound over reads; the sync threshold only lowers it further)."""
    return reads * 2.0 ** -CHECK_BITS


def _read(g: np.ndarray, A: np.ndarray):
    w = _warp_back(g, A)
    if w.size == 0:
        return None
    ok, pbits, score, shift, conf = read_folded(_fold(_residual(w)))
    return accepted(ok[0], score[0]), pbits[0], float(score[0]), tuple(int(v) for v in shift[0]), \
        float(conf[0])


def _describe(A: np.ndarray) -> tuple[float, float]:
    """(scale, rotation deg) of a map A = R(theta) / s."""
    s = 1.0 / float(np.sqrt(abs(np.linalg.det(A))))
    return s, float(np.rad2deg(np.arctan2(A[0, 1], A[0, 0])))


def _nudge(A: np.ndarray, ds: float, dth_deg: float) -> np.ndarray:
    th = np.deg2rad(dth_deg)
    R = np.array([[np.cos(th), np.sin(th)], [-np.sin(th), np.cos(th)]])
    return (R @ A) / (1.0 + ds)


_NUDGES = ((0.0, 0.0), (0.004, 0.0), (-0.004, 0.0), (0.0, 0.2), (0.0, -0.2),
           (0.004, 0.2), (-0.004, -0.2), (0.004, -0.2), (-0.004, 0.2))


MAX_READS = 16  # payload reads per image at most (the false-accept bound counts them)


def decode_v2(image: np.ndarray, max_reads: int = MAX_READS) -> Detection:
    g = to_grey_float(image)
    if min(g.shape) < 32:
        return Detection(False, None, None, 0.0, 1.0, (0, 0))
    q = peak_statistic(g)
    cands = [c for c in template_search(q, top=4) if c[1] >= TEMPLATE_THRESHOLD]
    # read order: each template candidate as estimated, the copy as it is, then neighbours of the best candidate
    hyps = [(A, ts) for A, ts, _ in cands] + [(np.eye(2), 0.0)]
    if cands:
        hyps += [(_nudge(cands[0][0], ds, dt), cands[0][1]) for ds, dt in _NUDGES[1:]]
    tried: list = []
    best: Detection | None = None
    for A, tscore in hyps[:max_reads]:
        res = _read(g, A)
        s, rot = _describe(A)
        tried.append((round(s, 4), round(rot, 3)))
        if res is None:
            continue
        ok, pbits, score, shift, conf = res
        value = int("".join(map(str, pbits)), 2)
        det = Detection(ok, Payload.from_value(value) if ok else None, pbits, score, s, shift, conf,
                        rotation=rot, template_score=tscore, scheme=2)
        if ok:
            best = det
            break
        if best is None or score > best.sync_score:
            best = det
    if best is None:
        best = Detection(False, None, None, 0.0, 1.0, (0, 0), template_score=cands[0][1] if cands else 0.0)
    best.tried, best.attempts = tried, len(tried)
    return best


def decode(image: np.ndarray) -> Detection:
    """Find the mark in an image of any dtype (16-bit CT, 8-bit windowed, JPEG'd, rescaled, rotated, cropped).

    Scheme v2 first; then scheme v1 (older versions), accepted only with its CRC-16 AND a pilot correlation of at
    least ``SYNC_THRESHOLD_V1`` standard deviations.
    """
    det = decode_v2(image)
    if det.found:
        return det
    old = v1.decode(image)
    if old.found and old.sync_score >= SYNC_THRESHOLD_V1:
        return Detection(True, old.payload, old.bits, old.sync_score, old.scale, old.shift,
                         old.raw_bit_accuracy_hint, tried=det.tried + [(s, 0.0) for s in old.tried],
                         scheme=1, attempts=det.attempts + len(old.tried))
    det.attempts += len(old.tried)
    return det


SYNC_THRESHOLD_V1 = 8.0
