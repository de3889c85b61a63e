"""Quantizer modules: registry, state round trips, codes, INQ schedule, min-max modes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from fewbits import quantizers as Q
from fewbits.functional import inq_quantize, min_max_quantize

# One representative spec per registered quantizer (and variants with state / options).
SPECS = [
    "binary_connect",
    {"name": "binary_connect", "clip_weights": True},
    "binary_tanh",
    "binary_sigmoid",
    "binary_weight",
    "fixed_point",
    {"name": "fixed_point", "sign": False, "n": 3, "delta": 0.1},
    "pow2",
    {"name": "pow2", "with_zero": False, "n": 5, "m": 0},
    {"name": "pow2", "sign": False, "with_zero": True, "n": 4, "m": 2},
    {"name": "inq", "num_bits": 5, "inq_iterations": [0, 1]},
    "min_max",
    {"name": "min_max", "mode": "ema", "per_channel": True, "ql_min": -8, "ql_max": 7},
    {"name": "min_max", "mode": "batch"},
    {"name": "binary_connect", "stochastic": True, "seed": 3},
    "ternary",
    {"name": "ternary", "mode": "ttq", "per_channel": True},
    {"name": "ternary", "mode": "absmean"},
    {"name": "ternary", "mode": "ttq", "threshold": 0.2},
    "absmax",
    {"name": "absmax", "bits": 4, "per": "sample"},
    "lsq",
    {"name": "lsq", "bits": 2, "signed": False, "offset": True},
    {"name": "lsq", "bits": 8, "init_step": 0.01},
]


def _id(spec):
    return spec if isinstance(spec, str) else "-".join(f"{v}" for v in spec.values())


def _weight(seed=0, shape=(6, 3, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.7
    w.view(-1)[:4] = torch.tensor([0.0, -0.0, 1.0, -1.0])  # zeros and exact unit values
    return w


def test_every_registered_quantizer_is_covered():
    names = {s if isinstance(s, str) else s["name"] for s in SPECS}
    assert names == set(Q.list_quantizers())


def test_get_resolves_and_rejects():
    assert Q.get(None) is None
    q = Q.FixedPoint(n=4)
    assert Q.get(q) is q
    assert isinstance(Q.get("pow2"), Q.Pow2)
    assert Q.get({"name": "fixed_point", "n": 3}).bits == 3
    with pytest.raises(ValueError, match="unknown quantizer 'nope'.*binary_connect.*pow2"):
        Q.get("nope")
    with pytest.raises(ValueError, match="'name'"):
        Q.get({"n": 3})
    with pytest.raises(TypeError):
        Q.get(3.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "fixed_point", "n": 0}, "n must be"),
    ({"name": "fixed_point", "n": 33}, "n must be"),
    ({"name": "fixed_point", "delta": 0.0}, "delta"),
    ({"name": "fixed_point", "delta": -1.0}, "delta"),
    ({"name": "pow2", "n": 1}, "n must be"),  # sign + zero flag need 2 bits
    ({"name": "pow2", "m": 500}, "m "),
    ({"name": "min_max", "ql_min": 5, "ql_max": 5}, "ql_min < ql_max"),
    ({"name": "min_max", "mode": "median"}, "unknown mode"),
    ({"name": "inq", "num_bits": 1}, "num_bits"),
    ({"name": "inq", "inq_iterations": [3, 2]}, "increasing"),
    ({"name": "inq", "selection": "smallest"}, "unknown selection"),
])
def test_invalid_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Q.get(kwargs)


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_config_and_state_dict_round_trip(spec):
    w = _weight()
    q = Q.get(spec)
    q.setup(w)
    q.train()
    for _ in range(3):  # advance state: INQ counter/mask, min-max ranges
        q(w * 1.3)
    if any(p.requires_grad for p in q.parameters()):
        with torch.no_grad():
            for p in q.parameters():
                p.add_(0.125)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    q2 = Q.get(q.config())
    assert q2.config() == q.config()
    q2.setup(w)
    buf.seek(0)
    q2.load_state_dict(torch.load(buf))
    q.eval()
    q2.eval()
    assert torch.equal(q(w), q2(w))
    if isinstance(q, Q.INQ):
        assert q2.counter == q.counter == 3
        assert torch.equal(q2.mask, q.mask)


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_bits_declared_and_codes_decode_to_forward(spec):
    w = _weight(1)
    q = Q.get(spec)
    assert isinstance(q.bits, int) and 1 <= q.bits <= 32
    q.setup(w)
    q.train()
    q(w)
    q(w)  # INQ: fully fixed after its two scheduled iterations
    q.eval()
    codes = q.encode(w)
    assert codes.codes.dtype == torch.int64
    assert int(codes.codes.min()) >= 0 and int(codes.codes.max()) < 2**codes.bits
    assert codes.bits == q.bits
    assert torch.equal(q.decode(codes), q(w).detach())


@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_affine_form_is_the_grid_of_uniform_quantizers_only(spec):
    w = _weight(2)
    w.view(-1)[4:6] = torch.tensor([40.0, -40.0])  # beyond every range: the grid's bounds
    q = Q.get(spec)
    q.setup(w)
    q.train()
    q(w)
    q(w)
    q.eval()
    codes = q.encode(w)
    a = q.affine(codes)
    uniform = (Q.FixedPoint, Q.MinMax, Q.Ternary, Q.LSQ)
    if not isinstance(q, uniform) or getattr(q, "mode", "") == "ttq" or getattr(q, "offset", 0):
        assert a is None  # binary, power-of-two, INQ, TTQ and LSQ+ grids are not affine
        return
    assert a.int_repr.dtype == torch.int64 and a.int_repr.shape == w.shape
    assert a.scale.dtype == torch.float32 and a.zero_point.dtype == torch.int64
    assert a.scale.shape == a.zero_point.shape
    assert a.qmin <= int(a.int_repr.min()) and int(a.int_repr.max()) <= a.qmax
    assert int(a.int_repr.min()) == a.qmin and int(a.int_repr.max()) == a.qmax  # saturated
    per_channel = a.axis is not None
    assert per_channel == ((isinstance(q, Q.MinMax) and q.qr_min.numel() > 1)
                           or (isinstance(q, Q.Ternary) and q.per_channel))
    view = (-1, 1, 1, 1) if per_channel else ()
    deq = (a.int_repr - a.zero_point.reshape(view)).float() * a.scale.reshape(view)
    # (q - zp) * scale and the forward's q * scale + lo are the same reals; float rounding of
    # the two forms may differ in the last bit (MinMax.int_grid's docstring)
    # (a few ulps of the range, never a grid step)
    torch.testing.assert_close(deq, q(w).detach(), rtol=1e-6, atol=float(a.scale.max()) * 1e-5)
    if isinstance(q, Q.FixedPoint):
        grid = q.int_grid()
        assert float(a.scale) == float(np.float32(grid.scale))
        assert (int(a.zero_point), a.qmin, a.qmax) == (grid.zero_point, grid.qmin, grid.qmax)
        assert torch.equal(deq, q(w).detach())  # k * delta: exact


def test_binary_weight_rejects_vectors_with_a_clear_error():
    with pytest.raises(ValueError, match="output-channel axis"):
        Q.BinaryWeight().setup(torch.zeros(5))


# --------------------------------------------------------------------------- INQ


def _inq(shape=(4, 8, 3, 3), schedule=(2, 4, 6, 8, 10), selection="largest_abs"):
    w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    q = Q.INQ(num_bits=4, inq_iterations=schedule, selection=selection)
    q.setup(w)
    return w, q


def test_inq_fixes_the_scheduled_fractions_at_the_scheduled_iterations():
    w, q = _inq()
    q.train()
    seen = []
    for it in range(12):
        q(w)
        seen.append((it, q.fixed_fraction))
    fractions = dict(seen)
    assert fractions[0] == fractions[1] == 0.0
    assert fractions[2] == fractions[3] == 0.5
    assert fractions[4] == 0.75
    assert fractions[6] == 0.875
    assert fractions[8] == 0.9375
    assert fractions[10] == fractions[11] == 1.0


def test_inq_largest_abs_fixes_the_largest_weights_and_quantizes_them():
    w, q = _inq(schedule=(0, 5))
    q.train()
    y = q(w)
    a = w.detach().abs().reshape(-1)
    k = a.numel() // 2
    top = torch.zeros_like(a, dtype=torch.bool)
    top[torch.argsort(a, descending=True)[:k]] = True
    assert torch.equal(q.mask.reshape(-1), top)
    expect = inq_quantize(w.detach(), 4)
    assert torch.equal(y.detach()[q.mask], expect[q.mask])
    assert torch.equal(y.detach()[~q.mask], w.detach()[~q.mask])


def test_inq_random_selection_is_seeded_and_about_half():
    w, q = _inq(shape=(64, 64), schedule=(0, 9), selection="random")
    q.train()
    q(w)
    frac = q.fixed_fraction
    assert 0.45 < frac < 0.55
    w2, q2 = _inq(shape=(64, 64), schedule=(0, 9), selection="random")
    q2.train()
    q2(w2)
    assert torch.equal(q.mask, q2.mask)


def test_inq_evaluation_does_not_advance_the_schedule():
    w, q = _inq(schedule=(1, 2))
    q.eval()
    for _ in range(5):
        q(w)
    assert q.counter == 0 and q.fixed_fraction == 0.0
    q.train()
    q(w)
    q(w)
    assert q.counter == 2 and q.fixed_fraction == 0.5


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.1),
], ids=["adam-wd", "sgd-momentum-wd", "adamw"])
def test_inq_fixed_weights_never_move_under_any_optimizer(make_opt):
    w, q = _inq(schedule=(3, 100))
    opt = make_opt([w])
    q.train()
    target = torch.randn(w.shape, generator=torch.Generator().manual_seed(9))
    snapshot = None
    for it in range(10):
        opt.zero_grad()
        y = q(w)
        ((y - target) ** 2).sum().backward()
        if it >= 3:
            assert torch.all(w.grad[q.mask] == 0), "fixed weights must get no gradient"
        opt.step()
        q.eval()
        eff = q(w).detach().clone()
        q.train()
        if it == 3:
            snapshot = eff
        if snapshot is not None:
            assert torch.equal(eff[q.mask], snapshot[q.mask])
            # and the learnable ones do move
    assert not torch.equal(eff[~q.mask], snapshot[~q.mask])


def test_inq_encode_refuses_an_unfinished_schedule():
    w, q = _inq(schedule=(0, 50))
    q.train()
    q(w)
    with pytest.raises(ValueError, match="still learnable"):
        q.encode(w)


# --------------------------------------------------------------------------- min-max


def test_min_max_batch_mode_tracks_batch_ranges_in_training_only():
    q = Q.MinMax(mode="batch")
    x = torch.tensor([-1.5, 0.25, 3.0])
    q.train()
    q(x)
    assert q.qr_min.item() == -1.5 and q.qr_max.item() == 3.0
    q.eval()
    y = q(torch.tensor([-10.0, 10.0]))  # evaluation: stored ranges, no update
    assert q.qr_min.item() == -1.5 and q.qr_max.item() == 3.0
    expect = min_max_quantize(torch.tensor([-10.0, 10.0]), torch.tensor(-1.5),
                              torch.tensor(3.0))
    assert torch.equal(y, expect)


def test_min_max_ema_update_follows_the_formula():
    q = Q.MinMax(mode="ema", decay=0.9, init_min=-6.0, init_max=6.0)
    q.train()
    xs = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 0.5])]
    lo, hi = np.float32(-6.0), np.float32(6.0)
    for x in xs:
        q(x)
        lo = np.float32(np.float32(0.9) * lo + np.float32(1 - 0.9) * np.float32(x.min()))
        hi = np.float32(np.float32(0.9) * hi + np.float32(1 - 0.9) * np.float32(x.max()))
        np.testing.assert_allclose(q.qr_min.item(), lo, rtol=1e-6)
        np.testing.assert_allclose(q.qr_max.item(), hi, rtol=1e-6)


def test_min_max_learnable_ranges_receive_the_spec_gradients():
    q = Q.MinMax(ql_min=0, ql_max=3, init_min=-1.0, init_max=1.0)
    x = torch.tensor([-5.0, -0.2, 0.1, 4.0, 7.0], requires_grad=True)
    dy = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    (q(x) * dy).sum().backward()
    # grid: scale 2/3, zp 2 -> lo -4/3, hi 2/3
    assert q.qr_min.grad.item() == 1.0  # x = -5 below lo
    assert q.qr_max.grad.item() == 9.0  # x = 4, 7 above hi
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 0.0, 0.0]


def test_min_max_eps_nudge_and_zero_point_nudge():
    q = Q.MinMax(ql_min=0, ql_max=255, init_min=0.5, init_max=0.5, eps=0.01)
    scale, zp, lo, _ = q.grid(torch.zeros(()))
    assert torch.isclose(scale, torch.tensor(0.01 / 255))
    assert zp.item() == 0.0 and lo.item() == 0.0  # zp below ql_min -> ql_min: range starts at 0
    # scale 0.25, zp = 0.625 / 0.25 = 2.5 exactly: a tie, rounded away from zero to 3
    q2 = Q.MinMax(ql_min=0, ql_max=7, init_min=-0.625, init_max=1.125)
    scale2, zp2, lo2, hi2 = q2.grid(torch.zeros(()))
    assert (scale2.item(), zp2.item(), lo2.item(), hi2.item()) == (0.25, 3.0, -0.75, 1.0)


def test_min_max_per_channel_ranges():
    w = torch.stack([torch.linspace(-1, 1, 9), torch.linspace(-4, 4, 9)]).reshape(2, 1, 3, 3)
    q = Q.MinMax(mode="batch", per_channel=True, ql_min=-127, ql_max=127)
    q.setup(w)
    q.train()
    q(w)
    assert q.qr_min.tolist() == [-1.0, -4.0] and q.qr_max.tolist() == [1.0, 4.0]
    y = q(w)
    err = (y - w).abs().flatten(1).amax(1)
    assert err[0] < 1 / 127 and err[1] < 4 / 127


def test_min_max_range_projection_shortcut_equals_the_tensor_formula_without_warnings():
    """The host shortcut of MinMax.after_optimizer_step gives the tensor formula's ranges on
    edge values, and a width that overflows float32 (a diverged run) warns about nothing
    (NumPy's scalar subtraction warned 'overflow encountered', an error under -W error)."""
    import warnings

    vals = [-0.0, 0.0, -1e-45, 0.005, -0.005, -0.0050000004, -3e38, 3e38, float("nan"), -1.0]
    for dt in (torch.float32, torch.float64):
        for lo, hi in [(a, b) for a in vals for b in vals]:
            q = Q.MinMax(eps=0.01)
            q.qr_min.data, q.qr_max.data = torch.tensor(lo, dtype=dt), torch.tensor(hi, dtype=dt)
            want_lo, want_hi = q.qr_min.detach().clamp(max=0.0), q.qr_max.detach().clamp(min=0.0)
            want_hi = torch.where(want_hi - want_lo < 0.01, want_lo + 0.01, want_hi)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                q.after_optimizer_step()
            for got, want in ((q.qr_min, want_lo), (q.qr_max, want_hi)):
                assert torch.equal(got.detach().view(-1).view(torch.uint8),
                                   want.view(-1).view(torch.uint8)), (dt, lo, hi)
