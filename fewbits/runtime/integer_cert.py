"""The certified fast epilogue of the integer engine's VNNI layers (``fbi_conv.cert``,
``epi512_cert`` in ``_integer_engine.c``).

The exact epilogue turns a channel's int32 sum ``x`` into its code in ~15 vector operations
(convert, ``* sacc`` (``+ bias``), ReLU, batch norm's FMA, the value clamp, ``- sub``, the
division, rounding half away from zero, code offset, code clamp). Each is monotone in ``x``,
and without rounding their composition is affine: ``t*(x) = A x + B0``. The fast epilogue
evaluates ``t2 = fl(fma(float(clamp(x, lo, hi)), A2, B2))`` with ``A2``, ``B2`` float32
roundings of ``A`` and ``B0 + 1/2 - M``, and takes ``floor(t2)`` as the code wherever
``t2 - floor(t2) < thr = 1 - 2 M``; any other lane of a tile sends the tile to the exact
epilogue. Every code equals the exact epilogue's, by the proof below (``certify``); where the
proof's conditions fail, the layer keeps the exact epilogue (``cert`` NULL).

Notation: ``u = 2^-24`` (float32 unit roundoff), ``eta = 2^-150`` (half the smallest
subnormal); a float32 operation on a real result ``z`` returns ``fl(z)`` with ``|fl(z) - z| <=
u |z| + eta`` (no overflow: every magnitude below is checked under ``2^100``). All constants
are exact rationals (``Fraction`` of the float32 parameters); only ``A2``, ``B2`` and ``thr``
are rounded, and their rounding errors are measured exactly, not estimated.

1. The exact epilogue (``epi512_v_k``, the generic path's ``pre_value`` / ``rha_code``: the
   same IEEE operations) on a float32 sum ``x`` (an integer ``|x| < 2^24``: exact), without
   its clamps: ``p = fl(x s)``, ``w = fl(p + b)`` (``w = p`` without bias), ``w' = max(w, 0)``
   (a ReLU before the batch norm; only without bias, where ``max(fl(x s), 0) = fl(max(x, 0)
   s)`` for ``s > 0``: the ReLU is ``x -> max(x, 0)`` on the integers), ``v = fl(w' alpha +
   beta)`` (one rounding: FMA), ``d = fl(v - sub)``, ``q = fl(d / scale)`` (``vdivps``, or the
   reciprocal multiply proven equal to it, or ``* inv`` with ``inv = 1 / scale`` exact: the
   same bound). ``Y = q + kofs - sh`` (``sh``: the u8 maps' shift, else 0); ``rha(Y)``
   below stands for ``rha(q) + kofs - sh``, monotone in ``Y`` and the integer nearest ``Y``
   wherever ``Y`` is no half-integer. The exact code is ``clamp(rha(Y), Klo, Khi)`` where
   ``Klo`` / ``Khi`` (shifted by ``sh``) are the exact epilogue's codes of ``clo`` / ``chi``
   (``fbi_quantize``: the code clamp included): each stage is monotone, so the value clamp
   ``[clo, chi]``, then the code clamp ``[klo, khi]``, of the monotone code equals a clamp of
   the unclamped code to the codes of the bounds (for monotone ``f`` and ``lo <= hi``,
   ``f(med(lo, v, hi)) = med(f(lo), f(v), f(hi))``), whether ``alpha`` is positive or
   negative (the code is then non-increasing in ``x``).
2. Over the clamp range ``[lo, hi]`` of the sums, with ``X = max(|lo|, |hi|)`` and the
   maxima over the range's ends of the affine magnitudes (``W = max |x s + b|``, ``V = max
   |alpha (x s + b) + beta|``, ``D = max |alpha (x s + b) + beta - sub|``):
   ``|p - x s| <= e1 = u X s + eta``; ``|w - (x s + b)| <= e2 = e1 + u (W + e1) + eta``
   (``e1`` without bias); ``|v - (alpha (x s + b) + beta)| <= e3 = |alpha| e2 + u (V +
   |alpha| e2) + eta`` (the ReLU is 1-Lipschitz); ``|d - (...) + sub| <= e4 = e3 + u (D +
   e3) + eta``; ``|q - (alpha (x s + b) + beta - sub) / scale| <= e5 = e4 / scale + u (D +
   e4) / scale + eta``. So ``|Y - t*(x)| <= e5`` with ``A = alpha s / scale``, ``B0 =
   (alpha b + beta - sub) / scale + kofs - sh``.
3. The fast value: ``|t2 - (t*(x) + 1/2 - M)| <= eT = |A2 - A| X + |B2 - (B0 + 1/2 - M)| +
   u max |A2 x + B2| + eta`` (the FMA rounds once; the max over the range's ends).
   With ``E = e5 + eT < M``: ``|t2 - (Y + 1/2 - M)| <= E``. Where ``n = floor(t2)`` and
   ``t2 - n < thr <= 1 - 2M``: ``Y >= n - 1/2 + (M - E) > n - 1/2`` and ``Y < n + 1/2 - (M -
   E)``: ``n`` is the integer nearest ``Y``, unique, so ``rha(Y) = n`` (no tie there).
4. The clamp ``[lo, hi]`` of the sums: at each end the last sum whose ``t*`` still lies
   beyond the end code's inner boundary by ``M`` (``t*(lo) <= Klo + 1/2 - M`` where the code
   increases with ``x``; the other three cases alike), within the feasible sums where they
   end sooner. Where the sums reach below ``lo``: ``t*(lo) + e5 < Klo + 1/2`` gives
   ``rha(Y) <= Klo``, so the exact
   code at ``lo`` is ``Klo``, the end of the code range; the exact code is monotone and
   cannot pass that end, so every sum below ``lo`` has the code of ``lo``, the fast code of
   its clamped sum. On ``[lo, hi]`` the fast code is ``rha(Y)``; where ``t*`` stays within
   the code range's cells there (``t* - e5 > Klo - 1/2``, ``t* + e5 < Khi + 1/2`` at the
   ends) that is the exact code, else (a code step wider than a sum step: the ends' sums
   may lie outside the cells) the fast codes are clamped to ``[Klo, Khi]`` too (``cclamp``,
   two more operations per vector). ``|t*| + 1 < 2^30`` there: the conversion stays in int32
   (and ``floor``, ``frac`` exact). A constant code: ``alpha = 0`` (the code of ``beta``:
   ``fma(w, 0, beta) = beta``), or every feasible sum beyond one end code (the bound at the
   nearest feasible sum puts it there): ``A2 = 0``, ``B2 = code + 1/2``, thr 1.

5. No check (``cnocheck``): where every channel passes, the kernels skip the check (a
   third of the fast epilogue's cost). Every sum of ``[lo, hi]`` whose ``t*`` lies within
   ``8M`` of a rounding boundary (a float64 evaluation, with its own error as slack: a few
   sums per channel) runs through both epilogues here (``fbi_epi_sums``: the generic exact
   one, the fast one unchecked) and must give the same code; ``A2`` (within 3 float32 steps
   of ``A``'s rounding, fewer where the bound below needs it) and ``B2`` (within ``M`` of
   ``B0 + 1/2``) are searched until they do. Every other sum is at least ``8M`` from a
   boundary, and ``e5 + M + eT' < 8M`` (``eT'`` bounding every ``A2``, ``B2`` tried) keeps
   ``t2`` inside the cell of ``rha(Y)``: ``floor`` gives it. (Exact ties fit too: a slope a
   step steeper than ``A`` sends both signs' ties away from zero.) Where a channel finds no
   such pair (near-ties that no line within reach separates), the layer keeps the check.

The feasible sums (``Conv.acc_range``) come from the weights and the input codes' range (0
included: zero padding). The margin ``M``: a float64 pass guesses ``E`` (margin ``2^-10``),
``M = E (1 + 2^-6) + u (|B0| + 1) + 2^-40`` (room for ``B2``'s rounding to change with
``M``); an exact pass on the range ``M`` gives must find ``E < M``, else ``M = (E + u (|B0| +
1)) (1 + 2^-8) + 2^-40`` and again (three exact passes at most). With the check, the lanes
that fall back are those within ``~2M`` of a rounding boundary (``M ~ 7e-5`` on min-max's
ResNet-23: 0.6 % of its tiles).

Off (the exact epilogue, ``None``): not VNNI, a float output, the fold (one FMA already), a
float input (its float sums are no integers; its NaN check), no ``acc_range``, a ReLU with a
bias, non-finite or unbounded clamps (``|(c - sub) / scale| >= 2^30``: the exact path may then
convert out of int32's range), ``sacc <= 0``, sums beyond ``2^24`` on the clamp range, a
margin over ``2^-10`` (too loose to pay: most tiles would fall back), or any failed check
above. Cost: one exact pass per channel (``Fraction``), after a float64 pass that guesses the
margin, and the few evaluations of step 5: ~0.3 s for min-max's ResNet-23 (768 channels).
"""

from __future__ import annotations

import ctypes
import math
from fractions import Fraction
from typing import Any

import numpy as np

from .integer_plan import Conv

__all__ = ["attach_cert", "certify"]

_U = Fraction(1, 2**24)
_ETA = Fraction(1, 2**150)
_BIG = Fraction(2**100)


def _f32(v: Any) -> Any:
    """``v`` rounded to float32, as a ``Fraction`` (a float for a float)."""
    f = float(np.float32(float(v)))
    return f if isinstance(v, float) else Fraction(f)


def _floor_f32(v: Fraction) -> float:
    """The largest float32 ``<= v``."""
    f = np.float32(float(v))
    while Fraction(float(f)) > v:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


def _e5(lo: int, hi: int, s: Fraction, b: Fraction, al: Fraction, be: Fraction, q: dict
        ) -> Fraction | None:
    """The bound ``e5`` on ``|Y - t*(x)|`` over the sums ``[lo, hi]`` (docstring, step 2), or
    None where a magnitude there could overflow."""
    sub, scale = q["sub"], q["scale"]
    x = max(abs(lo), abs(hi))
    ws = [lo * s + b, hi * s + b] if lo != hi else [lo * s + b]
    vs = [al * w + be for w in ws]
    w_, v_, d_ = max(map(abs, ws)), max(map(abs, vs)), max(abs(v - sub) for v in vs)
    if max(x * s, w_, v_, d_, d_ / scale) > _BIG:
        return None
    e1 = _U * x * s + _ETA
    e2 = e1 + _U * (w_ + e1) + _ETA if q["bias"] else e1
    e3 = abs(al) * e2 + _U * (v_ + abs(al) * e2) + _ETA
    e4 = e3 + _U * (d_ + e3) + _ETA
    return e4 / scale + _U * (d_ + e4) / scale + _ETA


def _channel(x0: int, x1: int, s: Fraction, b: Fraction, al: Fraction, be: Fraction,
             q: dict) -> tuple | None:
    """``(lo, hi, A2, B2, thr, cells, proof)`` of one channel whose feasible sums (after a
    ReLU) are ``[x0, x1]``, or None where the proof fails (the module docstring, steps 2-4);
    ``cells``: the codes on ``[lo, hi]`` stay within the code range without the code clamp;
    ``proof``: ``(A, B0, M, e5, A2)`` for ``_no_check`` (None: a constant code)."""
    sub, scale, ofs, klo, khi = q["sub"], q["scale"], q["ofs"], q["klo"], q["khi"]
    a_ = al * s / scale
    b0 = (al * b + be - sub) / scale + ofs
    half = Fraction(1, 2)
    # a float64 pass guesses the margin (the exact passes below prove it)
    fq = {k: float(v) if isinstance(v, Fraction) else v for k, v in q.items()}
    guess = _pass(2.0**-10, x0, x1, float(s), float(b), float(al), float(be), fq)
    m = Fraction(1, 2**10) if guess is None or len(guess) != 6 else \
        Fraction(guess[-1]) * (1 + Fraction(1, 2**6)) + _U * (abs(b0) + 1) + Fraction(1, 2**40)
    for _ in range(3):
        r = _pass(m, x0, x1, s, b, al, be, q)
        if r is None or len(r) != 6:  # no proof, or a constant channel's constants
            return r
        lo, hi, e5, a2, b2, err = r
        if err < m:
            if m > Fraction(1, 2**10):  # too loose to pay: most tiles would fall back
                return None
            t_lo, t_hi = a_ * lo + b0, a_ * hi + b0
            up, down = (t_hi, t_lo) if a_ > 0 else (t_lo, t_hi)  # t* at the high / low code
            # the sums beyond the range: the exact code there is the code range's end
            if x0 < lo and not (t_lo + e5 < klo + half if a_ > 0 else t_lo - e5 > khi - half):
                return None
            if x1 > hi and not (t_hi - e5 > khi - half if a_ > 0 else t_hi + e5 < klo + half):
                return None
            # on the range: Y within the code range's cells (the code clamp idle)?
            cells = down - e5 > klo - half and up + e5 < khi + half
            return lo, hi, float(a2), float(b2), _floor_f32(1 - 2 * m), cells, \
                (a_, b0, m, e5, a2)
        # the next margin: this bound, plus room for B2's rounding to change with it
        m = (err + _U * (abs(b0) + 1)) * (1 + Fraction(1, 2**8)) + Fraction(1, 2**40)
    return None


def _pass(m: Any, x0: int, x1: int, s: Any, b: Any, al: Any, be: Any, q: dict) -> Any:
    """One pass of ``_channel`` at margin ``m``, exact on ``Fraction`` arguments (a float64
    guess on floats): ``(lo, hi, e5, A2, B2, E)``; else a constant channel's tuple or None
    (docstring, steps 2-4)."""
    sub, scale, ofs, klo, khi = q["sub"], q["scale"], q["ofs"], q["klo"], q["khi"]
    a_ = al * s / scale
    b0 = (al * b + be - sub) / scale + ofs
    half = 0.5 if isinstance(m, float) else Fraction(1, 2)
    # the sums' clamp: the last sum of the end code at each end (the exact code is the
    # range's end there and beyond; docstring, step 4)
    if a_ > 0:
        ca, cb = math.floor((klo + half - m - b0) / a_), math.ceil((khi - half + m - b0) / a_)
    else:
        ca, cb = math.floor((khi - half + m - b0) / a_), math.ceil((klo + half - m - b0) / a_)
    cb = max(ca, cb)
    lo, hi = min(max(x0, ca), cb), max(min(x1, cb), ca)
    if lo == hi and not x0 <= lo <= x1:
        # every feasible sum beyond one end code: the code is that end's wherever the
        # exact code at the nearest feasible sum is (monotone); a constant, as alpha = 0
        xe = min(max(lo, x0), x1)
        e5 = _e5(xe, xe, s, b, al, be, q)
        t, far = a_ * xe + b0, [a_ * x0 + b0, a_ * x1 + b0]  # the others lie further out
        code = None if e5 is None else khi if t - e5 > khi - half and t == min(far) else \
            klo if t + e5 < klo + half and t == max(far) else None
        return None if code is None else (0, 0, 0.0, code + 0.5, 1.0, True, None)
    if q["relu"] and lo < 0 and lo != hi:
        return None
    x = max(abs(lo), abs(hi))
    e5 = _e5(lo, hi, s, b, al, be, q)
    if x >= 2**24 or e5 is None or abs(a_) * x + abs(b0) + 2 > 2**30:
        return None
    a2, target = _f32(a_), b0 + half - m
    b2 = _f32(target)
    e_t = abs(a2 - a_) * x + abs(b2 - target) + \
        _U * max(abs(a2 * lo + b2), abs(a2 * hi + b2)) + _ETA
    return lo, hi, e5, a2, b2, e5 + e_t


def certify(s: Conv, a: Any, lib: Any) -> np.ndarray | None:
    """The five arrays of ``fbi_conv.cert`` (float32, ``5 * stride``; lo / hi as int32 bits),
    then int32 the code range's ends (shifted as stored), 1 where the codes need that clamp
    (``cclamp``) and 1 where no check is needed (``cnocheck``), for conv ``s`` with its
    ``_ConvArgs`` ``a`` (final: after the u8 maps are linked); None where the layer keeps the
    exact epilogue (the module docstring says when)."""
    if s.quant is None or s.float_in or s.acc_range is None or a.fold or a.out_kind != 0 or \
            a.isa != 2 or (s.pre_relu and s.bias.any()):  # isa 2: ISA_AVX512_VNNI
        return None
    f32 = np.float32
    params = [s.sacc, s.bias, s.alpha, s.beta]
    if not all(np.isfinite(v).all() for v in params) or not (s.sacc > 0).all() or \
            not (s.sacc <= 2.0**90).all() or not 0 < a.scale < math.inf:
        return None
    scale, sub = Fraction(float(f32(a.scale))), Fraction(float(f32(a.sub)))
    if not all(math.isfinite(c) and abs((Fraction(c) - sub) / scale) < 2**30
               for c in (float(f32(a.clo)), float(f32(a.chi)))):
        return None
    ends = np.array([a.clo, a.chi], f32)
    codes = np.zeros(2, np.int16)
    lib.fbi_quantize(ctypes.byref(a), 2, ends.ctypes.data, codes.ctypes.data)
    sh = a.u8shift if a.out_u8 else 0
    klo, khi = int(codes[0]) - sh, int(codes[1]) - sh
    if klo > khi or (a.out_u8 and (klo < 0 or khi > 255)):
        return None
    q = dict(sub=sub, scale=scale, ofs=a.kofs - sh, klo=klo, khi=khi, relu=s.pre_relu,
             bias=bool(s.bias.any()))
    cout = len(s.sacc)
    stride = -(-cout // 16) * 16 + 16
    out = np.zeros(5 * stride + 16, f32)
    ints = out.view(np.int32)
    out[4 * stride:5 * stride] = 1.0
    cells, proofs = True, [None] * cout
    for c in range(cout):
        x0, x1 = (int(v) for v in s.acc_range[c])
        if s.pre_relu:
            x0, x1 = max(x0, 0), max(x1, 0)
        al = Fraction(float(s.alpha[c]))
        if al == 0:  # the code of beta whatever the sum (fma(w, 0, beta) = beta)
            be = np.array([s.beta[c]], f32)
            lib.fbi_quantize(ctypes.byref(a), 1, be.ctypes.data, codes.ctypes.data)
            out[3 * stride + c] = float(int(codes[0]) - sh) + 0.5
            continue
        ch = _channel(x0, x1, Fraction(float(s.sacc[c])), Fraction(float(s.bias[c])), al,
                      Fraction(float(s.beta[c])), q)
        if ch is None:
            return None
        ints[c], ints[stride + c] = ch[0], ch[1]
        out[2 * stride + c], out[3 * stride + c], out[4 * stride + c] = ch[2:5]
        cells &= ch[5]
        proofs[c] = ch[6]
    # the code range, and whether the codes need clamping to it (a channel whose code step
    # is wider than its sums' step: no sum of its end codes lies inside their cells)
    ints[5 * stride:5 * stride + 3] = klo, khi, int(not cells)
    ints[5 * stride + 3] = int(_no_check(a, out, proofs, lib))
    return out


#: the fast constants ``_no_check`` tries: A2 moved by these float32 steps, B2 by these
#: fractions of the margin M (A2's rounding first, B2 nearest B0 + 1/2 - M first); the sums
#: it runs: those within _NEAR M of a rounding boundary
_A_STEPS = (0, -1, 1, -2, 2, -3, 3)
_NEAR = 8
#: the most lanes (rows x channels) of the sums' matrix _no_check runs, 17 MiB per try
_MAX_LANES = 2**22
_B_SHIFTS = [k / 8 for k in (8, 6, 4, 2, 0, -2, -4, -6, -8, 7, 5, 3, 1, -1, -3, -5, -7)]


def _no_check(a: Any, out: np.ndarray, proofs: list, lib: Any) -> bool:
    """Whether every sum of ``[lo, hi]`` of every channel gets its exact code from the fast
    formula with no check (docstring, step 5); then ``out``'s ``A2`` / ``B2`` are the ones
    that were verified, else ``out`` is unchanged."""
    cout, stride = len(proofs), (len(out) - 16) // 5
    ints, half = out.view(np.int32), Fraction(1, 2)
    near, total, steps = [], 0, max(_A_STEPS)
    for c, p in enumerate(proofs):
        if p is None:  # a constant code: B2 = code + 1/2 exactly, floor(t) = code
            near.append(np.zeros(0, np.int64))
            continue
        a_, b0, m, e5, a2 = p
        lo, hi = int(ints[c]), int(ints[stride + c])
        x = max(abs(lo), abs(hi))
        # every A2, B2 tried: |A2 - A| <= |a2 - A| + `steps` ulps, |B2 - (B0 + 1/2)| <= M;
        # as many A2 steps as leave room
        ulp = Fraction(float(np.spacing(np.abs(np.float32(a2))))) * 2
        while steps >= 0:
            e_t = (abs(a2 - a_) + steps * ulp) * x + \
                _U * (abs(a2) * x + steps * ulp * x + abs(b0) + 1 + m) + _ETA
            if e5 + m + e_t < _NEAR * m:
                break
            steps -= 1
        total += hi - lo + 1
        if steps < 0 or total > 2**22:  # no room, or too many sums to look at
            return False
        xs = np.arange(lo, hi + 1, dtype=np.int64)
        t = float(a_) * xs + float(b0)  # float64: within slack of t*
        slack = 2.0**-48 * (abs(float(a_)) * x + abs(float(b0)) + 1)
        near.append(xs[np.abs(t - np.floor(t) - 0.5) < float(_NEAR * m) + slack])
    rows = max([1] + [len(v) for v in near])
    # the sums run as a rows x cout matrix (each channel's padded to the longest): `total`
    # bounds the sums, not the matrix (one channel near a boundary on 2^22 sums beside many
    # of one sum each: rows * cout ~ 2^22 cout, gigabytes and seconds per try)
    if rows * cout > _MAX_LANES:
        return False
    acc = np.stack([np.resize(v, rows) if len(v) else np.full(rows, ints[c], np.int64)
                    for c, v in enumerate(near)], 1).astype(np.int32)
    want = np.zeros(acc.shape, np.uint8 if a.out_u8 else np.int16)
    got = want.copy()
    if lib.fbi_epi_sums(ctypes.byref(a), rows, acc.ctypes.data, want.ctypes.data, 3) < 0:
        return False
    saved = out[2 * stride:4 * stride].copy()
    a.cert, a.cert_stride = out.ctypes.data, stride  # fbi_epi_sums reads these arrays
    done = np.array([p is None for p in proofs])
    live = [c for c in range(cout) if not done[c]]
    a2s = np.array([float(proofs[c][4]) for c in live], np.float32)
    b0s = np.array([float(proofs[c][1] + half) for c in live])
    ms = np.array([float(proofs[c][2]) for c in live])
    try:
        for da in (d for d in _A_STEPS if abs(d) <= steps):
            a2n = a2s.copy()
            for _ in range(abs(da)):
                a2n = np.nextafter(a2n, np.float32(np.inf if da > 0 else -np.inf))
            for k in _B_SHIFTS:
                b2n = (b0s - ms * k).astype(np.float32)
                fits = np.abs(b2n.astype(np.float64) - b0s) <= ms * (1 - 2.0**-20)
                todo = [i for i, c in enumerate(live) if not done[c] and fits[i]]
                if not todo:
                    continue
                for i in todo:
                    out[2 * stride + live[i]], out[3 * stride + live[i]] = a2n[i], b2n[i]
                if lib.fbi_epi_sums(ctypes.byref(a), rows, acc.ctypes.data, got.ctypes.data,
                                    2) < 0:  # no VNNI here: nothing verified
                    out[2 * stride:4 * stride] = saved
                    return False
                same = (got == want).all(0)
                for i in todo:
                    done[live[i]] = same[live[i]]
                if done.all():
                    return True
        out[2 * stride:4 * stride] = saved
        return False
    finally:
        a.cert, a.cert_stride = None, 0


def attach_cert(s: Conv, a: Any, keep: list, lib: Any) -> None:
    """Set ``a.cert`` (kept alive in ``keep``) where ``certify`` proves the fast epilogue."""
    arr = certify(s, a, lib)
    if arr is not None:
        keep.append(arr)
        a.cert, a.cert_stride = arr.ctypes.data, (len(arr) - 16) // 5
