"""Every method's loss, value and gradient, against its formula in docs/methods.md.

A fake UNet stands in for the student and the teacher: ε(x, t, c) = a[c] ⊙ (W x) + b[c] + 1e-3·t,
with a per-prompt channel scale a[c] and bias b[c] and a shared channel mix W, all learnable (the
teacher is another draw, frozen). Each expected loss is written out below in plain torch from the
docs' formulas, with ‖u − v‖² the per-element mean square averaged over the batch, and compared with
`Method.loss`; so is its gradient w.r.t. the student's parameters. The number of student and teacher
calls per step is checked against the docs too. Plain torch, float64, no diffusers, no DeepSpeed.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch.func import functional_call

from fastunlearn import methods as M
from fastunlearn.dual import GADual

C, H, W = 2, 3, 3
P = 8            # prompt ids: 0 = ∅, 1-2 forget, 3-5 retain, 6-7 anchor
NULL, FORGET, RETAIN, ANCHOR = 0, (1, 3), (3, 6), (6, 8)
DT = torch.float64


def eps(params: dict, x, t, ids):
    """The fake UNet as a plain function of its parameters."""
    mixed = torch.einsum("dc,bchw->bdhw", params["w"], x)
    return (params["a"][ids][:, :, None, None] * mixed + params["b"][ids][:, :, None, None]
            + 1e-3 * t.to(x.dtype)[:, None, None, None])


class FakeUNet(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(1 + 0.3 * torch.randn(P, C, generator=g, dtype=DT))
        self.b = torch.nn.Parameter(0.3 * torch.randn(P, C, generator=g, dtype=DT))
        self.w = torch.nn.Parameter(torch.eye(C, dtype=DT) + 0.2 * torch.randn(C, C, generator=g, dtype=DT))

    def forward(self, x, t, ids):
        return eps(dict(self.named_parameters()), x, t, ids)


class Caller:
    """step.student / step.teacher: all items in ONE model call; counts calls (and those without grad)."""

    def __init__(self, module, params=None):
        self.module, self.params = module, params
        self.calls = self.calls_without_grad = 0

    def __call__(self, *items, grad=True):
        self.calls += 1
        self.calls_without_grad += not grad
        sizes = [len(x) for x, _, _ in items]
        x, t, ids = (torch.cat([it[k] for it in items]) for k in range(3))
        with torch.set_grad_enabled(grad):
            out = self.module(x, t, ids) if self.params is None else functional_call(self.module, self.params,
                                                                                       (x, t, ids))
        return list(out.split(sizes))


def models():
    student = FakeUNet(1)
    teacher = FakeUNet(2).requires_grad_(False)
    return student, teacher, Caller(student), Caller(teacher)


def make_step(seed: int, student, teacher, Bf: int = 3, Br: int = 4) -> M.Step:
    g = torch.Generator().manual_seed(1000 + seed)

    def r(n):
        return torch.randn(n, C, H, W, generator=g, dtype=DT)

    def ids(n, lo_hi):
        return torch.randint(*lo_hi, (n,), generator=g)

    return M.Step(x_f=r(Bf), x_r=r(Br), t_f=torch.randint(0, 1000, (Bf,), generator=g),
                  t_r=torch.randint(0, 1000, (Br,), generator=g), c_f=ids(Bf, FORGET), c_r=ids(Br, RETAIN),
                  a_f=ids(Bf, ANCHOR), alt_r=ids(Bf, RETAIN), eps_f=r(Bf), eps_r=r(Br), fresh_f=r(Bf),
                  student=student, teacher=teacher)


def config(method: str, forget_target: str = "esd", retain_target: str = "teacher", forget_eta: float = 0.8):
    """The run's config as the methods read it; every knob away from its default so that it is seen."""
    return types.SimpleNamespace(
        method=method, forget_target=forget_target, forget_eta=forget_eta, retain_target=retain_target,
        ovw=M.OVWConfig(alpha=0.3), ga=M.GAConfig(beta=0.7), salun=M.SalUnConfig(alpha=0.6, mask_ratio=0.25),
        erasediff=M.EraseDiffConfig(inner_steps=3, inner_lr=0.05, lambda_b=0.4),
        saddle=M.SaddleConfig(dual="ga", tau=0.3, eta_lambda=0.2, lambda_init=0.7, lambda_max=5.0, gap_ema=0.8,
                              g0_batches=3, probe_every=0))


# ---- the formulas of docs/methods.md, in plain torch ------------------------------------------------
def msq(u, v):
    """‖u − v‖²: the per-element mean square, averaged over the batch."""
    return (u - v).pow(2).mean()


def S(student, x, t, c):
    """The student's output; `student` is the module or a dict of parameter values."""
    return eps(student if isinstance(student, dict) else dict(student.named_parameters()), x, t, c)


def T(teacher, x, t, c):
    with torch.no_grad():
        return eps(dict(teacher.named_parameters()), x, t, c)


def null(x):
    return torch.full((len(x),), NULL, dtype=torch.long)


def R(st, s, te, retain_target="teacher"):
    """‖ε_θ(x^r, c_r) − ε_θ0(x^r, c_r)‖² + ‖ε_θ(x^{f∪r}, ∅) − ε_θ0(x^{f∪r}, ∅)‖² (ε instead of the teacher
    on the first line with retain_target noise)."""
    x, t = torch.cat([st.x_f, st.x_r]), torch.cat([st.t_f, st.t_r])
    first = st.eps_r if retain_target == "noise" else T(te, st.x_r, st.t_r, st.c_r)
    return msq(S(s, st.x_r, st.t_r, st.c_r), first) + msq(S(s, x, t, null(x)), T(te, x, t, null(x)))


def y_f(st, te, forget_target, eta):
    if forget_target == "esd":   # ε_θ0(x, ∅) − η (ε_θ0(x, c_f) − ε_θ0(x, ∅))
        u = T(te, st.x_f, st.t_f, null(st.x_f))
        return u - eta * (T(te, st.x_f, st.t_f, st.c_f) - u)
    if forget_target == "anchor":
        return T(te, st.x_f, st.t_f, st.a_f)
    return st.fresh_f


def G(st, s, te, forget_target="esd", eta=0.8):
    return msq(S(s, st.x_f, st.t_f, st.c_f), y_f(st, te, forget_target, eta))


def check(loss, expected, student):
    params = [p for p in student.parameters()]
    got_grads = torch.autograd.grad(loss, params, retain_graph=True)
    want_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-6, atol=1e-9)
    assert abs(float(expected.detach())) > 1e-3  # never a trivially zero case
    for p, got, want in zip(("a", "b", "w"), got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9, msg=lambda m, p=p: f"d loss / d {p}: {m}")
    assert any(g.abs().sum() > 0 for g in want_grads)


def run(method_name, **cfg_kwargs):
    s, te, sc, tc = models()
    cfg = config(method_name, **cfg_kwargs)
    method = M.make_method(cfg)
    st = make_step(0, sc, tc)
    return method, cfg, st, s, te, sc, tc


def step_maker(student, teacher):
    """Context.make_step for a method's setup: seeded steps, recorded by step number."""
    steps = {}

    def make(step, micro):
        steps[step] = make_step(step, student, teacher)
        return steps[step]

    return steps, make


# ---- one test per method ---------------------------------------------------------------------------
def test_the_registry_is_the_documented_methods():
    from fastunlearn.config import CLOSED_FORM_METHODS, TRAINED_METHODS

    assert set(M.METHOD_CLASSES) == {"saddle", "ovw", "esd", "ga", "ca", "salun", "erasediff", "uce", "rece"}
    assert CLOSED_FORM_METHODS == ["uce", "rece"] and set(TRAINED_METHODS) == set(M.METHOD_CLASSES) - {"uce", "rece"}
    for name, cls in M.METHOD_CLASSES.items():
        if not cls.closed_form:  # uce and rece: tests/test_uce.py
            assert type(M.make_method(config(name))) is cls


@pytest.mark.parametrize("forget_target", ["esd", "anchor", "noise"])
@pytest.mark.parametrize("retain_target", ["teacher", "noise"])
def test_ovw_is_r_plus_alpha_g(forget_target, retain_target):
    method, cfg, st, s, te, sc, tc = run("ovw", forget_target=forget_target, retain_target=retain_target)
    loss, logs = method.loss(st)
    r, g = R(st, s, te, retain_target), G(st, s, te, forget_target, cfg.forget_eta)
    check(loss, r + cfg.ovw.alpha * g, s)
    torch.testing.assert_close(logs["G"].double(), g.detach())
    assert (sc.calls, tc.calls) == (1, 1)


@pytest.mark.parametrize("forget_target", ["esd", "anchor", "noise"])
def test_saddle_loss_and_dual_update(forget_target):
    method, cfg, st, s, te, sc, tc = run("saddle", forget_target=forget_target)
    a = cfg.saddle
    method.lam, method.tau, method.g0 = 0.7, 0.05, 0.4
    method.dual, method.peak_lambda = GADual(0.4, 0.05, a.eta_lambda, 0.7, a.lambda_max, a.gap_ema), 0.7
    method.dual.g_hat = 0.3
    loss, logs = method.loss(st)
    r, g = R(st, s, te), G(st, s, te, forget_target, cfg.forget_eta)
    check(loss, r + 0.7 * (g - 0.05), s)
    assert (sc.calls, tc.calls) == (1, 1)
    # after the optimiser step (dual: ga): Ĝ ← ρĜ + (1−ρ)G, λ ← clip(λ + (η_λ/G0)(Ĝ − τ), 0, λ_max)
    method.after_step({"G": float(logs["G"].detach())}, step=7)  # the trainer passes floats
    g_hat = a.gap_ema * 0.3 + (1 - a.gap_ema) * float(g.detach())
    assert method.dual.g_hat == pytest.approx(g_hat, rel=1e-6)
    assert method.lam == pytest.approx(min(max(0.7 + a.eta_lambda / 0.4 * (g_hat - 0.05), 0), a.lambda_max), rel=1e-6)
    assert method.constraint_met_step is None and g_hat > 0.05
    method.dual.lam, method.dual.g_hat = 4.9, 50.0   # far above τ: λ clipped at λ_max; far below: at 0, constraint met
    method.after_step({"G": 50.0}, step=8)
    assert method.lam == a.lambda_max
    method.dual.lam, method.dual.g_hat = 0.01, 0.0
    method.after_step({"G": 0.0}, step=9)
    assert method.lam == 0.0 and method.constraint_met_step == 9


def test_saddle_setup_measures_g0_on_the_teacher_and_sets_tau():
    """G0 = G of the original model (student = teacher) averaged over saddle.g0_batches fixed forget
    batches; τ = saddle.tau · G0; Ĝ starts at G0 (dual: ga)."""
    method, cfg, _, s, te, sc, tc = run("saddle")
    steps, make = step_maker(sc, tc)
    reduced = []
    ctx = M.Context(module=s, make_step=make, call=None, teacher=tc, all_reduce=lambda v, op: reduced.append(op) or v,
                    all_reduce_sum_=None)
    method.setup(ctx)
    assert sorted(steps) == [-3, -2, -1] and reduced == ["mean"]
    g0 = sum(msq(T(te, st.x_f, st.t_f, st.c_f), y_f(st, te, "esd", cfg.forget_eta)) for st in steps.values()) / 3
    assert method.g0 == pytest.approx(float(g0), rel=1e-6)
    assert method.tau == pytest.approx(cfg.saddle.tau * float(g0), rel=1e-6)
    assert method.dual.g_hat == method.g0 and method.lam == cfg.saddle.lambda_init


def test_saddle_probe_is_g_of_the_student_on_the_g0_batches():
    """The constraint probe: G of the current student on the same fixed forget batches and targets
    as G0, divided by G0 (so 1 for the original model); every saddle.probe_every steps, it alone
    decides constraint_met_step."""
    method, cfg, _, s, te, sc, tc = run("saddle")
    method.args.probe_every = 5
    steps, make = step_maker(sc, tc)

    def call(items, params=None, grad=True):
        return Caller(s)(*items, grad=grad)

    ctx = M.Context(module=s, make_step=make, call=call, teacher=tc, all_reduce=lambda v, op: v, all_reduce_sum_=None)
    method.setup(ctx)
    probe = sum(msq(S(s, st.x_f, st.t_f, st.c_f), y_f(st, te, "esd", cfg.forget_eta)) for st in steps.values()) / 3
    assert method.probe() == pytest.approx(float(probe) / method.g0, rel=1e-6)  # the primitive sums in fp32
    steps.clear()
    method.probe()
    assert not steps  # the batches (and their teacher targets) were kept, not drawn again
    with torch.no_grad():  # the student becomes the teacher: the probe reads 1, as at θ0
        for p, q in zip(s.parameters(), te.parameters()):
            p.copy_(q)
    assert method.probe() == pytest.approx(1.0, rel=1e-6)
    for step in range(1, 11):  # the batch G (and its running mean) is far below τ, but the probe reads 1
        method.after_step({"G": 0.0}, step)
    assert method.constraint_met_step is None and method.dual.parts()["gap"] < method.args.tau
    assert [p[0] for p in method.probe_trace] == [5, 10] and all(v == pytest.approx(1.0) for _, v in method.probe_trace)


@pytest.mark.parametrize("forget_target", ["esd", "anchor", "noise"])
def test_esd_is_g_only(forget_target):
    method, cfg, st, s, te, sc, tc = run("esd", forget_target=forget_target)
    loss, _ = method.loss(st)
    check(loss, G(st, s, te, forget_target, cfg.forget_eta), s)
    assert (sc.calls, tc.calls) == (1, 1)


@pytest.mark.parametrize("retain_target", ["teacher", "noise"])
def test_ga_is_r_minus_beta_denoising_loss(retain_target):
    method, cfg, st, s, te, sc, tc = run("ga", retain_target=retain_target)
    loss, _ = method.loss(st)
    f = msq(S(s, st.x_f, st.t_f, st.c_f), st.eps_f)
    check(loss, R(st, s, te, retain_target) - cfg.ga.beta * f, s)
    assert (sc.calls, tc.calls) == (1, 1)


def test_ca_distils_onto_the_current_model_under_the_anchor():
    """‖ε_θ(x^f, c_f) − sg(ε_θ(x^f, c_a))‖² + R; the anchor output is the current student, stop-gradient."""
    method, cfg, st, s, te, sc, tc = run("ca")
    loss, _ = method.loss(st)
    anchor = S(s, st.x_f, st.t_f, st.a_f).detach()
    check(loss, msq(S(s, st.x_f, st.t_f, st.c_f), anchor) + R(st, s, te), s)
    assert (sc.calls, sc.calls_without_grad, tc.calls) == (2, 1, 1)


def test_salun_loss_relabels_to_a_random_retain_prompt():
    """‖ε_θ(x^f, c_f) − sg(ε_θ(x^f, c_r'))‖² + α·R, c_r' = alt_r."""
    method, cfg, st, s, te, sc, tc = run("salun")
    loss, _ = method.loss(st)
    relabel = S(s, st.x_f, st.t_f, st.alt_r).detach()
    check(loss, msq(S(s, st.x_f, st.t_f, st.c_f), relabel) + cfg.salun.alpha * R(st, s, te), s)
    assert (sc.calls, sc.calls_without_grad, tc.calls) == (2, 1, 1)


def test_salun_mask_keeps_the_top_share_by_forget_gradient_and_zeroes_the_rest():
    """Mask = the top `mask_ratio` of trained weights by |∇ ‖ε_θ(x^f, c_f) − ε‖²| summed over
    `mask_batches` forget batches; gradients outside it are zeroed."""
    method, cfg, _, s, te, sc, tc = run("salun")
    steps, make = step_maker(sc, tc)
    ctx = M.Context(module=s, make_step=make, call=lambda items, grad=True: Caller(s)(*items, grad=grad),
                    teacher=tc, all_reduce=None, all_reduce_sum_=lambda t: None)
    params = list(s.parameters())
    score = [torch.zeros_like(p) for p in params]
    for b in range(cfg.salun.mask_batches):
        st = make_step(-100 - b, sc, tc)
        for acc, gr in zip(score, torch.autograd.grad(msq(S(s, st.x_f, st.t_f, st.c_f), st.eps_f), params)):
            acc += gr.abs()
    flat = torch.cat([x.flatten() for x in score])
    keep = round(flat.numel() * cfg.salun.mask_ratio)
    assert int((flat > 0).sum()) > keep  # the top share lies among non-zero scores: no ties at the threshold
    top = torch.zeros_like(flat, dtype=torch.bool)
    top[flat.topk(keep).indices] = True
    masks = list(top.split([p.numel() for p in params]))

    method.setup(ctx)
    assert sorted(steps) == [-100 - b for b in reversed(range(cfg.salun.mask_batches))]
    assert method.mask_fraction == pytest.approx(keep / flat.numel())
    st = make_step(0, sc, tc)
    loss, _ = method.loss(st)
    expected = msq(S(s, st.x_f, st.t_f, st.c_f), S(s, st.x_f, st.t_f, st.alt_r).detach()) + cfg.salun.alpha * R(st, s, te)
    got = torch.autograd.grad(loss, params)
    plain = [p.detach().clone().requires_grad_(True) for p in params]  # the expected gradient, no mask hooks
    values = dict(zip(("a", "b", "w"), plain))
    exp_plain = msq(S(values, st.x_f, st.t_f, st.c_f), S(values, st.x_f, st.t_f, st.alt_r).detach()) + \
        cfg.salun.alpha * R(st, values, te)
    torch.testing.assert_close(loss.double(), expected.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(exp_plain, expected.detach())
    for g, want, m in zip(got, torch.autograd.grad(exp_plain, plain), masks):
        torch.testing.assert_close(g, want * m.view_as(want), rtol=1e-5, atol=1e-9)


def test_erasediff_is_r_plus_lambda_b_times_f_minus_f_hat():
    """R + λ_b (f(θ) − f̂), f(θ) = ‖ε_θ(x^f, c_f) − ε'‖², f̂ = f after K inner SGD steps (inner_lr) from θ
    on a copy, a constant; the student's weights are untouched."""
    method, cfg, st, s, te, sc, tc = run("erasediff")
    module_calls = []

    def call(items, params=None, grad=True):
        module_calls.append(grad)
        return Caller(s, params)(*items, grad=grad)

    method.setup(M.Context(module=s, make_step=None, call=call, teacher=tc, all_reduce=None, all_reduce_sum_=None))
    before = {n: p.detach().clone() for n, p in s.named_parameters()}
    loss, logs = method.loss(st)
    a = cfg.erasediff
    theta = {n: p.detach().clone() for n, p in s.named_parameters()}
    for _ in range(a.inner_steps):
        theta = {n: p.requires_grad_(True) for n, p in theta.items()}
        f_k = msq(eps(theta, st.x_f, st.t_f, st.c_f), st.fresh_f)
        theta = {n: (p - a.inner_lr * g).detach() for (n, p), g in zip(theta.items(),
                                                                       torch.autograd.grad(f_k, list(theta.values())))}
    f_hat = msq(eps(theta, st.x_f, st.t_f, st.c_f), st.fresh_f)
    f = msq(S(s, st.x_f, st.t_f, st.c_f), st.fresh_f)
    assert float((f - f_hat).detach()) > 1e-4  # the inner steps moved f
    torch.testing.assert_close(logs["f_hat"].double(), f_hat, rtol=1e-6, atol=1e-9)
    check(loss, R(st, s, te) + a.lambda_b * (f - f_hat), s)
    for n, p in s.named_parameters():
        assert torch.equal(p, before[n])
    assert (sc.calls, tc.calls) == (1, 1)
    assert module_calls == [True] * a.inner_steps + [False]
