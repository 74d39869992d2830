"""Time the fused kernels under the current build flags and under the flags before -mno-recip.

    python benchmarks/fused_flags.py new     # fused._FLAGS as shipped
    python benchmarks/fused_flags.py old     # without -mno-recip (vector sqrt / division by rsqrt / rcp + Newton)

One thread; the shapes of a paper-settings update: K=6 agents, window 8, 64 windows, LSTM(64).
Prints the best of 5 repeats of the mean time per call (LSTM forward + backward; one RMSprop step).
"""

import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
torch.set_num_threads(1)
import fused

mode = sys.argv[1] if len(sys.argv) > 1 else "new"
if mode not in ("new", "old"):
    sys.exit(f"error: the argument must be new or old (got '{mode}')")
if mode == "old":
    fused._FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"]
assert fused.kernel() is not None
K, W, M, I, H = 6, 8, 64, 64, 64
g = torch.Generator().manual_seed(0)
x = torch.randn(K, W, M, I, generator=g).requires_grad_()
w_ih = (torch.randn(K, 4 * H, I, generator=g) * 0.1).requires_grad_()
w_hh = (torch.randn(K, 4 * H, H, generator=g) * 0.1).requires_grad_()
b_ih = torch.zeros(K, 4 * H, requires_grad=True)
b_hh = torch.zeros(K, 4 * H, requires_grad=True)
params = [torch.nn.Parameter(torch.randn(6, 256, 64)) for _ in range(9)]
opt = fused.RMSprop(params, lr=5e-4, eps=1e-5)
for p in params:
    p.grad = torch.randn_like(p)


def best(f, n=200):
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            f()
        ts.append((time.perf_counter() - t) / n * 1e3)
    return min(ts)


def lstm():
    h = fused.lstm_last(x, w_ih, w_hh, b_ih, b_hh)
    h.sum().backward()


print(mode, f"lstm fwd+bwd ms {best(lstm, 50):.3f}", f"rmsprop step ms {best(opt.step, 200):.3f}")
