"""Faults that users of other quantization tools hit, restated as inputs to fewbits (issue 12).

Each test holds one kind of fault: the input of the report and the other members of its kind.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fewbits import list_models
from fewbits.train import ConfigError, TrainConfig, train

# --------------------------------------------------------------------------- -b 1 and batch norm


@pytest.mark.parametrize("net", list_models("mnist_*"))
def test_batch_size_one_with_feature_batch_norm_names_the_option(net, tmp_path):
    # BatchNorm1d after a linear layer sees one value per channel with one image: PyTorch
    # raises mid-run; fewbits refuses at setup, naming -b.
    cfg = TrainConfig(net=net, dataset="synthetic", synthetic_size=4, batch_size=1, max_iter=1,
                      val_interval=1, monitor_path=str(tmp_path), progress=False, plot=False,
                      model_args={"width": 8})
    with pytest.raises(ConfigError, match=r"-b/--batch-size 1: .*batch norm.*-b 2"):
        train(cfg)


def test_batch_size_one_trains_where_batch_norm_has_a_feature_map(tmp_path):
    # Conv batch norm over a 32x32 map has 1024 values per channel: -b 1 is fine there.
    cfg = TrainConfig(net="cifar10_min_max_resnet23_prediction", dataset="synthetic",
                      synthetic_size=4, batch_size=1, max_iter=1, val_interval=1,
                      monitor_path=str(tmp_path), progress=False, plot=False,
                      validate_first=False)
    assert train(cfg).iterations == 1


# --------------------------------------------------------------------------- wide codes (item 5)

FLT_MAX = 3.4028234663852886e38


def _extremes() -> torch.Tensor:
    """Finite inputs at the ends of float32 and around the usual grids."""
    v = [FLT_MAX, 3e38, 2e38, 1e38, 1e30, 2.0**24, 2.0**24 + 2, 1.5, 1.0, 0.5, 2.0**-126,
         2.0**-149, 0.0]
    return torch.tensor(v + [-a for a in v] + [-0.0])


def _round_trip(q) -> None:
    """Every code fits ``q.bits`` (or the codes' own width) and decodes to the forward."""
    x = _extremes()
    q.eval()
    y = q(x).detach()
    c = q.encode(x)
    assert int(c.codes.min()) >= 0 and int(c.codes.max()) < 2**c.bits, (q, c.codes)
    assert torch.equal(q.decode(c), y), q


@pytest.mark.parametrize("n,delta,sign", [
    (26, 1.0, True), (32, 1.0, True), (27, 2**-4, True), (25, 1.0, False), (24, 0.1, True),
    (23, 0.1, False), (8, 1e39, True), (8, 1e-46, True), (8, 2.4 * 2**-149, True)])
def test_fixed_point_grids_float32_cannot_hold_are_refused(n, delta, sign):
    from fewbits.quantizers import FixedPoint

    with pytest.raises(ValueError, match=r"FixedPoint: .*float32"):
        FixedPoint(sign=sign, n=n, delta=delta)


@pytest.mark.parametrize("n,delta,sign", [
    (25, 1.0, True), (25, 2**-149, True), (25, 2.0**104, True), (24, 2**-4, False),
    (23, 0.1, True), (22, 0.3, False), (8, 3e38, True), (16, 1e-40, True), (2, 2.0**127, True),
    (8, 2**-4, True), (1, 0.5, False)])
def test_accepted_fixed_point_grids_round_trip_at_the_extremes(n, delta, sign):
    from fewbits.quantizers import FixedPoint

    q = FixedPoint(sign=sign, n=n, delta=delta)
    _round_trip(q)
    # the levels next to both bounds: 2**nb - 1 and its neighbours
    nb = n - 1 if sign else n
    k = torch.tensor([2.0**nb - 1, 2.0**nb - 2, 2.0**nb - 3, 1.0]).clamp(min=0)
    for s in ((1.0, -1.0) if sign else (1.0,)):
        x = s * k * float(torch.tensor(delta, dtype=torch.float32))
        x = x[torch.isfinite(x)]
        c = q.encode(x)
        assert int(c.codes.max()) < 2**n and int(c.codes.min()) >= 0
        assert torch.equal(q.decode(c), q(x))


def test_fp_connect_with_26_bits_is_refused_when_built(tmp_path):
    # The issue's export failure ("code 4294967295 does not fit in 26 bits") now stops at the
    # model's construction, naming the limit.
    from fewbits import create_model

    with pytest.raises(ValueError, match=r"n <= 25"):
        create_model("mnist_fp_connect_mlp", bit_width=26, delta=1.0)


@pytest.mark.parametrize("spec", [
    {"name": "pow2", "n": 32, "m": 127}, {"name": "pow2", "n": 32, "m": -126},
    {"name": "pow2", "n": 12, "m": 1, "with_zero": False}, {"name": "pow2", "n": 9, "m": 127},
    {"name": "pow2", "n": 31, "m": 0, "sign": False},
    {"name": "min_max", "ql_min": 0, "ql_max": 2**21 - 1, "init_min": -1.0, "init_max": 3.0},
    {"name": "min_max", "ql_min": -(2**20), "ql_max": 2**20 - 1, "init_min": 1e30,
     "init_max": 2e30},
    {"name": "min_max", "ql_min": 2**24 - 255, "ql_max": 2**24, "init_min": -1e-3,
     "init_max": 0.5}])
def test_other_wide_codes_round_trip_at_the_extremes(spec):
    from fewbits.quantizers import get

    _round_trip(get(spec))


@pytest.mark.parametrize("ql", [(0, 2**21), (0, 2**24 - 1), (0, 2**32 - 1), (2**30, 2**30 + 3),
                                (-(2**31), 0)])
def test_min_max_level_ranges_float32_cannot_index_are_refused(ql):
    from fewbits.quantizers import MinMax

    with pytest.raises(ValueError, match=r"MinMax: .*21 bits"):
        MinMax(ql_min=ql[0], ql_max=ql[1])


def test_min_max_widest_accepted_grid_codes_stay_in_range():
    # 2**21 - 1 levels, ranges of every scale and sign: saturated codes never pass ql_max.
    from fewbits.quantizers import MinMax

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        lo = float(torch.randn(1, generator=g)) * 10.0 ** int(torch.randint(-3, 4, (1,),
                                                                               generator=g))
        hi = lo + float(torch.rand(1, generator=g)) * 10.0 ** int(torch.randint(-3, 4, (1,),
                                                                                 generator=g))
        # eval: a training forward would restart a range narrower than eps from x
        q = MinMax(ql_min=0, ql_max=2**21 - 1, init_min=lo, init_max=hi).eval()
        x = torch.tensor([-FLT_MAX, lo, hi, FLT_MAX, (lo + hi) / 2])
        c = q.encode(x)
        assert int(c.codes.min()) >= 0 and int(c.codes.max()) <= 2**21 - 1
        assert torch.equal(q.decode(c), q(x).detach())


def test_inq_round_trips_with_wide_and_tiny_levels():
    from fewbits.quantizers import INQ

    w = torch.tensor([[2.0**100, -(2.0**-100), 2.0**-140, 0.0, 1.0, -3.0]])
    for bits in (2, 4, 8, 32):
        q = INQ(num_bits=bits, inq_iterations=(0,))
        q.setup(w)
        y = q(w)  # fixes everything
        c = q.encode(w)
        assert int(c.codes.min()) >= 0 and int(c.codes.max()) < 2**c.bits
        assert torch.equal(q.decode(c), y.detach())


# ------------------------------------------------------------ finite extremes (item 8)


def test_min_max_batch_near_float32_limit_raises_instead_of_nan():
    from fewbits.quantizers import MinMax

    for mode in ("batch", "ema"):
        q = MinMax(mode=mode, decay=0.0)
        with pytest.raises(ValueError, match=r"min_max_quantize: the range .*-2e\+38, 2e\+38"):
            q(torch.tensor([-2e38, 0.5, 2e38]))
    # a batch of one huge constant: eps vanishes next to it (scale 0, all NaN before)
    q = MinMax(mode="batch")
    with pytest.raises(ValueError, match="eps=0.01 vanishes"):
        q(torch.full((4,), 1e30))
    # per channel, the offending channel is named
    q = MinMax(mode="batch", per_channel=True)
    q.setup(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[-3e\+38, 3e\+38\]"):
        q(torch.tensor([[-1.0, 0.0, 1.0], [-3e38, 0.0, 3e38]]))


def test_min_max_learned_ranges_near_the_limit_raise_in_forward_and_export():
    from fewbits.functional import min_max_quantize
    from fewbits.quantizers import MinMax

    with pytest.raises(ValueError, match="has no torch.float32 grid"):
        min_max_quantize(torch.zeros(3), torch.tensor(-3e38), torch.tensor(3e38))
    q = MinMax(init_min=-3e38, init_max=3e38)
    with pytest.raises(ValueError, match="has no torch.float32 grid"):
        q.encode(torch.zeros(3))


@pytest.mark.parametrize("spec", [
    "binary_connect", {"name": "binary_connect", "stochastic": True}, "binary_tanh",
    "binary_sigmoid", "binary_weight", "fixed_point", {"name": "fixed_point", "delta": 3e38},
    {"name": "fixed_point", "n": 25, "delta": 2.0**103}, "pow2", {"name": "pow2", "m": 127},
    {"name": "pow2", "m": -126, "n": 32, "with_zero": False}, {"name": "inq", "num_bits": 8},
    {"name": "min_max", "mode": "batch"}, {"name": "min_max", "mode": "ema"}, "min_max",
    {"name": "min_max", "init_min": -1.7e38, "init_max": 1.6e38}])
def test_every_family_with_finite_extremes_is_finite_or_raises(spec):
    # Finite inputs at float32's ends: no family returns inf or NaN silently.
    from fewbits.quantizers import get

    q = get(spec)
    x = _extremes().reshape(3, 9)
    for xx in (x, x[:, :4], x.abs(), -x.abs()):
        w = xx.clone().requires_grad_(True)
        q.setup(w)
        if getattr(q, "inq_iterations", None) is not None:
            q.inq_iterations = (0,)
        q.train()
        try:
            y = q(w)
        except ValueError as e:
            assert "float32" in str(e) or "beyond" in str(e), e
            continue
        assert bool(torch.isfinite(y).all()), (spec, xx, y)
        y.sum().backward()
        assert bool(torch.isfinite(w.grad).all())


def test_inq_with_weights_near_the_limit_raises_instead_of_inf():
    from fewbits.functional import inq_quantize
    from fewbits.quantizers import INQ

    with pytest.raises(ValueError, match=r"2\*\*128"):
        inq_quantize(torch.tensor([3e38, 1.0]))
    assert torch.isfinite(inq_quantize(torch.tensor([2.5e38, 1.0]))).all()
    w = torch.tensor([[3e38, 1.0]])
    q = INQ(inq_iterations=(0,))
    q.setup(w)
    with pytest.raises(ValueError, match=r"INQ: max\|w\|"):
        q(w)
    with pytest.raises(ValueError, match=r"2\*\*16"):
        inq_quantize(torch.tensor([60000.0, 1.0], dtype=torch.float16))


# ------------------------------------------------ learned min-max ranges stay valid (item 3)


def _issue_run(seed: int, steps: int = 60, constrain: bool = True):
    """The issue's reproduction: a QuantLinear whose learnable output range starts at
    (0.5, 1.0), SGD; targets are positive, so outputs below 0 push qr_min up."""
    from fewbits.layers import QuantLinear, apply_weight_constraints

    torch.manual_seed(seed)
    layer = QuantLinear(16, 4, output_quantizer={"name": "min_max", "init_min": 0.5,
                                                 "init_max": 1.0})
    x, t = torch.randn(64, 16), torch.randn(64, 4).abs() * 3
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    q, ranges, losses = layer.output_quantizer, [], []
    for _ in range(steps):
        loss = ((layer(x) - t) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if constrain:
            apply_weight_constraints(layer)
        losses.append(float(loss.detach()))
        ranges.append((float(q.qr_min.detach()), float(q.qr_max.detach())))
    return losses, ranges


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_min_max_ranges_never_cross_and_training_recovers(seed):
    losses, ranges = _issue_run(seed)
    for lo, hi in ranges:
        assert lo <= 0.0 <= hi and hi - lo >= 0.01 * (1 - 2**-20), (lo, hi)
    # seed 1 crossed at step 3 and stayed near its first loss (8.1 -> 8.7); now it learns
    assert losses[-1] < 0.35 * losses[0], losses[::10]


def test_min_max_projection_keeps_valid_ranges_and_is_idempotent():
    from fewbits.quantizers import MinMax

    lo = torch.tensor([-1.0, -6.0, 0.5, 1.01, -3.0, -0.004, 0.0, -2.0, 2.0])
    hi = torch.tensor([1.0, 6.0, 1.0, 1.0, -1.0, 0.001, 0.0, -3.0, -2.0])
    q = MinMax(per_channel=True)
    q.setup(torch.zeros(9, 2))
    with torch.no_grad():
        q.qr_min.copy_(lo)
        q.qr_max.copy_(hi)
    q.after_optimizer_step()
    a, b = q.qr_min.detach().clone(), q.qr_max.detach().clone()
    assert torch.equal(a[:2], lo[:2]) and torch.equal(b[:2], hi[:2])  # valid: untouched
    assert bool((a <= 0).all() and (b >= 0).all() and (b - a >= 0.01 * (1 - 2**-20)).all())
    assert a.tolist()[2:5] == [0.0, 0.0, -3.0] and b[2].item() == 1.0 and b[4].item() == 0.0
    q.after_optimizer_step()
    assert torch.equal(q.qr_min, a) and torch.equal(q.qr_max, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_min_max_projection_of_one_range_equals_the_tensor_formula(dtype):
    # Per-tensor ranges that need no projection skip the tensor operations: on widths one ulp
    # either side of eps (float32 arithmetic, not Python's), zeros of both signs and NaN, the
    # values stay those of the per-channel path (the formula applied elementwise), bit for bit.
    from fewbits.quantizers import MinMax

    eps = 0.01
    e32 = float(torch.tensor(eps, dtype=dtype))
    cases = [(-1.0, 1.0), (-0.0, 1.0), (0.0, 1.0), (-1.0, -0.0), (-1.0, 0.0), (0.5, 1.0),
             (-1.0, -0.5), (float("nan"), 1.0), (-1.0, float("nan")), (-0.004, 0.001)]
    for w in (e32, float(np.nextafter(e32, 0)), float(np.nextafter(e32, 1))):
        for lo in (-0.3, -1e-3, -0.004, -0.005, -123.456):
            cases.append((lo, float(torch.tensor(lo, dtype=dtype) + torch.tensor(w, dtype=dtype))))
    lo = torch.tensor([c[0] for c in cases], dtype=dtype)
    hi = torch.tensor([c[1] for c in cases], dtype=dtype)
    ref = MinMax(per_channel=True, eps=eps)
    ref.setup(torch.zeros(len(cases), 1))
    ref.to(dtype)
    with torch.no_grad():
        ref.qr_min.copy_(lo)
        ref.qr_max.copy_(hi)
    ref.after_optimizer_step()
    it = {torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    for k in range(len(cases)):
        q = MinMax(eps=eps).to(dtype)
        with torch.no_grad():
            q.qr_min.copy_(lo[k])
            q.qr_max.copy_(hi[k])
        q.after_optimizer_step()
        got = torch.stack([q.qr_min.detach(), q.qr_max.detach()]).view(it)
        want = torch.stack([ref.qr_min[k].detach(), ref.qr_max[k].detach()]).view(it)
        assert torch.equal(got, want), cases[k]


def test_min_max_batch_and_ema_ranges_are_not_projected():
    from fewbits.quantizers import MinMax

    for mode in ("batch", "ema"):
        q = MinMax(mode=mode, init_min=0.5, init_max=0.6)
        q.after_optimizer_step()
        assert (q.qr_min.item(), q.qr_max.item()) == (0.5, pytest.approx(0.6))


# ----------------------------------------- INQ schedule in optimizer iterations (item 2)


def test_inq_with_accumulation_follows_optimizer_iterations(tmp_path):
    # -n mnist_inq_mlp -i 3 --inq-iterations 2,4 --accum-steps 2: only the fix at iteration 2
    # lands (half of every layer); counting forwards, main fixed at forwards 2 and 4 (75 %).
    # (-i 2 with this schedule is refused: it would never start, see test_own_models.)
    from fewbits.layers import quant_layers

    cfg = TrainConfig(net="mnist_inq_mlp", dataset="synthetic", synthetic_size=16,
                      batch_size=4, max_iter=3, val_interval=3, accum_steps=2,
                      inq_iterations=(2, 4), monitor_path=str(tmp_path), progress=False,
                      plot=False, model_args={"width": 8, "depth": 1})
    with pytest.warns(UserWarning, match="ends after the run's 3 iterations"):
        model = train(cfg).model
    qs = [layer.weight_quantizer for _, layer in quant_layers(model)]
    assert qs and all(q.counter == 3 and 0.4 < q.fixed_fraction < 0.6 for q in qs)


def test_inq_fixes_never_land_between_micro_batches():
    from fewbits.layers import QuantLinear, apply_weight_constraints, count_optimizer_steps

    torch.manual_seed(0)
    layer = QuantLinear(8, 4, bias=False, weight_quantizer={
        "name": "inq", "inq_iterations": [1, 2, 4], "selection": "random"})
    count_optimizer_steps(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    q, fixed = layer.weight_quantizer, []
    for _ in range(6):
        masks = []
        for _ in range(3):  # micro-batches of one step
            layer(torch.randn(2, 8)).sum().backward()
            masks.append(q.mask.clone())
        assert all(torch.equal(m, masks[0]) for m in masks)
        opt.step()
        opt.zero_grad()
        apply_weight_constraints(layer)
        fixed.append(q.fixed_fraction)
    assert q.counter == 6
    assert fixed[0] == 0.0 and fixed[0] < fixed[1] < fixed[2] == fixed[3] < fixed[4] == 1.0
    # eval forwards and a reloaded state keep the schedule where it was
    layer.eval()
    layer(torch.randn(2, 8))
    state = layer.state_dict()
    other = QuantLinear(8, 4, bias=False, weight_quantizer=q.config())
    other.load_state_dict(state)
    oq = other.weight_quantizer
    # how the counter counts is the loop's choice, not part of the saved state
    assert (oq.counter, oq.stage, oq.step_counted) == (6, 3, False)


def test_inq_without_the_hook_still_counts_forwards():
    # A user's loop with one forward per step, as before: unchanged.
    from fewbits.quantizers import INQ

    w = torch.tensor([[0.9, -0.3, 0.2, 0.01]])
    q = INQ(num_bits=4, inq_iterations=(0, 2))
    q.setup(w)
    q(w)
    assert q.mask.tolist() == [[True, True, False, False]] and q.counter == 1
    q(w)
    q(w)
    assert bool(q.mask.all()) and q.counter == 3
    # a state saved before "stage" existed: entries below the counter are done
    q2 = INQ(num_bits=4, inq_iterations=(0, 2, 5))
    q2.set_extra_state({"counter": 3})
    assert (q2.stage, q2.step_counted) == (2, False)


def test_min_max_projection_reads_no_value_off_the_cpu():
    # The host shortcut of after_optimizer_step reads two values with .item(): never on a
    # meta tensor (no value: a checkpoint's model is first built there) nor on CUDA (a host
    # sync per quantizer and step); those take the tensor formula.
    from fewbits.quantizers import MinMax

    with torch.device("meta"):
        q = MinMax()
        q.after_optimizer_step()  # raised "Tensor.item() cannot be called on meta tensors"
    assert q.qr_min.device.type == "meta"
    calls = []
    q = MinMax()
    q._valid_scalar_range = lambda: calls.append(1) or False  # the formula path still runs
    with torch.no_grad():
        q.qr_min.fill_(0.5)
    q.after_optimizer_step()
    assert calls and float(q.qr_min) == 0.0
