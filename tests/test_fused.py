"""fused.py: the agents' LSTMs in one call, against torch.nn.LSTM.

Both implementations (the C++ kernel and the plain-torch reference) must give nn.LSTM's last
output and gradients for every agent, including the small-batch path used when acting (M <= 2),
the shared-network case (K = 1) and float64 (gradcheck). If the kernel cannot be built the
module must say so in one line and fall back to the reference.
"""

import pytest
import torch

import fused

needs_kernel = pytest.mark.skipif(fused.kernel() is None, reason="C++ kernel could not be built here")


def lstms_and_stacked(K, I, H, dtype=torch.float32, seed=0):
    """K independent nn.LSTM(I, H) and their weights stacked as lstm_last takes them."""
    torch.manual_seed(seed)
    mods = [torch.nn.LSTM(I, H).to(dtype) for _ in range(K)]
    with torch.no_grad():  # larger than default init so that saturation and sign changes happen
        for m in mods:
            for p in m.parameters():
                p.uniform_(-0.6, 0.6)
    stack = lambda name: torch.stack([getattr(m, name) for m in mods]).detach().clone().requires_grad_()
    w_ih, w_hh = stack("weight_ih_l0"), stack("weight_hh_l0")
    b_ih, b_hh = stack("bias_ih_l0"), stack("bias_hh_l0")
    return mods, w_ih, w_hh, b_ih, b_hh


def nn_reference(mods, x):
    """Last output of each nn.LSTM on its own window x[k] (W, M, I), zero initial state."""
    return torch.stack([m(x[k])[0][-1] for k, m in enumerate(mods)])


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize(
    "K,W,M,I,H",
    [(6, 8, 64, 64, 64), (6, 8, 1, 64, 64), (3, 8, 2, 16, 8), (1, 8, 24, 64, 64), (2, 1, 5, 7, 3), (4, 3, 9, 5, 6)],
)
def test_forward_and_gradients_equal_nn_lstm(use_kernel, K, W, M, I, H):
    if use_kernel and fused.kernel() is None:
        pytest.skip("C++ kernel could not be built here")
    mods, w_ih, w_hh, b_ih, b_hh = lstms_and_stacked(K, I, H, seed=K * 100 + M)
    g = torch.Generator().manual_seed(M)
    x = (torch.randn(K, W, M, I, generator=g) * 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out_grad = torch.randn(K, M, H, generator=g)

    expected = nn_reference(mods, x_ref)
    (expected * out_grad).sum().backward()
    h = fused.lstm_last(x, w_ih, w_hh, b_ih, b_hh, use_kernel=use_kernel)
    (h * out_grad).sum().backward()

    assert h.shape == (K, M, H)
    torch.testing.assert_close(h, expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=2e-5, rtol=1e-4)
    for name, stacked in [("weight_ih_l0", w_ih), ("weight_hh_l0", w_hh), ("bias_ih_l0", b_ih), ("bias_hh_l0", b_hh)]:
        ref_grad = torch.stack([getattr(m, name).grad for m in mods])
        torch.testing.assert_close(stacked.grad, ref_grad, atol=2e-5, rtol=1e-4)


@needs_kernel
def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w_ih = (torch.randn(2, 12, 5, dtype=torch.float64, generator=g) * 0.5).requires_grad_()
    w_hh = (torch.randn(2, 12, 3, dtype=torch.float64, generator=g) * 0.5).requires_grad_()
    b_ih = (torch.randn(2, 12, dtype=torch.float64, generator=g) * 0.5).requires_grad_()
    b_hh = (torch.randn(2, 12, dtype=torch.float64, generator=g) * 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fused.lstm_last(*a), (x, w_ih, w_hh, b_ih, b_hh))


@needs_kernel
def test_kernel_is_deterministic_and_agents_independent():
    _mods, w_ih, w_hh, b_ih, b_hh = lstms_and_stacked(4, 16, 8)
    x = torch.randn(4, 8, 10, 16)
    with torch.no_grad():
        a = fused.lstm_last(x, w_ih, w_hh, b_ih, b_hh)
        b = fused.lstm_last(x, w_ih, w_hh, b_ih, b_hh)
        x2 = x.clone()
        x2[2] += 1.0  # change agent 2's windows only
        c = fused.lstm_last(x2, w_ih, w_hh, b_ih, b_hh)
    assert torch.equal(a, b)
    assert torch.equal(a[[0, 1, 3]], c[[0, 1, 3]]) and not torch.allclose(a[2], c[2])


def test_fallback_when_the_kernel_cannot_be_built(monkeypatch, capsys):
    """A failed build prints one line naming the reason and the fallback; results are unchanged."""
    import torch.utils.cpp_extension as cpp

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(fused, "_kernel", None)
    monkeypatch.setattr(cpp, "load_inline", no_compiler)
    monkeypatch.setattr(cpp, "_get_build_directory", lambda name, verbose: "/nonexistent")
    assert fused.kernel() is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fused: C++ kernels unavailable (") and "command not found" in err[-1]
    assert "plain-torch" in err[-1]
    mods, w_ih, w_hh, b_ih, b_hh = lstms_and_stacked(2, 6, 4)
    x = torch.randn(2, 5, 3, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused.lstm_last(x, w_ih, w_hh, b_ih, b_hh), nn_reference(mods, x), atol=2e-6, rtol=1e-5)
    assert fused.kernel() is None and capsys.readouterr().err == ""  # warned once only


@pytest.mark.parametrize("use_kernel", [True, False])
def test_rmsprop_equals_torch_rmsprop(use_kernel):
    """fused.RMSprop follows torch.optim.RMSprop (alpha 0.99, eps 1e-8, lr 5e-4) step for step,
    on tensors of the agents' shapes, with gradients that vary by orders of magnitude."""
    if use_kernel and fused.kernel() is None:
        pytest.skip("C++ kernel could not be built here")
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 64, 5), (6, 200, 64), (6, 64), (6, 256, 64), (6, 256), (1, 206, 64)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, ref_opt = fused.RMSprop(ours, lr=5e-4, use_kernel=use_kernel), torch.optim.RMSprop(ref, lr=5e-4)
    for step in range(30):
        scale = [3.0, 1e-3, 0.1][step % 3]
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g) * scale
            q.grad = p.grad.clone()
        if step == 7:
            ours[2].grad = ref[2].grad = None  # a parameter without gradient is left alone
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(opt.state[p]["square_avg"], ref_opt.state[q]["square_avg"], atol=1e-7, rtol=1e-5)
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"])
    assert not torch.equal(ours[0], torch.randn(shapes[0], generator=torch.Generator().manual_seed(0)))  # it moved
    state = opt.state_dict()["state"][0]
    assert set(state) == {"step", "square_avg"}  # torch's keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [50.0, 1e3, 1e5])
def test_saturated_gates_stay_finite_and_equal_nn_lstm(dtype, scale):
    """Gate pre-activations far outside exp's float range (raw GHI ~1000 on the building task): the kernel
    is built with -ffast-math, where an overflowing exp gives NaN instead of saturating; it must give
    nn.LSTM's values (the first release returned NaN here from |pre-activation| ~ 90 on)."""
    if fused.kernel() is None:
        pytest.skip("C++ kernel could not be built here")
    K, W, M, I, H = 2, 8, 5, 16, 8
    mods, w_ih, w_hh, b_ih, b_hh = lstms_and_stacked(K, I, H, dtype=dtype, seed=7)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(K, W, M, I, generator=g, dtype=dtype) * scale).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected = nn_reference(mods, x_ref)
    expected.sum().backward()
    h = fused.lstm_last(x, w_ih, w_hh, b_ih, b_hh, use_kernel=True)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(x.grad).all() and torch.isfinite(w_ih.grad).all()
    torch.testing.assert_close(h, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    ref_grad = torch.stack([m.weight_ih_l0.grad for m in mods])
    torch.testing.assert_close(w_ih.grad, ref_grad, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("exponent", list(range(-44, 18, 2)))
def test_rmsprop_is_finite_and_equals_torch_at_every_gradient_scale(exponent):
    """Gradients of 1e-20 make v = g^2 denormal: under -ffast-math, GCC's vector sqrt (v * rsqrt(v)) is NaN
    there unless built with -mno-recip (the first release: NaN weights, the README main job diverged)."""
    if fused.kernel() is None:
        pytest.skip("C++ kernel could not be built here")
    p, q = torch.nn.Parameter(torch.ones(67)), torch.nn.Parameter(torch.ones(67))  # 67: vector body + remainder
    ours, theirs = fused.RMSprop([p], lr=5e-4, eps=1e-5), torch.optim.RMSprop([q], lr=5e-4, eps=1e-5)
    g = torch.Generator().manual_seed(exponent + 100)
    for _ in range(4):
        grad = torch.randn(67, generator=g) * 10.0**exponent
        p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, q, atol=1e-7, rtol=1e-6)
