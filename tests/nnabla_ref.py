"""An independent NumPy float32 model of what NNabla's CIFAR-10 quantization example computes at
test time, and writers of its parameter files, for tests/test_nnabla.py.

Written from the sources, not from fewbits:
- scopes and layer order: sony/nnabla-examples compression/cifar10/quantization/models.py
  (``cifar10_*_resnet23_prediction``, ``test=True``);
- parameter names, shapes and creation order: nnabla/parametric_functions.py
  (``@parametric_function_api`` scopes; ``min_max_quantize(..., name="min_max_quantize_w")``);
- kernels (src/nbla/function/generic/*.cpp): ``BatchNormalization::forward_impl_global``
  (``(x - mean) * gamma / sqrt(var + eps) + beta``), ``Sign`` (0 -> quantize_zero_to = 1),
  ``BinaryTanh`` (``x > 0 ? 1 : -1``), ``BinaryWeight*`` (alpha = sum|W| * (1 / n), W laid
  out (in, out) for affine), ``FixedPointQuantize`` (``int(|x| / delta + 0.5) * delta`` with the
  sign, clipped to ``+-(2**(n-1) - 1) * delta``), ``Pow2Quantize`` (``2**round(log2|x|)``,
  thresholds in float), ``INQConvolution`` (levels of the fixed entries from max|W|, float
  log2), ``MinMaxQuantize`` (nudged range and zero point, ``std::round``);
- file layout: nnabla/utils/get_file_handle.py (h5 datasets with ``need_grad`` and ``index``
  attributes; ``.nnp`` zip of ``network.nntxt`` and ``parameter.h5`` / ``parameter.protobuf``)
  and nnabla.proto (``NNablaProtoBuf.parameter = 200``; ``Parameter``: name 1, shape 20,
  data 100 packed floats, need_grad 101; ``Shape.dim`` 1 packed int64).
"""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np

F32 = np.float32
SCOPES = {  # family -> (conv scope, affine scope)
    "float": ("conv", "affine"), "binary_connect": ("bicon_conv", "bicon_affine"),
    "binary_net": ("bicon_conv", "bicon_affine"), "binary_weight": ("bwn_conv", "bwn_affine"),
    "fp_connect": ("fp_quantized_conv", "fp_quantized_affine"),
    "fp_net": ("fp_quantized_conv", "fp_quantized_affine"),
    "pow2_connect": ("pow2_quantized_conv", "pow2_quantized_affine"),
    "pow2_net": ("pow2_quantized_conv", "pow2_quantized_affine"),
    "inq": ("inq_conv", "inq_affine"),
    "min_max": ("min_max_quantized_conv", "min_max_quantized_affine"),
}
FAMILIES = tuple(SCOPES)
UNITS = [("conv2", False), ("conv3", True), ("conv4", False), ("conv5", True),
         ("conv6", False), ("conv7", True), ("conv8", False)]
N_BITS, DELTA, M_POW2, QL_MIN, QL_MAX = 8, 2.0 ** -4, 1, 0, 255
# min-max ranges with power-of-two scales (weights 2**-6, activations 2**-5), so that sums of
# products of quantized values are exact in float32 whatever their order
W_RANGE = (F32(-2.0), F32(-2.0 + 255 * 2.0 ** -6))
A_RANGE = (F32(-4.0), F32(-4.0 + 255 * 2.0 ** -5))


def net_name(family: str) -> str:
    return "cifar10_resnet23_prediction" if family == "float" else \
        f"cifar10_{family}_resnet23_prediction"


# ----------------------------------------------------------------------------- kernels

def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's std::round, exactly: trunc, plus the sign where the remainder is >= 0.5."""
    t = np.trunc(v)
    return (t + np.sign(v) * (np.abs(v - t) >= 0.5)).astype(v.dtype)


def sign(w):
    return np.where(w > 0, F32(1), np.where(w < 0, F32(-1), F32(1))).astype(F32)


def binary_tanh(x):
    return np.where(x > 0, F32(1), F32(-1)).astype(F32)


def fixed_point(x, n=N_BITS, delta=DELTA):
    delta = F32(delta)
    mx = F32((2.0 ** (n - 1) - 1) * delta)
    q = np.floor(np.abs(x) / delta + F32(0.5)).astype(F32) * delta
    q = np.where(x < 0, -q, q)
    return np.where(x > mx, mx, np.where(x < -mx, -mx, q)).astype(F32)


def pow2(x, n=N_BITS, m=M_POW2, with_zero=False):
    nb = n - 1 - (1 if with_zero else 0)
    p_max, p_min = F32(2.0 ** m), F32(2.0 ** (m - ((1 << nb) - 1)))
    thr = F32(float(p_min) * 2.0 ** -0.5)
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        q = np.power(F32(2), round_half_away(np.log2(a))).astype(F32)
    q = np.where(q > p_max, p_max, q)
    low = q < p_min
    q = np.where(low, (np.where(a < thr, F32(0), p_min) if with_zero else p_min), q)
    return np.where(x < 0, -q, q).astype(F32)


def inq_levels(w, num_bits=4):
    a = np.abs(w)
    s = F32(a.max()) if a.max() != 0 else F32(1)
    ls = np.log2(s)
    n1 = int(np.floor(ls) + ((float(ls) - np.floor(float(ls))) >= np.log2(1.5)))
    n2 = n1 + 1 - 2 ** (num_bits - 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.log2(a).astype(F32)
        fb = np.floor(b)
        e = np.clip(fb + ((b - fb) >= F32(0.58496250072115619)), n2, n1)
    e = np.where(np.isfinite(e), e, n2)
    lv = np.ldexp(np.where(w < 0, F32(-1), F32(1)), e.astype(np.int64)).astype(F32)
    return np.where(a < F32(2.0 ** (n2 - 1)), F32(0), lv).astype(F32)


def min_max(x, qr_min, qr_max, ql_min=QL_MIN, ql_max=QL_MAX, eps=0.01):
    qr_min, qr_max = F32(qr_min), F32(qr_max)
    qlmin, qlmax = F32(ql_min), F32(ql_max)
    if qr_max - qr_min < F32(eps):
        qr_max = F32(qr_min + F32(eps))
    scale = F32((qr_max - qr_min) / (qlmax - qlmin))
    zpf = F32(qlmin - qr_min / scale)
    zp = qlmin if zpf <= qlmin else qlmax if zpf >= qlmax else round_half_away(np.array(zpf))
    lo, hi = F32((qlmin - zp) * scale), F32((qlmax - zp) * scale)
    y = round_half_away(((np.minimum(np.maximum(x, lo), hi) - lo) / scale).astype(F32))
    return (y * scale + lo).astype(F32)


def batch_norm(x, beta, gamma, mean, var, eps=1e-5):
    return (((x - mean) * gamma) / np.sqrt(var + F32(eps)) + beta).astype(F32)


def conv2d(x, w):
    k = w.shape[-1]
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    n, c, h, wd = x.shape
    cols = np.stack([xp[:, :, i:i + h, j:j + wd] for i in range(k) for j in range(k)], axis=2)
    cols = cols.transpose(0, 3, 4, 1, 2).reshape(n * h * wd, c * k * k)  # im2col
    out = cols @ w.reshape(w.shape[0], -1).T
    return np.ascontiguousarray(out.reshape(n, h, wd, -1).transpose(0, 3, 1, 2), F32)


def max_pool(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


# ----------------------------------------------------------------------------- parameters

class Params:
    """NNabla's parameters of one network, in creation order: name -> (array, need_grad)."""

    def __init__(self, family, rng):
        self.family, self.rng, self.p = family, rng, {}
        self.conv_scope, self.affine_scope = SCOPES[family]

    def add(self, name, a, need_grad=True):
        self.p[name] = (np.asarray(a, F32), need_grad)

    def arrays(self):
        return {k: v for k, (v, _) in self.p.items()}


def _weight(family, rng, shape, fan_in):
    if family == "pow2_connect" or family == "pow2_net":  # exponents in [-5, 0]
        mag = np.exp2(rng.uniform(-5, 0.4, shape))
        return (mag * rng.choice([-1, 1], shape)).astype(F32)
    if family == "min_max":
        return rng.uniform(-1.5, 1.5, shape).astype(F32) * F32(0.3)
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(F32)


def quant_weight(family, w, affine, prm=None, scope=""):
    """What the NNabla layer computes from its stored parameters (W in NNabla's layout)."""
    if family == "float":
        return w
    if family in ("binary_connect", "binary_net"):
        return sign(w)
    if family == "binary_weight":
        n = w.shape[0] if affine else int(np.prod(w.shape[1:]))
        a = np.abs(w)
        alpha = (a.sum(axis=0) if affine else a.reshape(w.shape[0], -1).sum(axis=1)).astype(F32)
        alpha = (alpha * F32(1.0 / n)).astype(F32)
        return sign(w) * (alpha[None, :] if affine else alpha.reshape(-1, 1, 1, 1))
    if family in ("fp_connect", "fp_net"):
        return fixed_point(w)
    if family in ("pow2_connect", "pow2_net"):
        return pow2(w)
    if family == "inq":
        ind = prm[f"{scope}/I"]
        return np.where(ind == 1, inq_levels(w), w).astype(F32)
    r = f"{scope}/min_max_quantize_w/min_max_quantize"
    return min_max(w, prm[f"{r}/qr_min"].item(), prm[f"{r}/qr_max"].item())


def make_params(family, x, seed=0):
    """Parameters of ``family``'s network, with batch-norm statistics calibrated on ``x`` (so
    that activations stay in their grids' ranges), as NNabla would have saved them after a
    test forward (derived copies in sync with W)."""
    rng = np.random.default_rng(seed)
    P = Params(family, rng)
    forward(family, x, P, rng)
    return P


def _conv_params(P, scope, cin, cout, k, rng):
    fam = P.family
    s = f"{scope}/{P.conv_scope}"
    w = _weight(fam, rng, (cout, cin, k, k), cin * k * k)
    _layer_params(P, s, w, False, rng)
    return s


def _layer_params(P, s, w, affine, rng):
    fam = P.family
    if fam == "inq":
        ind = (rng.random(w.shape) < 0.7).astype(F32)
        for _ in range(3):  # NNabla overwrites fixed entries of W with their level
            w = np.where(ind == 1, inq_levels(w), w).astype(F32)
        P.add(f"{s}/W", w)
        P.add(f"{s}/I", ind, False)
        return
    P.add(f"{s}/W", w)
    if fam in ("binary_connect", "binary_net"):
        P.add(f"{s}/Wb", sign(w), False)
    elif fam == "binary_weight":
        P.add(f"{s}/Wb", sign(w), False)
        q = quant_weight(fam, w, affine)
        P.add(f"{s}/alpha", np.abs(q[0] if affine else q.reshape(q.shape[0], -1)[:, 0]), False)
    elif fam in ("fp_connect", "fp_net", "pow2_connect", "pow2_net"):
        P.add(f"{s}/W_q", quant_weight(fam, w, affine), False)
    elif fam == "min_max":
        r = f"{s}/min_max_quantize_w/min_max_quantize"
        nd = w.ndim
        P.add(f"{s}/W_q", min_max(w, *W_RANGE), False)
        P.add(f"{r}/ql_min", np.full((1,) * nd, QL_MIN), False)
        P.add(f"{r}/ql_max", np.full((1,) * nd, QL_MAX), False)
        P.add(f"{r}/qr_min", np.full((1,) * nd, W_RANGE[0]))
        P.add(f"{r}/qr_max", np.full((1,) * nd, W_RANGE[1]))


def _bn(P, scope, h, rng):
    """PF.batch_normalization(test=True); statistics drawn around those of ``h``."""
    name = f"{scope}/bn"
    if f"{name}/mean" not in P.p:
        c = h.shape[1]
        m, v = h.mean(axis=(0, 2, 3)), h.var(axis=(0, 2, 3))
        sd = np.sqrt(v + 1e-3)
        P.add(f"{name}/beta", (rng.standard_normal(c) * 0.2).reshape(1, c, 1, 1))
        P.add(f"{name}/gamma", rng.uniform(0.5, 1.5, c).reshape(1, c, 1, 1))
        P.add(f"{name}/mean", (m + rng.standard_normal(c) * 0.1 * sd).reshape(1, c, 1, 1),
              False)
        P.add(f"{name}/var", (v * rng.uniform(0.8, 1.25, c) + 1e-3).reshape(1, c, 1, 1), False)
    g = P.arrays()
    return batch_norm(h, g[f"{name}/beta"], g[f"{name}/gamma"], g[f"{name}/mean"],
                      g[f"{name}/var"])


def _mmq(P, scope, h):
    """PF.min_max_quantize (activations: ranges as stored, a_min_max is off at test)."""
    r = f"{scope}/min_max_quantize"
    if f"{r}/qr_min" not in P.p:
        P.add(f"{r}/ql_min", np.full((1, 1, 1, 1), QL_MIN), False)
        P.add(f"{r}/ql_max", np.full((1, 1, 1, 1), QL_MAX), False)
        P.add(f"{r}/qr_min", np.full((1, 1, 1, 1), A_RANGE[0]))
        P.add(f"{r}/qr_max", np.full((1, 1, 1, 1), A_RANGE[1]))
    g = P.arrays()
    return min_max(h, g[f"{r}/qr_min"].item(), g[f"{r}/qr_max"].item())


def _conv(P, scope, h, cout, k, rng):
    s = f"{scope}/{P.conv_scope}"
    if f"{s}/W" not in P.p:
        _conv_params(P, scope, h.shape[1], cout, k, rng)
    g = P.arrays()
    return conv2d(h, quant_weight(P.family, g[f"{s}/W"], False, g, s))


def forward(family, x, P, rng=None):
    """Test-mode logits of ``family``'s network on float images ``x`` (already ``/255``);
    creates the parameters on first use (``rng``)."""
    act = {"fp_net": fixed_point, "pow2_net": lambda h: pow2(h, with_zero=True)}.get(family)
    mm, bnet = family == "min_max", family == "binary_net"
    nonlin = binary_tanh if bnet else (lambda h: np.maximum(h, F32(0)))
    h = _conv(P, "conv1", x, 64, 3, rng)
    h = _bn(P, "conv1", h, rng)
    h = act(h) if act else (_mmq(P, "conv1", h) if mm else h)
    h = nonlin(h)
    for scope, dn in UNITS:
        c = h.shape[1]
        t = h
        for j, (cout, k) in enumerate(((c // 2, 1), (c // 2, 3)), 1):
            s = f"{scope}/conv{j}"
            t = _conv(P, s, t, cout, k, rng)
            if mm:  # models.py: conv -> relu -> bn -> min_max_quantize
                t = _mmq(P, s, _bn(P, s, np.maximum(t, F32(0)), rng))
            else:
                t = _bn(P, s, t, rng)
                t = nonlin(act(t) if act else t)
        t = _bn(P, f"{scope}/conv3", _conv(P, f"{scope}/conv3", t, c, 1, rng), rng)
        if act:
            t = act(t)
        elif mm:
            t = _mmq(P, scope, t)
        h = nonlin(t + h)
        if dn:
            h = max_pool(h)
    h = (h.sum(axis=(2, 3)) / F32(16)).astype(F32)
    s = P.affine_scope
    if f"{s}/W" not in P.p:
        w = _weight(family, rng, (64, 10), 64)
        _layer_params(P, s, w, True, rng)
        if family != "min_max":  # min_max_quantized_affine(..., with_bias=False)
            b = (rng.standard_normal(10) * 0.3).astype(F32)
            P.add(f"{s}/b", b)
            if family in ("fp_connect", "fp_net"):
                P.add(f"{s}/b_q", fixed_point(b), False)
            elif family in ("pow2_connect", "pow2_net"):
                P.add(f"{s}/b_q", pow2(b), False)
    g = P.arrays()
    out = h @ quant_weight(family, g[f"{s}/W"], True, g, s)
    if f"{s}/b" in g:
        b = g[f"{s}/b"]
        out = out + (fixed_point(b) if family in ("fp_connect", "fp_net") else
                     pow2(b) if family in ("pow2_connect", "pow2_net") else b)
    return out.astype(F32)


# ----------------------------------------------------------------------------- files

def write_h5(path_or_file, P):
    import h5py

    with h5py.File(path_or_file, "w") as f:
        for i, (k, (a, ng)) in enumerate(P.p.items()):
            f[k] = a
            f[k].attrs["need_grad"] = ng
            f[k].attrs["index"] = i


def _varint(v):
    out = bytearray()
    v &= (1 << 64) - 1
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _ld(field, payload):
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def protobuf_bytes(P):
    msg = _ld(1, b"1.39.0")  # NNablaProtoBuf.version, skipped by readers of parameters
    for k, (a, ng) in P.p.items():
        shape = _ld(1, b"".join(_varint(d) for d in a.shape))
        body = (_ld(1, k.encode()) + _ld(20, shape)
                + _ld(100, struct.pack(f"<{a.size}f", *a.reshape(-1).tolist()))
                + _varint(101 << 3 | 0) + _varint(int(ng)))
        msg += _ld(200, body)
    return msg


def write_nnp(path, P, form="h5"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("nnp_version.txt", "0.1\n")
        z.writestr("network.nntxt", 'network {\n  name: "network"\n}\n')
        if form == "h5":
            buf = io.BytesIO()
            write_h5(buf, P)
            z.writestr("parameter.h5", buf.getvalue())
        else:
            z.writestr("parameter.protobuf", protobuf_bytes(P))
