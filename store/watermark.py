"""The invisible image watermark, scheme v3: a keyed, tiled spread-spectrum mark carrying a 64-bit payload (dataset id,
version, sample index) with a 32-bit keyed check, plus a fixed sinusoidal *synchronisation template* from which the
decoder estimates any rescale and rotation blindly (no list of factors), before it reads the payload.

Owns: embedding into 16-bit CT (HU + 1024) and 8-bit grey/RGB images, blind decoding from any bit depth after
windowing, JPEG, rescaling, rotation and cropping, and the acceptance rule (explicit sync threshold + keyed check).
Images marked with scheme v2 (``store/watermark_v2.py``) or v1 (``store/watermark_v1.py``) still decode. See
docs/watermark.md for the design, the distortion bound, the measured robustness and the false-accept bound.
No global random state: every pattern comes from a fixed key through a numpy Generator.

What v3 changes against v2 (same tile, cells, code and template frequencies; new key)
---------------------------------------------------------------------------------------
* *More payload energy within the same bound.* v2 added cells at +-c and the template at +-t with c + t = the max
  change (CT 6 + 8 = 14 HU), so the cells got 3/7 of it. v3 adds cells at +-5/7 and the template at +-4/7 of the
  max change and clips the sum to the max change (CT: cells 10 HU, template 8 HU, no pixel beyond 14 HU, as in
  v2). The cells carry (10/6)^2 = 2.8x the energy; clipping touches only pixels where a cell and a template crest
  share their sign, so the template loses little. Unattacked 256 px CT images, where v2's blind read was
  marginal, read with room to spare (docs/watermark.md).
* *A better-matched read filter.* The residual is normalised by a tighter local energy (Gaussian sigma 1 px instead
  of 1.5) and weighted by the inverse local *variance* (not standard deviation), which is the matched filter for a
  host whose noise power varies from pixel to pixel (edges, vessels, noisy regions); it is used for v3 and v2 reads.
* A new pattern key and check key, so a v3 mark is never mistaken for a v2 one: each read tests both the v3 and the
  v2 keyed check on the same folded residual (two 2^-32 chances per read in the false-accept bound).

Layout of the v3 mark (one 128x128 tile, repeated over the image)
-----------------------------------------------------------------
* *Cells*: a 32x32 grid of 4x4-pixel cells. 816 cells carry the 204 coded bits (each bit in 4 cells, XOR a keyed
  pseudo-noise sign); 208 cells are a fixed *pilot* that gives the tile phase.
* 204 coded bits = rate-1/2, K=7 convolutional code of 96 bits = 64 payload bits + a 32-bit keyed check
  (the first 4 bytes of sha256(key || payload)). Soft-decision Viterbi decoding.
* *Template*: v2's four sinusoids (0.12-0.14 cycles/px at 23, 69, 115 and 160 deg) with v2's phases, so one template
  search serves v3 and v2 copies.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import cv2
import numpy as np

from store import watermark_v1 as v1
from store import watermark_v2 as v2
from store.watermark_v1 import (CELL, FINDING_MARGIN_PX, GRID, K, N_CELLS, PAYLOAD_BITS, TILE, Payload,  # noqa: F401
                                _bits, _expand, apply_delta, conv_encode, dataset_id, keep_out_mask, payload_for,
                                payload_bits, to_grey_float, viterbi_decode)
from store.watermark_v2 import (_NOTCH, _NUDGES, _TEMPLATE, TEMPLATE_K, _describe, _fold, _nudge,  # noqa: F401
                                _warp_back, fold_spectrum, keyed_cells, keyed_check, peak_statistic, read_spectrum,
                                template_search, tiled_delta, viterbi_batch)

VERSION = 3
CHECK_BITS = 32
INFO_BITS = PAYLOAD_BITS + CHECK_BITS  # 96
CODED_BITS = 2 * (INFO_BITS + K - 1)  # 204
REPEAT = 4
N_DATA_CELLS = CODED_BITS * REPEAT  # 816
N_PILOT_CELLS = N_CELLS - N_DATA_CELLS  # 208

CT_AMPLITUDE_HU = 14  # max change of any CT pixel, HU: cells 10 + template 8, clipped to 14
U8_AMPLITUDE = 5  # max change of any 8-bit pixel, grey levels: cells 3 + template 3, clipped to 5
CELL_SHARE, TEMPLATE_SHARE = 5 / 7, 4 / 7  # of the max change (cells rounded down); the sum is clipped to it
SYNC_THRESHOLD = v2.SYNC_THRESHOLD  # 6: pilot correlation peak, standard deviations of the 128x128 surface
SYNC_THRESHOLD_V1 = v2.SYNC_THRESHOLD_V1
SCALE_RANGE = v2.SCALE_RANGE
ROTATION_RANGE_DEG = v2.ROTATION_RANGE_DEG
MAX_READS = 16  # payload reads per image at most (the false-accept bound counts them)
CHECKS_PER_READ = 2  # each read tests the v3 and the v2 keyed check
_KEY = 0x7061697266_6F726765_03  # "pairforge" + scheme 3
_CHECK_KEY = b"pairforge-watermark-v3-check"

SCHEME = (f"pairforge-ss-v3 (tile {TILE}px, cell {CELL}px, K={K} r=1/2 conv + 32-bit keyed check, {REPEAT}x "
          f"repetition, cells 5/7 + 4-peak DFT sync template 4/7 of the max change, clipped to it; "
          f"sync threshold {SYNC_THRESHOLD:g} sd)")


def _key_tables():
    rng = np.random.Generator(np.random.PCG64(_KEY))
    perm = rng.permutation(N_CELLS)
    pn = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=N_CELLS)
    return pn, perm[:N_DATA_CELLS], perm[N_DATA_CELLS:], np.arange(N_DATA_CELLS) % CODED_BITS


_PN, _DATA_CELLS, _PILOT_CELLS, _BIT_OF_CELL = _key_tables()
_pilot_cells = np.zeros(N_CELLS, np.float32)
_pilot_cells[_PILOT_CELLS] = _PN[_PILOT_CELLS]
_PILOT_TILE = _expand(_pilot_cells)
_PILOT_FFT_CONJ = np.conj(np.fft.rfft2(_PILOT_TILE))


# ---------------------------------------------------------------- keyed check
KEYS = v2.SchemeKeys(_PN, _DATA_CELLS, _BIT_OF_CELL, _PILOT_FFT_CONJ, _CHECK_KEY)


def check_bits(pbits: np.ndarray) -> np.ndarray:
    """32-bit keyed check of the 64 payload bits (v3 key): first 4 bytes of sha256(key || payload bytes)."""
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
    """Max total change -> (cell amplitude, template amplitude), integers: 5/7 rounded down and 4/7 rounded (each at
    least 1). CT 14 HU -> (10, 8); 8-bit 5 -> (3, 3); 4 -> (2, 2)."""
    a = int(amplitude)
    return max(1, int(np.floor(a * CELL_SHARE + 1e-9))), max(1, int(round(a * TEMPLATE_SHARE)))


def tile_delta(payload: Payload, amplitude: int) -> np.ndarray:
    """The integer TILE x TILE change of one tile: clip(cells * c + round(template * t), +-amplitude)."""
    c, t = split_amplitude(amplitude)
    d = (cell_pattern(payload) * c).astype(np.int32) + np.rint(_TEMPLATE * t).astype(np.int32)
    return np.clip(d, -int(amplitude), int(amplitude))


_TILE_CACHE: dict[tuple[int, int], np.ndarray] = {}


def image_delta(payload: Payload, height: int, width: int, amplitude: int) -> np.ndarray:
    return tiled_delta(tile_delta, _TILE_CACHE, payload, height, width, amplitude)


def embed(image: np.ndarray, payload: Payload, keep_out: np.ndarray | None = None,
          amplitude: int | None = None) -> np.ndarray:
    """Add the v3 mark to a uint16 CT image (HU + 1024) or a uint8 grey / RGB image; same dtype and shape back.

    Every pixel changes by at most ``amplitude`` (CT: 14 HU; 8-bit: 5 grey levels); pixels in ``keep_out`` (the
    findings, dilated) do not change at all.
    """
    return apply_delta(image, lambda h, w, amp: image_delta(payload, h, w, amp), keep_out, amplitude, CT_AMPLITUDE_HU,
                       U8_AMPLITUDE)


# ---------------------------------------------------------------- decoding
@dataclass
class Detection:
    found: bool  # sync score >= SYNC_THRESHOLD and the keyed check (v3, v2) / CRC (v1) passed
    payload: Payload | None
    bits: np.ndarray | None  # best-effort 64 payload bits (also when not found)
    sync_score: float  # pilot correlation peak, in standard deviations of the correlation surface
    scale: float  # estimated copy size / published size (0.5: the copy was downscaled by half)
    shift: tuple[int, int]  # tile phase (dy, dx)
    raw_bit_accuracy_hint: float = 0.0  # mean |soft| / std: a confidence figure
    tried: list = field(default_factory=list)  # hypotheses read: (scale, rotation deg)
    rotation: float = 0.0  # estimated rotation of the copy, degrees (counter-clockwise as cv2.getRotationMatrix2D)
    template_score: float = 0.0  # sum of the four capped template peak statistics at the hypothesis read
    scheme: int = VERSION  # 3; 2 or 1 for a copy of an image marked with an older scheme
    attempts: int = 0  # payload reads (each tests CHECKS_PER_READ keyed checks, each a 2^-32 chance)


def _residual(g: np.ndarray) -> np.ndarray:
    """Read filter: whiten (pixel minus its 8-neighbour mean), divide by the local residual energy (Gaussian sigma
    1 px, floored at half its median), clip at +-3, weight by the inverse relative local energy once more (so the
    weight is 1/variance, the matched filter for noise whose power varies over the image), whiten again."""
    r = v1._whiten(g)
    s = np.sqrt(cv2.GaussianBlur(r * r, (0, 0), 1.0)) + 1e-3
    med = float(np.median(s[::3, ::3]))  # a subsample: the median of a smooth map, at a ninth of the cost
    s = np.maximum(s, 0.5 * med)
    z = np.clip(r / s, -3.0, 3.0) * (med / s)
    return v1._whiten(z.astype(np.float32))


def read_folded(f: np.ndarray):
    """Folded residual tile(s) (..., 128, 128) -> (ok, payload bits, sync score, shift, confidence) per tile."""
    return read_spectrum(KEYS, *fold_spectrum(f))


def accepted(check_ok: bool, sync_score: float) -> bool:
    """The acceptance rule: the pilot correlation peak reaches SYNC_THRESHOLD sd AND the 32-bit keyed check matches."""
    return bool(check_ok) and float(sync_score) >= SYNC_THRESHOLD


def false_accept_bound(reads: int) -> float:
    """Upper bound on the chance that an unmarked image is accepted after ``reads`` payload reads.

    Each read accepts only a decoded word whose 32 check bits equal a keyed hash of its 64 payload bits; for an
    image that carries no mark the decoded word does not depend on the key, so each keyed check passes with
    probability 2^-32. A read tests CHECKS_PER_READ of them (v3 and v2); union bound over reads and checks (the
    sync threshold only lowers it further)."""
    return reads * CHECKS_PER_READ * 2.0 ** -CHECK_BITS


N_CANDIDATES = 24  # template hypotheses screened by their pilot correlation before any payload read


def _candidates(q: np.ndarray, top: int = N_CANDIDATES) -> list[tuple[np.ndarray, float]]:
    """The ``top`` best distinct (map A, template score) hypotheses of a peak-statistic map (v2's coarse grid, then
    one finer grid at 1/5 of a step on the bilinearly interpolated statistic)."""
    h, w = q.shape
    qc = np.minimum(q, v2._CAP)
    qm = cv2.dilate(qc, np.ones((3, 3), np.uint8))
    ls, th = v2._grid(h, w)
    pos = np.rint(v2._predict(v2._maps(ls, th), h, w)).astype(np.int64)
    r, c = pos[..., 0], pos[..., 1]
    inside = (r >= 1) & (r < h - 1) & (c >= 1) & (c < w - 1)
    score = np.where(inside, qm[np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)], 0.0).sum(axis=-1)
    dth = float(th[1] - th[0]) if len(th) > 1 else 0.01
    flat = score.ravel()
    order = np.argsort(flat)[::-1]
    taken: list[tuple[int, int]] = []
    out = []
    for k in order[:20 * top]:
        i, j = divmod(int(k), score.shape[1])
        if any(abs(i - a) <= 3 and abs(j - b) <= 3 for a, b in taken):
            continue
        taken.append((i, j))
        d_l = (ls[min(i + 1, len(ls) - 1)] - ls[max(i - 1, 0)]) / 2 if len(ls) > 1 else 0.01
        l0, t0 = ls[i], th[j]
        for frac in (0.2, 0.04):
            off = np.arange(-6, 7) * frac
            L, T = l0 + off * d_l, t0 + off * dth
            sf = v2._bilinear(qc, v2._predict(v2._maps(L, T), h, w)).sum(-1)
            a, b = np.unravel_index(int(np.argmax(sf)), sf.shape)
            l0, t0 = L[a], T[b]
        out.append((v2._maps(np.array([l0]), np.array([t0]))[0, 0], float(flat[k])))
        if len(out) >= top:
            break
    return out


_BLUR = None


def _pilot_score(f: np.ndarray, blur: bool = False) -> float:
    """Largest pilot correlation peak (v3 or v2 pilot), in sd of the correlation surface, of a folded residual;
    ``blur``: of the fold low-passed (Gaussian, sigma 1 px), which tolerates a larger misregistration."""
    global _BLUR
    F = np.fft.rfft2(f) * _NOTCH
    if blur:
        if _BLUR is None:
            fy = np.fft.fftfreq(TILE)[:, None]
            fx = np.fft.rfftfreq(TILE)[None, :]
            _BLUR = np.exp(-2 * (np.pi ** 2) * (fx ** 2 + fy ** 2)).astype(np.float32)
        F = F * _BLUR
    best = 0.0
    for conj in (_PILOT_FFT_CONJ, v2._PILOT_FFT_CONJ):
        corr = np.fft.irfft2(F * conj, s=(TILE, TILE))
        best = max(best, float((corr.max() - corr.mean()) / (corr.std() + 1e-12)))
    return best


def _fold_at(g: np.ndarray, A: np.ndarray) -> np.ndarray | None:
    w = _warp_back(g, A)
    return None if w.size == 0 else _fold(_residual(w))


def _read_fold(f: np.ndarray):
    """Read a folded residual as v3, then as v2: (scheme, accepted, bits, sync, shift, conf) of the better."""
    best = None
    spectrum = fold_spectrum(f)  # the same for both schemes: computed once
    for scheme, keys in ((3, KEYS), (2, v2.KEYS)):
        ok, pbits, score, shift, conf = read_spectrum(keys, *spectrum)
        res = (scheme, accepted(ok[0], score[0]), pbits[0], float(score[0]), tuple(int(v) for v in shift[0]),
               float(conf[0]))
        if res[1]:
            return res
        if best is None or res[3] > best[3]:
            best = res
    return best


FALLBACK_MAX_SIDE = 320  # copies at most this large also get the 1-D scans when the template path finds nothing
FALLBACK_READS = 4  # reads kept back for them
REFINED = 4  # screened hypotheses refined (and read when their pilot reaches the sync threshold), best first


def _screen(g: np.ndarray, hyps: list[tuple[np.ndarray, float]]) -> list:
    """(blurred pilot score, map, template score, fold) of each hypothesis, best first."""
    out = []
    for A, ts in hyps:
        f = _fold_at(g, A)
        if f is not None:
            out.append((_pilot_score(f, blur=True), A, ts, f))
    out.sort(key=lambda x: -x[0])
    return out


def _read_screened(g: np.ndarray, screened: list, max_reads: int, tried: list, best: list) -> Detection | None:
    """Refine the ``REFINED`` best screened hypotheses on a 3x3 (scale, rotation) neighbourhood by their sharp pilot
    score and read each (and, when refining moved it, the original too) whose pilot peak reaches SYNC_THRESHOLD (a
    read below it could not be accepted); stop at an accepted read or after ``max_reads`` reads. ``best`` holds the
    best unaccepted Detection so far."""
    # neighbourhood steps: about a third of the pilot's tolerance, which grows as the published frame shrinks
    step = 0.004 * 512.0 / max(64.0, float(max(g.shape)))
    seen = 0
    for rank, (sc_blur, A0, ts, f0) in enumerate(screened):
        if seen >= max_reads or rank >= REFINED:
            break
        sc0 = _pilot_score(f0)
        cand = (sc0, A0, f0)
        for ds in (-step, 0.0, step):
            for dt in (-25 * step, 0.0, 25 * step):
                if ds == 0.0 and dt == 0.0:
                    continue
                A = _nudge(A0, ds, dt)
                f = _fold_at(g, A)
                if f is not None:
                    sc = _pilot_score(f)
                    if sc > cand[0]:
                        cand = (sc, A, f)
        for sc, A, f in ([cand] if cand[1] is A0 else [cand, (sc0, A0, f0)]):
            # a read is accepted only with a pilot peak >= SYNC_THRESHOLD, and this is that peak: below it, no read
            if seen >= max_reads or sc < SYNC_THRESHOLD:
                continue
            scheme, ok, pbits, score, shift, conf = _read_fold(f)
            seen += 1
            s, rot = _describe(A)
            tried.append((round(s, 4), round(rot, 3)))
            value = int("".join(map(str, pbits)), 2)
            det = Detection(ok, Payload.from_value(value) if ok else None, pbits, score, s, shift, conf,
                            rotation=rot, template_score=ts, scheme=scheme)
            if ok:
                return det
            if not best or score > best[0].sync_score:
                best[:] = [det]
        if not best or cand[0] > best[0].sync_score:  # not read: its pilot score is still the best-effort figure
            s, rot = _describe(cand[1])
            best[:] = [Detection(False, None, None, cand[0], s, (0, 0), rotation=rot, template_score=ts)]
    return None


def _line_hypotheses(h: int, w: int) -> list[tuple[np.ndarray, float]]:
    """The two 1-D families users apply most, at steps within the blurred pilot's tolerance: a pure rescale (every
    scale in SCALE_RANGE, no rotation) and a pure rotation (every angle within +-ROTATION_RANGE_DEG, scale 1)."""
    m = float(max(h, w))
    ls = [np.log(SCALE_RANGE[0])]
    while ls[-1] < np.log(SCALE_RANGE[1]):
        ls.append(ls[-1] + 2.4 * np.exp(ls[-1]) / m)  # the published frame is m / s px: 1.2 px at its edge
    rot = np.deg2rad(ROTATION_RANGE_DEG)
    th = np.arange(-rot, rot + 1e-9, 2.4 / m)
    return ([(v2._maps(np.array([x]), np.zeros(1))[0, 0], 0.0) for x in ls]
            + [(v2._maps(np.zeros(1), np.array([t]))[0, 0], 0.0) for t in th])


def decode_v3(image: np.ndarray, max_reads: int = MAX_READS) -> Detection:
    """Blind decode: template search -> ``N_CANDIDATES`` hypotheses (and the copy as it is) screened by their pilot
    correlation (no keyed check involved) -> the best, each refined on a 3x3 neighbourhood by the same score, read
    in that order (each read tests the v3 and the v2 keyed check). A small copy (side <= FALLBACK_MAX_SIDE) where
    that finds nothing is then screened along a pure rescale and a pure rotation. At most ``max_reads`` reads."""
    g = to_grey_float(image)
    if min(g.shape) < 32:
        return Detection(False, None, None, 0.0, 1.0, (0, 0))
    q = peak_statistic(g)
    cands = _candidates(q)
    small = max(g.shape) <= FALLBACK_MAX_SIDE
    tried: list = []
    best: list = []
    det = _read_screened(g, _screen(g, [(np.eye(2), 0.0)] + cands),
                         max_reads - (FALLBACK_READS if small else 0), tried, best)
    if det is None and small:
        det = _read_screened(g, _screen(g, _line_hypotheses(*g.shape))[:2], max_reads - len(tried), tried, best)
    if det is None:
        det = best[0] if best else Detection(False, None, None, 0.0, 1.0, (0, 0),
                                             template_score=cands[0][1] if cands else 0.0)
    det.tried, det.attempts = tried, len(tried)
    return det


def decode(image: np.ndarray) -> Detection:
    """Find the mark in an image of any dtype (16-bit CT, 8-bit windowed, JPEG'd, rescaled, rotated, cropped).

    Schemes v3 and v2 (one template search, each read tested against both keyed checks); then scheme v1 (older
    versions), accepted only with its CRC-16 AND a pilot correlation of at least ``SYNC_THRESHOLD_V1`` sd.
    """
    det = decode_v3(image)
    if det.found:
        return det
    old = v1.decode(image)
    if old.found and old.sync_score >= SYNC_THRESHOLD_V1:
        return Detection(True, old.payload, old.bits, old.sync_score, old.scale, old.shift,
                         old.raw_bit_accuracy_hint, tried=det.tried + [(s, 0.0) for s in old.tried],
                         scheme=1, attempts=det.attempts + len(old.tried))
    det.attempts += len(old.tried)
    return det
