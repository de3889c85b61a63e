"""Ternary (TWN, TTQ, absmean), absmax, LSQ / LSQ+ and stochastic BinaryConnect against the
independent NumPy oracle (tests/oracle_lowbit.py): forward bit for bit, gradients, edges (zeros,
ties, thresholds, out of range), NaN/inf refused; LSQ's initial step and gradient scale; the
stochastic stream's seed, resume and recomputation."""

from __future__ import annotations

import math

import numpy as np
import oracle_lowbit as O
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from fewbits import quantizers as Q
from fewbits.ops import lsq as L
from fewbits.ops import stochastic as S
from fewbits.ops import ternary as T

F32 = np.float32


def _eq(got: torch.Tensor, exp: np.ndarray) -> None:
    g = got.detach().numpy().astype(F32) + F32(0)  # -0 folded onto +0
    e = np.asarray(exp, F32) + F32(0)
    assert g.shape == e.shape
    np.testing.assert_array_equal(g.view(np.uint32), e.view(np.uint32))


def _weights(seed: int = 0, shape=(4, 3, 3)) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(shape).astype(F32)
    flat = w.reshape(shape[0], -1)
    # row 0: an element exactly at TWN's threshold 0.7 * mean|w| (mean 1.0) and zeros;
    # row 1: an absmean tie |w| = gamma / 2; row 2: all zero; row 3: random
    flat[0] = 0.0
    flat[0, :5] = [0.7, -2.0, 1.3, -0.0, -5.0]  # mean|w| = 1.0
    flat[1] = 0.0
    flat[1, :5] = [0.5, -1.5, 2.0, -0.5, -4.5]
    flat[2] = 0.0
    return w


def _dy(shape, seed: int = 1) -> np.ndarray:
    # dyadic values: float64 sums are exact whatever the order
    return (np.random.default_rng(seed).integers(-8, 9, shape) / 8).astype(F32)


@pytest.mark.parametrize("per_channel", [True, False])
def test_twn_matches_the_oracle_with_ties_and_zero_rows(per_channel):
    w = _weights()
    wt = torch.tensor(w, requires_grad=True)
    y = T.twn(wt, per_channel)
    _eq(y, O.twn(w, per_channel))
    if per_channel:
        assert float(y[0].reshape(-1)[0].detach()) == 0.0  # |w| == delta exactly: 0 (strict >)
        assert not y[2].any()                     # an all-zero channel: alpha = 0, no NaN
    dy = _dy(w.shape)
    y.backward(torch.tensor(dy))
    _eq(wt.grad, dy)  # straight through


@pytest.mark.parametrize("per_channel", [False, True])
def test_absmean_matches_the_oracle_and_ties_go_away_from_zero(per_channel):
    w = _weights(2)
    wt = torch.tensor(w, requires_grad=True)
    y = T.absmean(wt, per_channel)
    _eq(y, O.absmean(w, per_channel))
    if per_channel:  # row 1 has mean|w| = 1: +-0.5 are ties, away from zero
        assert y[1].reshape(-1)[[0, 3]].tolist() == [1.0, -1.0]
        assert not y[2].any()  # gamma = eps: zeros stay zeros
    y.backward(torch.ones_like(y))
    assert torch.equal(wt.grad, torch.ones_like(wt))


@pytest.mark.parametrize("per", ["token", "sample", "tensor"])
def test_absmax_matches_the_oracle(per):
    x = _weights(3) * F32(3.0)
    x.reshape(4, -1)[2] = 0.0
    xt = torch.tensor(x, requires_grad=True)
    y = T.absmax(xt, 8, per)
    _eq(y, O.absmax(x, 8, per))
    assert torch.equal(y.detach().abs().amax(), xt.detach().abs().amax())  # max|x| exact
    y.sum().backward()
    assert torch.equal(xt.grad, torch.ones_like(xt))


@pytest.mark.parametrize("per_channel, t", [(False, 0.05), (True, 0.3), (False, 0.0)])
def test_ttq_forward_and_gradients_match_the_oracle(per_channel, t):
    w = _weights(4)
    w.reshape(4, -1)[2, 0] = 1.0  # the zero row gets one weight (threshold 0 at t = 0 ...)
    shape = (4,) if per_channel else ()
    wp = np.full(shape, 1.5, F32)
    wn = np.full(shape, 0.75, F32)
    wt = torch.tensor(w, requires_grad=True)
    pt = torch.tensor(wp, requires_grad=True)
    nt = torch.tensor(wn, requires_grad=True)
    y = T.ttq(wt, pt, nt, t, per_channel)
    _eq(y, O.ttq(w, wp, wn, t, per_channel))
    dy = _dy(w.shape)
    y.backward(torch.tensor(dy))
    dw, dwp, dwn = O.ttq_grad(w, wp, wn, dy, t, per_channel)
    _eq(wt.grad, dw)
    _eq(pt.grad, dwp)
    _eq(nt.grad, dwn)


LSQ_CASES = [(2, True, None), (3, True, None), (4, False, None), (8, True, None),
             (3, True, 0.1875), (2, False, -0.25)]


@pytest.mark.parametrize("bits, signed, beta", LSQ_CASES)
def test_lsq_forward_and_gradients_match_the_oracle(bits, signed, beta):
    s = F32(0.25)
    qn, qp = L.lsq_levels(bits, signed)
    b = 0.0 if beta is None else beta
    ks = np.arange(-qn - 2, qp + 3, dtype=F32)
    # levels, ties (k + 0.5) * s in both directions, the bounds and beyond, zeros
    x = np.concatenate([ks * s, (ks + F32(0.5)) * s, (ks - F32(0.5)) * s,
                        np.array([0.0, -0.0, 1e-30, -40.0, 40.0], F32)]).astype(F32) + F32(b)
    x = x.astype(F32)
    xt = torch.tensor(x, requires_grad=True)
    st = torch.tensor(s, requires_grad=True)
    bt = None if beta is None else torch.tensor(F32(beta), requires_grad=True)
    y = L.lsq(xt, st, bits, signed, bt)
    _eq(y, O.lsq(x, s, bits, signed, beta))
    dy = _dy(x.shape)
    y.backward(torch.tensor(dy))
    dx, ds, db = O.lsq_grad(x, s, bits, dy, signed, beta)
    _eq(xt.grad, dx)
    _eq(st.grad, np.asarray(ds))
    if beta is not None:
        _eq(bt.grad, np.asarray(db))


def test_lsq_quantizer_starts_from_data_and_scales_the_gradient_by_g():
    w = torch.tensor(_weights(5))
    q = Q.LSQ(bits=3)
    q.setup(w)  # a weight: N = w.numel()
    assert math.isclose(float(q.step.detach()), O.lsq_init_step(w.numpy(), 3), rel_tol=1e-6)
    wt = w.clone().requires_grad_(True)
    dy = _dy(w.shape)
    q(wt).backward(torch.tensor(dy))
    s = F32(q.step.detach())
    _, ds, _ = O.lsq_grad(w.numpy(), s, 3, dy, n=w.numel())
    _eq(q.step.grad, np.asarray(ds))
    assert math.isclose(q._g(wt), 1 / math.sqrt(w.numel() * 3))
    a = Q.LSQ(bits=4, signed=False)  # activations: first training batch, N per sample
    x = torch.rand(5, 2, 3, 3) * 4
    a.train()
    a(x)
    assert math.isclose(float(a.step.detach()), O.lsq_init_step(x.numpy(), 4, False), rel_tol=1e-6)
    assert math.isclose(a._g(x), 1 / math.sqrt(18 * 15))
    a(x * 100)  # started once
    assert math.isclose(float(a.step.detach()), O.lsq_init_step(x.numpy(), 4, False), rel_tol=1e-6)
    p = Q.LSQ(bits=2, signed=False, offset=True)
    p.train()
    p(torch.tensor([-1.0, 0.5, 2.0]))  # LSQ+: [min, max] on the ends of the grid
    assert math.isclose(float(p.step.detach()), 1.0) and float(p.beta.detach()) == -1.0


def test_lsq_step_stays_positive_after_an_optimizer_step():
    q = Q.LSQ(bits=4, init_step=0.01)
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    q.step.grad = torch.tensor(5.0)
    opt.step()  # would make it negative; the global post-step hook projects it
    assert float(q.step.detach()) == pytest.approx(1e-8)


def _bn_mlp(seed: int) -> torch.nn.Module:
    from fewbits import quantize_

    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(256, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                            torch.nn.Linear(32, 4), torch.nn.BatchNorm1d(4))
    return quantize_(m, "lsq", quantize_input=False)


@pytest.mark.parametrize("how", ["param_groups", "quantize_optimizer"])
def test_lsq_steps_do_not_collapse_under_adam(how):
    """Adam normalises away LSQ's gradient scale: with the step at lr, a 4-bit weight step of
    ~0.02 (fan-in 256, batch norm after, so no restoring force) falls to a fraction of itself
    in 20 iterations (measured: 0.024 -> 0.009; on the MNIST MLP to the 1e-8 floor, where the
    net stayed at chance). fewbits' groups train it at 0.01 * lr."""
    from fewbits import quantize_
    from fewbits.quantizers import optim as qoptim

    lr = 1e-2
    if how == "param_groups":
        m = _bn_mlp(0)
        opt = torch.optim.Adam(qoptim.param_groups(m.parameters(), lr), lr=lr)
    else:  # an optimizer built before quantize_, which adds the steps in their own group
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(256, 32), torch.nn.BatchNorm1d(32),
                                torch.nn.ReLU(), torch.nn.Linear(32, 4),
                                torch.nn.BatchNorm1d(4))
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        m = quantize_(m, "lsq", quantize_input=False, optimizer=opt)
    steps = {n: p for n, p in m.named_parameters() if n.endswith("step")}
    assert any(g.get("lr_scale") == Q.lsq.ADAPTIVE_LR_SCALE and g["lr"] == lr * 0.01
               and all(any(p is s for s in steps.values()) for p in g["params"])
               for g in opt.param_groups)
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    y = torch.arange(64) % 4
    m.train()
    m(x)  # activation steps start from the first batch
    start = {n: float(p.detach()) for n, p in steps.items()}
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    for n, p in steps.items():
        assert float(p.detach()) > 0.8 * start[n], (n, start[n], float(p.detach()))
    # plain SGD sees LSQ's own gradient scale: one group, no factor
    assert len(qoptim.param_groups(_bn_mlp(0).parameters(), lr, adaptive=False)) == 1


def test_fewbits_train_puts_lsq_steps_in_their_own_adam_group(tmp_path):
    from fewbits.cli import main

    run = tmp_path / "r"
    assert main(["train", "-c", "cpu", "--net", "mnist_lsq_mlp", "--model-arg", "width=16",
                 "--dataset", "synthetic", "--synthetic-size", "64", "-b", "32", "-i", "1",
                 "-l", "0.004", "--no-plot", "--no-progress", "-m", str(run)]) == 0
    groups = torch.load(run / "checkpoint.pt", weights_only=False)["optimizer"]["param_groups"]
    scaled = [g for g in groups if "lr_scale" in g]
    assert len(groups) == 2 and len(scaled) == 1
    assert scaled[0]["lr_scale"] == 0.01 and scaled[0]["lr"] == pytest.approx(0.004 * 0.01)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", ["ternary", {"name": "ternary", "mode": "absmean"},
                                  {"name": "ternary", "mode": "ttq"}, "absmax", "lsq",
                                  {"name": "binary_connect", "stochastic": True, "seed": 1}])
def test_nonfinite_input_is_refused(spec, bad):
    w = torch.tensor(_weights(6))
    q = Q.get(spec)
    q.setup(w)
    q.train()
    w.view(-1)[3] = bad
    with pytest.raises(ValueError, match="NaN|inf"):
        q(w)


def test_invalid_options_name_the_option():
    for spec, match in [({"name": "ternary", "mode": "twin"}, "unknown mode"),
                        ({"name": "ternary", "threshold": 1.0}, "threshold"),
                        ({"name": "lsq", "bits": 9}, "bits"), ({"name": "lsq", "bits": 1}, "bits"),
                        ({"name": "lsq", "init_step": 0.0}, "init_step"),
                        ({"name": "absmax", "per": "row"}, "per must"),
                        ({"name": "binary_connect", "seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=match):
            Q.get(spec)
    with pytest.raises(ValueError, match="per_channel=False") as info:
        Q.Ternary("twn").setup(torch.zeros(5))
    assert "None" not in str(info.value)  # TWN's None is per channel: no way out for a bias
    with pytest.raises(ValueError, match="step s must be > 0"):
        L.lsq(torch.ones(3), torch.tensor(0.0))
    # the functions check their options too: absmax(bits=1) gave NaN everywhere (Q = 0), eps=0
    # NaN for an all-zero tensor, bits=0 a grid with Q < 0
    z = torch.zeros(2, 3)
    for call, match in [(lambda: T.absmax(z + 1, bits=1), "bits"),
                        (lambda: T.absmax(z + 1, bits=0), "bits"),
                        (lambda: T.absmax(z + 1, bits=17), "bits"),
                        (lambda: T.absmax(z, eps=0.0), "eps"),
                        (lambda: T.absmean(z, eps=0.0), "eps"),
                        (lambda: T.absmean(z, eps=float("nan")), "eps")]:
        with pytest.raises(ValueError, match=match):
            call()


def test_stochastic_sign_matches_the_oracle():
    w = np.array([-3.0, -1.0, -0.5, 0.0, 0.0, 0.5, 1.0, 3.0, 0.25, 0.25], F32)
    u = np.array([0.0, 0.0, 0.25, 0.4999, 0.5, 0.74, 0.999, 0.5, 0.625, 0.6251], F32)
    wt = torch.tensor(w, requires_grad=True)
    y = S.stochastic_sign(wt, torch.tensor(u))
    _eq(y, O.stochastic_sign(w, u))
    y.sum().backward()
    assert torch.equal(wt.grad, torch.ones_like(wt))


def test_stochastic_binary_connect_is_seeded_resumable_and_recomputed_alike():
    w = torch.zeros(2000)  # p = 0.5 everywhere
    torch.manual_seed(7)
    a = Q.BinaryConnect(stochastic=True)
    torch.manual_seed(7)
    b = Q.BinaryConnect(stochastic=True)
    c = Q.BinaryConnect(stochastic=True)  # another draw of the global generator
    first = a(w)
    assert torch.equal(first, b(w)) and not torch.equal(first, c(w))
    assert abs(float(first.mean())) < 0.1  # +-1 with probability 1/2
    state = {k: v.clone() for k, v in a.state_dict().items()}
    second = a(w)
    r = Q.BinaryConnect(stochastic=True, seed=123)  # a resumed run: other seed, loaded state
    r.load_state_dict(state)
    assert torch.equal(r(w), second)
    a.eval()
    assert torch.equal(a(w), torch.ones_like(w))  # evaluation: the deterministic sign
    a.train()
    lin = torch.nn.Parameter(torch.zeros(64))
    seen = []

    def f(p):
        b = a(p)
        seen.append(b.detach())
        return b * p

    y = checkpoint(f, lin, use_reentrant=False)
    y.sum().backward()  # the recomputation draws the same noise again
    assert len(seen) == 2 and torch.equal(seen[0], seen[1]) and torch.equal(lin.grad, seen[0])
    assert not torch.equal(a(lin.detach()), seen[0])  # and the stream moved on once
    assert not Q.BinaryConnect().state_dict()  # the deterministic one keeps no state
    bad = Q.BinaryConnect(stochastic=True, seed=1)
    bad.rng_state = torch.zeros(7, dtype=torch.uint8)  # (load_state_dict refuses the size)
    with pytest.raises(ValueError, match="rng_state is not a CPU generator state"):
        bad(w)


@pytest.mark.parametrize("spec", [{"name": "binary_connect", "stochastic": True, "seed": 3},
                                  Q.BinaryConnect(stochastic=True, seed=3),
                                  Q.BinaryConnect(stochastic=True)])
def test_quantize_gives_each_layer_its_own_reproducible_stochastic_stream(spec):
    """One seeded spec (or one instance, copied) for a whole model gave every layer the same
    stream: same-shaped layers drew identical noise at every step, not independent draws."""
    import fewbits

    def net():
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        return fewbits.quantize_(m, {"weight": spec})

    a, b = net(), net()
    qa, qb = (tuple(m[i].weight_quantizer for i in (0, 1)) for m in (a, b))
    if not isinstance(spec, Q.Quantizer) or spec.seed is not None:  # seeded: the same streams
        assert torch.equal(qa[0].rng_state, qb[0].rng_state)
    assert not torch.equal(qa[0].noise((8, 8)), qa[1].noise((8, 8)))


# ------------------------------------------------------- the families end to end (fast form)


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))


BITNET = {"weight": {"name": "ternary", "mode": "absmean"},
          "input": {"name": "absmax", "per": "sample"}}
TTQ = {"weight": {"name": "ternary", "mode": "ttq", "per_channel": True}}
LSQ_PLUS = {"weight": {"name": "lsq", "bits": 3},
            "input": {"name": "lsq", "bits": 2, "signed": False, "offset": True}}


@pytest.mark.parametrize("config", ["ternary", "lsq", BITNET, TTQ, LSQ_PLUS],
                         ids=["ternary", "lsq", "bitnet", "ttq", "lsq+"])
def test_quantize_train_state_dict_and_packed_file_round_trip(config, tmp_path):
    from fewbits import quantize_
    from fewbits.export import export_packed, load_packed

    m = quantize_(_tiny(), config, quantize_input=False)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8) % 3
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    m.train()
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    moved = [k for k, v in m.named_parameters() if not torch.equal(v.detach(), before[k])]
    # steps and levels train (LSQ+'s offset only once values fall outside its first range)
    assert {k for k in before if "quantizer" in k and not k.endswith("beta")} <= set(moved)
    m.eval()
    again = quantize_(_tiny(), config, quantize_input=False)
    again.load_state_dict(m.state_dict())
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x), m(x))
    report = export_packed(m, tmp_path / "m.fewbits")
    back = load_packed(tmp_path / "m.fewbits", model=quantize_(_tiny(), config))
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    if config in ("ternary", TTQ):  # five ternary weights a byte
        conv = next(e for e in report.quantized if e.name.startswith("0."))
        assert conv.encoding == "trits" and conv.count == 36


def test_stochastic_option_reaches_the_zoo_and_is_refused_where_unused(tmp_path):
    """``--stochastic`` (QuantConfig.stochastic) gives the binary families' weights stochastic
    binarization and is refused, not ignored, by a family with no binary weights."""
    from fewbits.cli import main
    from fewbits.models import create_model

    m = create_model("mnist_binary_connect_lenet", stochastic=True)
    qs = [mod for n, mod in m.named_modules() if n.endswith("weight_quantizer")]
    assert qs and all(q.stochastic for q in qs)
    assert not any(q.stochastic for n, q in create_model("mnist_binary_net_lenet").named_modules()
                   if n.endswith("weight_quantizer"))
    assert main(["train", "-c", "cpu", "--net", "mnist_fp_net_lenet", "--stochastic",
                 "--dataset", "synthetic", "-i", "1", "-m", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


@pytest.mark.parametrize("mode", ["twn", "absmean"])
def test_ternary_eval_keeps_its_weights_form_and_follows_any_change(mode, monkeypatch):
    """Issue 25: evaluation recomputed TWN's threshold and scale at every forward. In eval the
    quantizer now keeps the last weight's form; every way of changing the weight (an in-place
    op, which bumps the version counter; ``w.data.mul_``, which does not; load_state_dict)
    changes the output, and the gradient is still the identity."""
    from fewbits.layers import QuantConv2d

    torch.manual_seed(0)
    layer = QuantConv2d(3, 4, 3, bias=False, weight_quantizer={"name": "ternary", "mode": mode})
    x = torch.randn(2, 3, 6, 6)
    calls = []
    formula = T.twn if mode == "twn" else T.absmean
    monkeypatch.setattr(T, mode, lambda *a, **k: calls.append(1) or formula(*a, **k))
    layer.eval()

    def fresh():
        return torch.nn.functional.conv2d(x, formula(layer.weight.detach(), mode == "twn"))

    with torch.no_grad():
        y0 = layer(x)
        assert torch.equal(layer(x), y0) and torch.equal(y0, fresh()) and len(calls) == 1
        layer.weight.data[0].mul_(-3)  # no version bump
        y1 = layer(x)
        assert not torch.equal(y1, y0) and torch.equal(y1, fresh()) and len(calls) == 2
        layer.weight[1].add_(1.0)  # version bump
        assert torch.equal(layer(x), fresh()) and len(calls) == 3
        out = layer.weight_quantizer(layer.weight)
        out.zero_()  # the caller's copy: what is kept stays right
        assert torch.equal(layer(x), fresh()) and len(calls) == 3
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight"][2] = 0.5
    layer.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(layer(x), fresh())
    layer(x).sum().backward()  # eval with grad: the identity straight-through gradient
    g = torch.nn.functional.grad.conv2d_weight(x, layer.weight.shape, torch.ones_like(layer(x)))
    assert torch.allclose(layer.weight.grad, g)
    layer.train()
    assert layer.weight_quantizer._kept is None
    layer.eval()(x)
    layer.to(torch.float64)  # model.cpu() would otherwise keep a GPU copy of every weight
    assert layer.weight_quantizer._kept is None
    # torch.func: vmap over an ensemble of weights raised (no batching rule for aten::equal),
    # and grad would keep a tensor of the transform in the quantizer
    layer.float()
    x = x.float()
    ws = torch.randn(3, *layer.weight.shape)
    ys = torch.func.vmap(lambda w: torch.func.functional_call(layer, {"weight": w}, (x,)))(ws)
    for w, y in zip(ws, ys, strict=True):
        assert torch.equal(y, torch.nn.functional.conv2d(x, formula(w, mode == "twn")))
    torch.func.grad(lambda w: torch.func.functional_call(layer, {"weight": w}, (x,)).sum())(ws[0])
    kept = layer.weight_quantizer._kept
    assert kept is None or not torch._C._functorch.is_functorch_wrapped_tensor(kept[0])
