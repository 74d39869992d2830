"""Two C++ kernels for the hot spots of every algos/ script on a CPU, each with a plain-torch twin, and the
per-agent layers built on them.

1. The agents' LSTMs. Every script runs, for each agent k = 1..K, one LSTM(H, H) over its window
   x[k] of shape (W, M, H) from a zero state and keeps the last output h_W:

       lstm_last(x, w_ih, w_hh, b_ih, b_hh) -> h_W   x (K, W, M, I), w_ih (K, 4H, I), w_hh (K, 4H, H),
                                                     b_ih, b_hh (K, 4H), h_W (K, M, H)

   ``reference_lstm_last`` writes PyTorch's LSTM equations out with torch.bmm; the kernel (own
   backward) runs all K agents in one call, fuses the gate nonlinearities into one vectorised loop
   and calls BLAS (MKL, as exported by torch's own library) directly on each agent's contiguous
   blocks. Six agents, batch 64, window 8, one core: ~8 ms forward + backward against ~11 ms for six
   nn.LSTM calls (benchmarks/throughput.py measures the whole step).

2. ``RMSprop``: torch.optim.RMSprop as the paper uses it (no momentum, not centred, no weight
   decay), the update done in one pass per tensor instead of torch's five (~0.15 ms against ~0.7
   ms a step here, the parameters being larger than the core's L2 cache). Same state dict keys.

These are plumbing, like nn.LSTM and torch.optim: the algorithms (DRQN, mixers, robust targets)
stay in the scripts. tests/test_fused.py checks both against torch (nn.LSTM to 1e-5 in value and
gradient, a float64 gradcheck, torch.optim.RMSprop over many steps). The kernels are built on
first use by torch.utils.cpp_extension (~30 s, cached under ~/.cache/torch_extensions); without a
C++ compiler one line says so and the plain-torch twins run instead: the same equations, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

extern "C" {  // BLAS from libtorch_cpu (MKL), Fortran interface, column-major
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
}
// Row-major C (M x N) = op(A) (M x K) op(B) (K x N) + beta C, i.e. column-major C^T = op(B)^T op(A)^T.
static void mm(bool ta, bool tb, int M, int N, int K, const float* A, int lda, const float* B, int ldb,
               float beta, float* C, int ldc) {
  const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N'; const float one = 1.f;
  sgemm_(&a, &b, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}
static void mm(bool ta, bool tb, int M, int N, int K, const double* A, int lda, const double* B, int ldb,
               double beta, double* C, int ldc) {
  const char a = tb ? 'T' : 'N', b = ta ? 'T' : 'N'; const double one = 1.0;
  dgemm_(&a, &b, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}
// A few rows times a transposed matrix (acting: one window per agent): plain dot products, which
// beat a BLAS call's fixed cost at this size. C (M x N) = A (M x K) B^T + beta C, beta 0 or 1.
template <typename T>
static void small_mm_nt(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  for (int r = 0; r < M; ++r)
    for (int n = 0; n < N; ++n) {
      T s = T(0);
#pragma omp simd reduction(+ : s)
      for (int k = 0; k < K; ++k) s += A[(int64_t)r * lda + k] * B[(int64_t)n * ldb + k];
      C[(int64_t)r * ldc + n] = beta == T(0) ? s : C[(int64_t)r * ldc + n] + s;
    }
}
template <typename T>
static void mm_nt(int M, int N, int K, const T* A, int lda, const T* B, int ldb, T beta, T* C, int ldc) {
  if (M <= 2) small_mm_nt(M, N, K, A, lda, B, ldb, beta, C, ldc);
  else mm(false, true, M, N, K, A, lda, B, ldb, beta, C, ldc);
}
// -ffast-math assumes no inf/NaN: an exp that overflows (|v| > ~88 in float, e.g. a raw GHI ~1000 times a weight)
// gives NaN, not 0 or 1. So arguments are clamped where the result is already saturated in float and double:
// sigm(+-80) and tanh(+-20) equal the limits to the last bit that matters (1 - tanh(20) < 1e-17).
template <typename T> static inline T clampv(T v, T m) { return v < -m ? -m : (v > m ? m : v); }
template <typename T> static inline T sigm(T v) { return T(1) / (T(1) + std::exp(-clampv(v, T(80)))); }
template <typename T> static inline T tanh_(T v) { return std::tanh(clampv(v, T(20))); }

// One agent. x (W, M, I); gates in PyTorch's order i, f, g, o. acts holds the gate activations,
// cs / tcs the cell state and tanh(cell), hs the outputs, all (W, M, .), for the backward pass.
template <typename T>
static void fwd(int W, int M, int I, int H, const T* x, const T* wih, const T* whh, const T* b,
                T* acts, T* cs, T* tcs, T* hs, const T* zero) {
  const int G = 4 * H;
  mm_nt(W * M, G, I, x, I, wih, I, T(0), acts, G);  // x_t W_ih^T for all t at once
  for (int t = 0; t < W; ++t) {
    T* g = acts + (int64_t)t * M * G;
    if (t > 0) mm_nt(M, G, H, hs + (int64_t)(t - 1) * M * H, H, whh, H, T(1), g, G);  // + h_{t-1} W_hh^T
    for (int r = 0; r < M; ++r) {
      T* gr = g + (int64_t)r * G;
      const int64_t o = ((int64_t)t * M + r) * H;
      const T* cp = t > 0 ? cs + o - (int64_t)M * H : zero;  // zero initial state c_{-1} = 0
      T *c = cs + o, *tc = tcs + o, *h = hs + o;
#pragma omp simd
      for (int j = 0; j < H; ++j) {
        T gi = sigm(gr[j] + b[j]), gf = sigm(gr[H + j] + b[H + j]);
        T gg = tanh_(gr[2 * H + j] + b[2 * H + j]), go = sigm(gr[3 * H + j] + b[3 * H + j]);
        T cv = gf * cp[j] + gi * gg, tv = tanh_(cv);
        gr[j] = gi; gr[H + j] = gf; gr[2 * H + j] = gg; gr[3 * H + j] = go;
        c[j] = cv; tc[j] = tv; h[j] = go * tv;
      }
    }
  }
}

// One agent, backpropagation through time from dL/dh_W (M, H); dh, dc are (M, H) scratch.
template <typename T>
static void bwd(int W, int M, int I, int H, const T* dh_last, const T* x, const T* wih, const T* whh,
                const T* acts, const T* cs, const T* tcs, const T* hs, T* dg, T* dx, T* dwih, T* dwhh,
                T* db, T* dh, T* dc, const T* zero) {
  const int G = 4 * H;
  for (int k = 0; k < M * H; ++k) { dh[k] = dh_last[k]; dc[k] = T(0); }
  for (int j = 0; j < G; ++j) db[j] = T(0);
  for (int t = W - 1; t >= 0; --t) {
    for (int r = 0; r < M; ++r) {
      const T* gr = acts + ((int64_t)t * M + r) * G;
      T* dgr = dg + ((int64_t)t * M + r) * G;
      const int64_t o = ((int64_t)t * M + r) * H;
      const T* cp = t > 0 ? cs + o - (int64_t)M * H : zero;
      const T* tc = tcs + o;
      T *dhr = dh + (int64_t)r * H, *dcr = dc + (int64_t)r * H;
#pragma omp simd
      for (int j = 0; j < H; ++j) {
        T gi = gr[j], gf = gr[H + j], gg = gr[2 * H + j], go = gr[3 * H + j], tv = tc[j];
        T dhv = dhr[j], dcv = dcr[j] + dhv * go * (T(1) - tv * tv);
        dgr[j] = dcv * gg * gi * (T(1) - gi);
        dgr[H + j] = dcv * cp[j] * gf * (T(1) - gf);
        dgr[2 * H + j] = dcv * gi * (T(1) - gg * gg);
        dgr[3 * H + j] = dhv * tv * go * (T(1) - go);
        dcr[j] = dcv * gf;
        db[j] += dgr[j]; db[H + j] += dgr[H + j]; db[2 * H + j] += dgr[2 * H + j]; db[3 * H + j] += dgr[3 * H + j];
      }
    }
    if (t > 0) mm(false, false, M, H, G, dg + (int64_t)t * M * G, G, whh, H, T(0), dh, H);  // dh_{t-1}
  }
  mm(true, false, G, I, W * M, dg, G, x, I, T(0), dwih, I);
  mm(true, false, G, H, (W - 1) * M, dg + (int64_t)M * G, G, hs, H, T(0), dwhh, H);
  mm(false, false, W * M, I, G, dg, G, wih, I, T(0), dx, I);
}

template <typename T> static T* p(at::Tensor& t, int64_t k) { return t.data_ptr<T>() + k * (t.numel() / t.size(0)); }

std::vector<at::Tensor> forward(at::Tensor x, at::Tensor w_ih, at::Tensor w_hh, at::Tensor b_ih, at::Tensor b_hh) {
  x = x.contiguous(); w_ih = w_ih.contiguous(); w_hh = w_hh.contiguous();
  auto b = (b_ih + b_hh).contiguous();
  const int K = x.size(0), W = x.size(1), M = x.size(2), I = x.size(3), H = w_hh.size(2);
  auto o = x.options();
  auto acts = at::empty({K, W, M, 4 * H}, o), cs = at::empty({K, W, M, H}, o);
  auto tcs = at::empty({K, W, M, H}, o), hs = at::empty({K, W, M, H}, o), zero = at::zeros({H}, o);
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      if (x.scalar_type() == at::kDouble)
        fwd<double>(W, M, I, H, p<double>(x, k), p<double>(w_ih, k), p<double>(w_hh, k), p<double>(b, k),
                    p<double>(acts, k), p<double>(cs, k), p<double>(tcs, k), p<double>(hs, k), zero.data_ptr<double>());
      else
        fwd<float>(W, M, I, H, p<float>(x, k), p<float>(w_ih, k), p<float>(w_hh, k), p<float>(b, k),
                   p<float>(acts, k), p<float>(cs, k), p<float>(tcs, k), p<float>(hs, k), zero.data_ptr<float>());
    }
  });
  return {hs.select(1, W - 1), acts, cs, tcs, hs};
}

std::vector<at::Tensor> backward(at::Tensor dh_last, at::Tensor x, at::Tensor w_ih, at::Tensor w_hh,
                                 at::Tensor acts, at::Tensor cs, at::Tensor tcs, at::Tensor hs) {
  dh_last = dh_last.contiguous(); x = x.contiguous(); w_ih = w_ih.contiguous(); w_hh = w_hh.contiguous();
  const int K = x.size(0), W = x.size(1), M = x.size(2), I = x.size(3), H = w_hh.size(2);
  auto dg = at::empty_like(acts), dx = at::empty_like(x), dwih = at::empty_like(w_ih);
  auto dwhh = at::empty_like(w_hh), db = at::empty({K, 4 * H}, x.options());
  auto dh = at::empty({K, M, H}, x.options()), dc = at::empty({K, M, H}, x.options());
  auto zero = at::zeros({H}, x.options());
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
#define ARGS(T) W, M, I, H, p<T>(dh_last, k), p<T>(x, k), p<T>(w_ih, k), p<T>(w_hh, k), p<T>(acts, k), \
    p<T>(cs, k), p<T>(tcs, k), p<T>(hs, k), p<T>(dg, k), p<T>(dx, k), p<T>(dwih, k), p<T>(dwhh, k), \
    p<T>(db, k), p<T>(dh, k), p<T>(dc, k), zero.data_ptr<T>()
      if (x.scalar_type() == at::kDouble) bwd<double>(ARGS(double)); else bwd<float>(ARGS(float));
#undef ARGS
    }
  });
  return {dx, dwih, dwhh, db, db};
}

// torch.optim.RMSprop's update (no momentum, not centred, no weight decay) in one pass per tensor:
// v = alpha v + (1 - alpha) g^2; p -= lr g / (sqrt(v) + eps).
template <typename T>
static void rmsprop(int64_t n, T* p, const T* g, T* v, T lr, T alpha, T eps) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T vj = alpha * v[j] + (T(1) - alpha) * g[j] * g[j];
    v[j] = vj;
    p[j] -= lr * g[j] / (std::sqrt(vj) + eps);
  }
}

void rmsprop_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> square_avgs,
                  double lr, double alpha, double eps) {
  for (size_t i = 0; i < params.size(); ++i) {
    auto g = grads[i].contiguous();
    TORCH_CHECK(params[i].is_contiguous() && square_avgs[i].is_contiguous(), "rmsprop_step: contiguous tensors only");
    if (params[i].scalar_type() == at::kDouble)
      rmsprop<double>(params[i].numel(), params[i].data_ptr<double>(), g.data_ptr<double>(),
                      square_avgs[i].data_ptr<double>(), lr, alpha, eps);
    else
      rmsprop<float>(params[i].numel(), params[i].data_ptr<float>(), g.data_ptr<float>(),
                     square_avgs[i].data_ptr<float>(), (float)lr, (float)alpha, (float)eps);
  }
}
"""


def keep_freed_memory() -> bool:
    """glibc hands every freed block above 128 KB back to the OS, so each gradient step's ~10 MB
    of temporaries page-faults back in (~1,000 faults, ~1 ms a step on this CPU). Raise glibc's
    mmap and trim thresholds so freed blocks are reused (process-wide; no effect off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 256 << 20))
    except (OSError, AttributeError):
        return False


keep_freed_memory()
_kernel = None  # the built extension, False once building failed
# -ffast-math: vectorised exp/tanh loops. -mno-recip: but exact sqrt and division: under -ffast-math GCC
# otherwise computes a vector sqrt as v * rsqrt(v), which is NaN for a denormal v (g ~ 1e-19 in RMSprop).
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-mno-recip", "-fopenmp-simd"]


def _cpu_tag() -> str:
    """Builds use -march=native: key the cached build to this CPU's flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha1((_SOURCE + " ".join(_FLAGS) + flags + torch.__version__).encode()).hexdigest()[:10]


def kernel():
    """The C++ extension, built on first use; None where it cannot be built (warned once)."""
    global _kernel
    if _kernel is None:
        try:
            from torch.utils.cpp_extension import load_inline

            name = f"drigm_fused_{_cpu_tag()}"
            from torch.utils.cpp_extension import _get_build_directory

            if not os.path.exists(os.path.join(_get_build_directory(name, False), f"{name}.so")):
                print("fused: building the C++ kernels (first run only, ~30 s)", file=sys.stderr, flush=True)
            _kernel = load_inline(
                name,
                cpp_sources=[_SOURCE],
                functions=["forward", "backward", "rmsprop_step"],
                extra_cflags=_FLAGS,
                verbose=False,
            )
        except Exception as err:  # noqa: BLE001 - no compiler, no ninja, ...: same numbers from the reference
            reason = str(err).strip().splitlines()[-1][:160] if str(err).strip() else type(err).__name__
            print(
                f"fused: C++ kernels unavailable ({reason}); using the plain-torch LSTM and RMSprop (same equations, slower)",
                file=sys.stderr,
                flush=True,
            )
            _kernel = False
    return _kernel or None


class _LSTMLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh):
        h_last, *saved = kernel().forward(x, w_ih, w_hh, b_ih, b_hh)
        ctx.save_for_backward(x, w_ih, w_hh, *saved)
        return h_last

    @staticmethod
    def backward(ctx, dh_last):
        x, w_ih, w_hh, acts, cs, tcs, hs = ctx.saved_tensors
        return tuple(kernel().backward(dh_last, x, w_ih, w_hh, acts, cs, tcs, hs))


def reference_lstm_last(x, w_ih, w_hh, b_ih, b_hh):
    """nn.LSTM's equations for K agents at once (gate order i, f, g, o), from a zero state."""
    K, W, M, _ = x.shape
    gates_x = torch.baddbmm((b_ih + b_hh).unsqueeze(1), x.reshape(K, W * M, -1), w_ih.transpose(1, 2)).view(K, W, M, -1)
    h = c = x.new_zeros(K, M, w_hh.shape[2])
    for t in range(W):
        i, f, g, o = torch.baddbmm(gates_x[:, t], h, w_hh.transpose(1, 2)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    return h


def lstm_last(x, w_ih, w_hh, b_ih, b_hh, use_kernel: bool = True):
    """Last output h_W (K, M, H) of K LSTMs over windows x (K, W, M, I) from a zero state."""
    if use_kernel and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and kernel():
        return _LSTMLast.apply(x, w_ih, w_hh, b_ih, b_hh)
    return reference_lstm_last(x, w_ih, w_hh, b_ih, b_hh)


# ---------------------------------------------------------------------------------------------
# 3. Per-agent layers: K networks' layers with stacked weights (K, ...), run as batched products.
# Like nn.Linear / nn.LSTM for the DRQN of every algos/ script (agent_{k}_q_network.pt keeps nn's names).
# ---------------------------------------------------------------------------------------------
def agent_parameter(n_nets, *shape, fan_in):
    """One weight per network, stacked: torch.nn's Linear / LSTM init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return torch.nn.Parameter(torch.empty(n_nets, *shape).uniform_(-(fan_in**-0.5), fan_in**-0.5))


class AgentsInput(torch.nn.Module):
    """K x Linear(obs + onehot(prev action) [+ onehot(agent id)], H). The weight is kept as its obs columns
    (K, H, obs) and its one-hot columns as the rows of a lookup table (K, n_actions [+ n_ids], H): a one-hot
    vector times a matrix is one row of it."""

    def __init__(self, n_nets, obs_dim, n_actions, n_ids, hidden_dim):
        super().__init__()
        self.n_actions, fan_in = n_actions, obs_dim + n_actions + n_ids
        self.weight_obs = agent_parameter(n_nets, hidden_dim, obs_dim, fan_in=fan_in)
        self.weight_onehot = agent_parameter(n_nets, n_actions + n_ids, hidden_dim, fan_in=fan_in)
        self.bias = agent_parameter(n_nets, hidden_dim, fan_in=fan_in)
        self.register_buffer("rows", (n_actions + n_ids) * torch.arange(n_nets).unsqueeze(1), persistent=False)

    def forward(self, obs, prev_a, agent_ids=None):
        """obs (K, W, M, obs_dim), prev_a (K, W, M) long [, agent_ids (M,)] -> (K, W, M, H)."""
        K, W, M, O = obs.shape
        table = self.weight_onehot.reshape(-1, self.weight_onehot.shape[-1])  # network k's row r: rows[k] + r
        x = torch.baddbmm(self.bias.unsqueeze(1), obs.reshape(K, W * M, O), self.weight_obs.transpose(1, 2))
        x = x + table.index_select(0, (prev_a.reshape(K, W * M) + self.rows).reshape(-1)).view(K, W * M, -1)
        if agent_ids is not None:
            x = x + table.index_select(0, self.n_actions + agent_ids.repeat(W)).view(K, W * M, -1)
        return x.view(K, W, M, -1)


class AgentsLSTM(torch.nn.Module):
    """K x LSTM(H, H) (nn.LSTM's parameter names), each over its window from a zero state -> the last output h_W
    (lstm_last: all K in one kernel call)."""

    def __init__(self, n_nets, hidden_dim, use_kernel=True):
        super().__init__()
        self.use_kernel, H = use_kernel, hidden_dim
        self.weight_ih_l0, self.weight_hh_l0 = (agent_parameter(n_nets, 4 * H, H, fan_in=H) for _ in "ih")
        self.bias_ih_l0, self.bias_hh_l0 = (agent_parameter(n_nets, 4 * H, fan_in=H) for _ in "ih")

    def forward(self, x):
        """x (K, W, M, H) -> h_W (K, M, H)."""
        return lstm_last(x, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0, self.use_kernel)


class AgentsLinear(torch.nn.Module):
    """K x Linear(in, out), one batched matrix product: x (K, M, in) -> (K, M, out)."""

    def __init__(self, n_nets, in_dim, out_dim):
        super().__init__()
        self.weight = agent_parameter(n_nets, out_dim, in_dim, fan_in=in_dim)
        self.bias = agent_parameter(n_nets, out_dim, fan_in=in_dim)

    def forward(self, x):
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class RMSprop(torch.optim.Optimizer):
    """torch.optim.RMSprop(params, lr, alpha, eps) without momentum, centring or weight decay:
    v <- alpha v + (1 - alpha) g^2, p <- p - lr g / (sqrt(v) + eps), one C++ pass per tensor.
    State keys as torch's ("step", "square_avg"); use_kernel=False runs torch's own update ops."""

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, use_kernel: bool = True):
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps})
        self.use_kernel = use_kernel

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p] = {"step": torch.tensor(0.0), "square_avg": torch.zeros_like(p)}
                self.state[p]["step"] += 1
            grads, avgs = [p.grad for p in params], [self.state[p]["square_avg"] for p in params]
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            if self.use_kernel and kernel() and all(p.device.type == "cpu" and p.is_contiguous() for p in params):
                kernel().rmsprop_step(params, grads, avgs, lr, alpha, eps)
                continue
            for p, g, v in zip(params, grads, avgs):  # torch.optim.RMSprop's single-tensor update
                v.mul_(alpha).addcmul_(g, g, value=1 - alpha)
                p.addcdiv_(g, v.sqrt().add_(eps), value=-lr)
        return loss
