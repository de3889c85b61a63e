"""Check that the working tree's quantizers are bit-identical to those of a git revision.

Speed work on ``fewbits._math`` / ``functional`` / ``quantizers`` / ``layers`` must not change a
single bit: this script imports the package as of ``--ref`` (default ``main``) side by side with
the working tree and compares, bit for bit (``float`` tensors viewed as integers, so ``-0.0`` and
``0.0`` differ and every NaN payload counts):

* the forward value and the input/range gradients of every public function of
  ``fewbits.functional`` over a grid of arguments, on random inputs and edge values (exact
  rounding ties, zeros, ``-0.0``, subnormals, the ``2**-0.5`` mantissa boundary of the power of
  two rounding, clamp bounds and their neighbours, huge values), for float32, float64, float16
  and bfloat16, with upstream gradients that contain ``-0.0``, NaN and inf (fixed point, pow2,
  INQ and min-max in float16/bfloat16: against the reference's float32 result rounded back, the
  exact answer those dtypes now give);
* the error raised (type and message) on NaN/inf input;
* one training step (logits, loss, every parameter gradient) of every seed network.

    PYTHONPATH=. python benchmarks/equivalence.py            # exit status 1 on any difference
    PYTHONPATH=. python benchmarks/equivalence.py --ref dc48f10
    PYTHONPATH=. python benchmarks/equivalence.py --ref 366d5fa --allow-refusals
    FEWBITS_FUSED=0 PYTHONPATH=. python benchmarks/equivalence.py   # the PyTorch path alone
    PYTHONPATH=. python benchmarks/equivalence.py --strict   # range gradients bit for bit too

The fused CPU kernels (``fewbits._kernels``) are on unless ``FEWBITS_FUSED=0``; the revision
compared with may predate them, so both paths are held to the same reference.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_reference", "main"]

_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
        torch.bfloat16: torch.int16}


def load_reference(ref: str, name: str = "fewbits_ref") -> Any:
    """Import ``fewbits`` as of git revision ``ref`` under the package name ``name``."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                          text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    blob = subprocess.run(["git", "-C", root, "archive", ref, "fewbits"], capture_output=True,
                          check=True).stdout
    tmp = tempfile.mkdtemp(prefix="fewbits-ref-")
    with tarfile.open(fileobj=BytesIO(blob)) as tf:
        tf.extractall(tmp, filter="data")
    os.rename(os.path.join(tmp, "fewbits"), os.path.join(tmp, name))
    sys.path.insert(0, tmp)
    return importlib.import_module(name)


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
        return a == b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.contiguous().view(_INT[a.dtype]), b.contiguous().view(_INT[b.dtype]))
    return torch.equal(a, b)


def _close(a: Any, b: Any) -> bool:
    return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
            and torch.allclose(a, b, rtol=1e-5, atol=1e-7, equal_nan=True))


def _fold_zero(rs: Any) -> Any:
    """``-0.0`` -> ``+0.0`` in the forward value of a result (where a zero's sign is free)."""
    if not (isinstance(rs, tuple) and rs and isinstance(rs[0], Tensor)):
        return rs
    return (rs[0] + 0.0, *rs[1:])


def _f32(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _edges() -> list[float]:
    """Values where a formula can go wrong: ties, zero signs, subnormals, boundaries, huge."""
    sq = float(np.float32(2**-0.5))
    v: list[float] = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1.5, -2.5, 3.5, 1e-45, -1e-45, 1e-40,
                      -1e-39, 2**-126, -(2**-126), 2**-149, 3e38, -3e38, 1e30, -1e30,
                      _f32(0x7F7FFFFF), -_f32(0x7F7FFFFF), _f32(0x00800000 - 1),
                      _f32(0x00800001), 0.49999997, -0.49999997, 2**23 + 1.0, 2**24 - 1.0]
    for k in (-130, -127, -126, -125, -62, -60, -8, -3, -1, 0, 1, 2, 3, 7, 126, 127):
        for m in (sq, 0.5, 0.75, 1.0):
            base = np.float32(m * 2.0**k) if m * 2.0**k < 3.4e38 else np.float32(3e38)
            up = np.nextafter(base, np.float32(np.inf))
            for t in (base, np.nextafter(base, np.float32(0)), up):
                v += [float(t), -float(t)]
    for d in (2**-4, 0.1, 0.3, 1.0):  # fixed-point ties and bounds
        for k in (0, 1, 2, 3, 126, 127, 128, 200):
            v += [(k + 0.5) * d, -(k + 0.5) * d, k * d, -k * d]
    return v


def _inputs(dtype: torch.dtype, seed: int = 0) -> Iterator[Tensor]:
    g = torch.Generator().manual_seed(seed)
    e = torch.tensor(_edges(), dtype=torch.float64)
    finite = torch.isfinite(e.to(dtype))
    yield e.to(dtype)[finite].reshape(-1)
    for scale in (1e-3, 0.3, 1.0, 4.0, 1e3):
        yield (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * scale).to(dtype)
    yield (torch.rand(6, 50, generator=g, dtype=torch.float64) * 16 - 8).to(dtype)
    # exact ties of the default grid 2**-4 and of a 255-level grid over [-1, 1]
    k = torch.randint(-300, 300, (5, 40), generator=g).to(torch.float64)
    yield ((k + 0.5) * 2**-4).to(dtype)
    yield ((k + 0.5) * (2 / 255) - 1).to(dtype)
    yield torch.zeros(3, 4, dtype=dtype)
    yield -torch.zeros(3, 4, dtype=dtype)
    yield torch.randn(2, 3, 4, 4, generator=g).to(dtype).permute(0, 2, 3, 1)  # non-contiguous


def _upstream(y: Tensor, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    flat = dy.reshape(-1)
    if flat.numel() >= 8:
        flat[0], flat[1], flat[2], flat[3] = -0.0, 0.0, float("nan"), float("inf")
        flat[4] = -float("inf")
    return dy


def _run(fn: Callable[..., Tensor], x: Tensor, extra: tuple[Tensor, ...], kw: dict[str, Any],
         seed: int) -> tuple[Any, ...]:
    x = x.clone().requires_grad_(True)
    extra = tuple(e.detach().clone().requires_grad_(e.requires_grad) for e in extra)
    try:
        torch.manual_seed(seed)
        y = fn(x, *extra, **kw)
    except (ValueError, TypeError) as err:
        return ("raised", type(err).__name__, str(err))
    out: list[Any] = [y.detach()]
    if y.requires_grad:
        y.backward(_upstream(y, seed))
        out += [x.grad] + [e.grad for e in extra]
    return tuple(out)


def _run_wide(fn: Callable[..., Tensor], x: Tensor, extra: tuple[Tensor, ...],
              kw: dict[str, Any], seed: int) -> tuple[Any, ...]:
    """:func:`_run` of ``fn`` (a family whose gradient is ``dy`` times a 0/1 mask, no range
    gradients) on the float32 value of a half-precision ``x``, results rounded back to
    ``x.dtype``: the exact half-precision answer the working tree must give."""
    xw = x.float().requires_grad_(True)
    extra = tuple(e.detach().clone().requires_grad_(e.requires_grad) for e in extra)
    try:
        torch.manual_seed(seed)
        y = fn(xw, *extra, **kw)
    except (ValueError, TypeError) as err:  # raised on x's float32 value: names float32
        return ("raised", type(err).__name__, str(err).replace(str(xw.dtype), str(x.dtype)))
    out: list[Any] = [y.detach().to(x.dtype)]
    if y.requires_grad:
        # the STE mask from an upstream of ones, applied to the half upstream (so NaN payloads
        # pass as the half-precision backward passes them)
        y.backward(torch.ones_like(y))
        dy = _upstream(out[0], seed)
        out += [torch.where(xw.grad != 0, dy, torch.zeros_like(dy))]
    return tuple(out)


# Families decided in float32 for float16/bfloat16 input (fewbits.ops): compared with the
# reference's float32 result rounded back (the reference revision may predate that rule).
_WIDENED = ("fixed_point", "pow2", "inq")


def _cases(F: Any) -> Iterator[tuple[str, Callable[..., Tensor], tuple[Tensor, ...], dict]]:
    yield "binary_connect", F.binary_connect, (), {}
    yield "binary_connect(zero=-1)", F.binary_connect, (), {"quantize_zero_to": -1.0}
    yield "binary_connect(stochastic)", F.binary_connect, (), {"stochastic": True}
    yield "binary_tanh", F.binary_tanh, (), {}
    yield "binary_sigmoid", F.binary_sigmoid, (), {}
    yield "binary_weight", F.binary_weight, (), {}
    deltas = (2**-4, 0.1, 1.0, 2**-130, 2**-149, 1e-46, 2**100, 3e38, 1e39)
    for sign, n, delta, fine in itertools.product((True, False), (1, 2, 4, 8, 16, 32), deltas,
                                                  (True, False)):
        yield (f"fixed_point(sign={sign},n={n},delta={delta},fine={fine})",
               F.fixed_point_quantize, (), {"sign": sign, "n": n, "delta": delta,
                                            "ste_fine_grained": fine})
    for sign, wz, n, m, fine in itertools.product((True, False), (True, False),
                                                  (1, 2, 3, 4, 8, 9, 12),
                                                  (-126, -10, 0, 1, 3, 127), (True, False)):
        yield (f"pow2(sign={sign},with_zero={wz},n={n},m={m},fine={fine})", F.pow2_quantize, (),
               {"sign": sign, "with_zero": wz, "n": n, "m": m, "ste_fine_grained": fine})
    for bits in (2, 3, 4, 8):
        yield f"inq(num_bits={bits})", F.inq_quantize, (), {"num_bits": bits}
    for (lo, hi), grad, (qmin, qmax), fine in itertools.product(
            ((-1.0, 1.0), (-6.0, 6.0), (0.1, 0.105), (-0.3, 2.0), (0.0, 0.0), (5.0, -5.0),
             (-1e30, 1e30), (1e30, 1e30), (-1e30, -1e30), (-2.0, -1.0)),
            (True, False), ((0, 255), (-128, 127), (0, 3), (0, 2**32 - 1)), (True, False)):
        for per_channel in (False, True):
            rmin = torch.tensor(lo, dtype=torch.float32)
            rmax = torch.tensor(hi, dtype=torch.float32)
            if grad:
                rmin.requires_grad_(True)
                rmax.requires_grad_(True)
            yield (f"min_max(range=({lo},{hi}),grad={grad},ql=({qmin},{qmax}),fine={fine},"
                   f"per_channel={per_channel})", F.min_max_quantize,
                   (rmin, rmax), {"ql_min": qmin, "ql_max": qmax, "ste_fine_grained": fine,
                                  "_per_channel": per_channel})


def _adapt(name: str, fn: Callable[..., Tensor], extra: tuple[Tensor, ...], kw: dict,
           x: Tensor) -> tuple[Callable[..., Tensor], tuple[Tensor, ...], dict] | None:
    kw = dict(kw)
    per_channel = kw.pop("_per_channel", False)
    if name.startswith("binary_weight") and x.dim() < 2:
        return None
    if name.startswith("min_max"):
        if per_channel:
            if x.dim() < 1:
                return None
            c = x.shape[0]
            spread = torch.linspace(0.5, 2.0, c, dtype=torch.float64)
            extra = tuple((e.detach().double() * spread).float().requires_grad_(e.requires_grad)
                          for e in extra)
            if c > 1:
                lo, hi = extra
                with torch.no_grad():
                    lo[0], hi[0] = 0.25, 0.25  # a degenerate channel next to normal ones
    return fn, extra, kw


def _refusal_kind(message: str) -> str:
    """An error message with its numbers blanked: one line per kind of new refusal."""
    return re.sub(r"[-+]?\d[\w.+-]*", "#", message)[:110]


def check_functional(F_new: Any, F_ref: Any, log: Callable[[str], None],
                     refusals: Counter | None = None, strict: bool = False) -> int:
    """Every case bit for bit; with the fused CPU kernels on, min-max range gradients (results
    2 and 3: float64 sums in another order) to 1e-5 relative, unless ``strict``.

    With ``refusals`` (a Counter), a case where the working tree raises ``ValueError`` and the
    reference returned a value is counted there by kind of message instead of as a
    difference: a new refusal is a deliberate change (never a silently different value), and
    :func:`main` lists each kind for the reader to check."""
    from fewbits import _kernels

    fused = _kernels.available() and not strict
    bad = 0
    total = 0
    new_cases = list(_cases(F_new))
    ref_cases = list(_cases(F_ref))
    for (name, fn_new, extra, kw), (_, fn_ref, _, _) in zip(new_cases, ref_cases, strict=True):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            if name.startswith("min_max") and dtype != torch.float32:
                continue
            for i, x in enumerate(_inputs(dtype)):
                a = _adapt(name, fn_new, extra, kw, x)
                if a is None:
                    continue
                fn_n, ex, kw2 = a
                r_new = _run(fn_n, x, ex, kw2, seed=i)
                wide = dtype in (torch.float16, torch.bfloat16) and name.startswith(_WIDENED)
                r_ref = (_run_wide if wide else _run)(fn_ref, x, ex, kw2, seed=i)
                total += 1
                if "sign=False" in name and name.startswith("fixed_point"):
                    # clamp at a 0 bound: PyTorch's maximum(-0.0, 0.0) gives either zero by
                    # the element's position in its vector loop; the fused kernel always +0.0
                    r_new, r_ref = _fold_zero(r_new), _fold_zero(r_ref)
                loose = fused and name.startswith("min_max") and dtype == torch.float32
                if refusals is not None and r_new[:2] == ("raised", "ValueError") and \
                        r_ref[0] != "raised":
                    refusals[_refusal_kind(r_new[2])] += 1
                    continue
                if len(r_new) != len(r_ref) or not all(
                        _same(p, q) or (loose and k >= 2 and _close(p, q))
                        for k, (p, q) in enumerate(zip(r_new, r_ref, strict=False))):
                    bad += 1
                    if bad <= 20:
                        log(f"DIFF {name} dtype={dtype} input#{i}: "
                            f"{_describe(r_new, r_ref, x)}")
    M_new, M_ref = (importlib.import_module(F.__name__.rsplit(".", 1)[0] + "._math")
                    for F in (F_new, F_ref))
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for i, x in enumerate(_inputs(dtype)):
            for v in (x, x * 16, x / 3, x * 2**23, x + 0.5):
                total += 1
                if not _same(M_new.round_half_away(v), M_ref.round_half_away(v)):
                    bad += 1
                    log(f"DIFF _math.round_half_away dtype={dtype} input#{i}")
    for fname in ("binary_connect", "binary_tanh", "binary_weight", "fixed_point_quantize",
                  "pow2_quantize", "inq_quantize"):
        for badv in (float("nan"), float("inf"), -float("inf")):
            x = torch.ones(2, 3)
            x[1, 2] = badv
            r_new = _run(getattr(F_new, fname), x, (), {}, 0)
            r_ref = _run(getattr(F_ref, fname), x, (), {}, 0)
            total += 1
            if not (r_new == r_ref and r_new[0] == "raised"):
                bad += 1
                log(f"DIFF error behaviour {fname}({badv}): {r_new[:3]} vs {r_ref[:3]}")
    for badv in (float("nan"), float("inf")):
        x = torch.ones(4)
        x[2] = badv
        for args in ((x, torch.tensor(-1.0), torch.tensor(1.0)),
                     (torch.ones(4), torch.tensor(badv), torch.tensor(1.0))):
            total += 1
            r = [_run(lambda x, a, b, F=F: F.min_max_quantize(x, a, b), *args[:1], args[1:],
                      {}, 0) for F in (F_new, F_ref)]
            if r[0] != r[1] or r[0][0] != "raised":
                bad += 1
                log(f"DIFF error behaviour min_max_quantize({badv}): {r[0]} vs {r[1]}")
    big = torch.full((1000,), 3e38)  # finite, but its sum overflows: must not raise
    for F in (F_new, F_ref):
        total += 1
        r = _run(F.fixed_point_quantize, big, (), {}, 0)
        if r[0] == "raised":
            bad += 1
            log(f"DIFF finite input with an overflowing sum raised: {r}")
    log(f"functional: {total} comparisons, {bad} differ"
        + (" (fused kernels on: min-max range gradients to 1e-5)" if fused else ""))
    return bad


def _describe(r_new: tuple, r_ref: tuple, x: Tensor) -> str:
    if isinstance(r_new[0], str) or isinstance(r_ref[0], str):
        return f"{r_new[:3]} vs {r_ref[:3]}"
    parts = []
    for k, (p, q) in enumerate(zip(r_new, r_ref, strict=False)):
        if not _same(p, q):
            what = ["value", "grad x", "grad qr_min", "grad qr_max"][k]
            if p is None or q is None:
                parts.append(f"{what}: {p} vs {q}")
                continue
            pi = p.contiguous().view(_INT[p.dtype]).reshape(-1)
            qi = q.contiguous().view(_INT[q.dtype]).reshape(-1)
            idx = (pi != qi).nonzero().reshape(-1)[:3]
            xs = x.reshape(-1)[idx].tolist() if x.numel() == p.numel() else "-"
            parts.append(f"{what} at {idx.tolist()} x={xs}: {p.reshape(-1)[idx].tolist()} "
                         f"vs {q.reshape(-1)[idx].tolist()}")
    return "; ".join(parts)


def check_models(new: Any, ref: Any, log: Callable[[str], None], strict: bool = False) -> int:
    """Three training steps of every seed network, bit for bit. With the fused CPU kernels on,
    min-max range gradients are float64 sums in another order than ``Tensor.sum``: for that
    network only the first step is compared, its range gradients to 1e-5 relative (unless
    ``strict``)."""
    from fewbits import _kernels

    bad = 0
    names = new.models.list_models("cifar10_*")
    known = set(ref.models.list_models("cifar10_*"))
    added = [n for n in names if n not in known]  # networks the reference does not have
    if added:
        log(f"networks: {len(added)} not in the reference, not compared: {', '.join(added)}")
    names = [n for n in names if n in known]
    fused = _kernels.available() and not strict
    for name in names:
        fam = new.models.model_info(name).family
        loose = fused and fam == "min_max"
        outs = []
        for pkg in (new, ref):
            torch.manual_seed(0)
            kw = {"inq_iterations": [0, 2]} if fam == "inq" else {}
            m = pkg.models.create_model(name, **kw).train()
            g = torch.Generator().manual_seed(1)
            x = torch.rand(4, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (4,), generator=g)
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            rec: list[tuple[str, Tensor]] = []
            for _ in range(1 if loose else 3):
                opt.zero_grad()
                logits = m(x)
                loss = torch.nn.functional.cross_entropy(logits, y)
                loss.backward()
                rec += [("logits", logits.detach()), ("loss", loss.detach())]
                rec += [(n, p.grad.clone()) for n, p in m.named_parameters()
                        if p.grad is not None]
                opt.step()
                pkg.layers.apply_weight_constraints(m)
            if not loose:
                rec += [(n, t.detach().clone()) for n, t in m.state_dict().items()
                        if isinstance(t, Tensor)]
            outs.append(rec)
        same = len(outs[0]) == len(outs[1])
        for (na, a), (_, b) in zip(outs[0], outs[1], strict=False):
            if _same(a, b):
                continue
            if loose and na.endswith(("qr_min", "qr_max")) and torch.allclose(
                    a, b, rtol=1e-5, atol=1e-7):
                continue
            same = False
        if not same:
            bad += 1
            log(f"DIFF model {name}: a training step differs")
    log(f"models: {len(names)} networks x 3 training steps, {bad} differ"
        + (" (fused kernels on: min-max range gradients to 1e-5)" if fused else ""))
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="main", help="git revision to compare with (default main)")
    p.add_argument("--skip-models", action="store_true", help="only the functional checks")
    p.add_argument("--allow-refusals", action="store_true",
                   help="exit 0 when the only changes are inputs the working tree now refuses "
                   "with a ValueError (listed by kind), e.g. against a revision that predates "
                   "a deliberate new check")
    p.add_argument("--strict", action="store_true",
                   help="min-max range gradients bit for bit with the fused kernels on too (for "
                   "a reference whose kernels sum in the same float64 order, e.g. main today)")
    args = p.parse_args(argv)
    import fewbits

    ref = load_reference(args.ref)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    refusals: Counter = Counter()
    bad = check_functional(fewbits.functional, ref.functional, print, refusals, args.strict)
    if not args.skip_models:
        bad += check_models(fewbits, ref, print, args.strict)
    for kind, n in sorted(refusals.items()):
        print(f"NEW REFUSAL x{n}: {kind}")
    n_ref = sum(refusals.values())
    if bad:
        print(f"{bad} DIFFERENCES" + (f" (and {n_ref} new refusals)" if n_ref else ""))
    elif n_ref:
        print(f"IDENTICAL wherever both return a value; {n_ref} inputs newly refused "
              f"({len(refusals)} kinds, listed above)")
    else:
        print("IDENTICAL")
    return 1 if bad or (n_ref and not args.allow_refusals) else 0


if __name__ == "__main__":
    sys.exit(main())
