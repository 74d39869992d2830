"""The agents' LSTM over a history window, for N agents at once: a drop-in for N nn.LSTM calls.

Every algos/ script runs, for each agent k = 1..K, one LSTM(H, H) over the window x[k] of
shape (W, M, H) from a zero state and keeps the last output h_W. That is plumbing, like nn.LSTM
itself; the algorithm (DRQN, mixers, robust targets) stays in the scripts.

    lstm_last(x, w_ih, w_hh, b_ih, b_hh) -> h_W    x (K, W, M, I), w_ih (K, 4H, I), w_hh (K, 4H, H),
                                                  b_ih, b_hh (K, 4H), h_W (K, M, H)

Two implementations of the same numbers (tests/test_lstm_kernel.py: against nn.LSTM to 1e-5 in
float32, gradcheck in float64):

* ``reference_lstm_last``: the PyTorch LSTM equations written out with torch.bmm (readable).
* a C++ kernel with its own backward, built on first use by torch.utils.cpp_extension (~30 s,
  cached under ~/.cache/torch_extensions). Why: on one CPU core the six agents' nn.LSTM calls
  cost ~11 ms forward + backward per gradient step, most of a step; the kernel runs all K agents
  in one call, fuses the gate nonlinearities into one vectorised loop and calls BLAS (MKL, as
  exported by torch's own library) directly on the window's contiguous blocks: ~8 ms. Agents
  are split across torch's threads.

If the kernel cannot be built (no C++ compiler) a one-line warning is printed and the reference
is used: the same numbers, slower.
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
template <typename T> static inline T sigm(T v) { return T(1) / (T(1) + std::exp(-v)); }

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
        T gg = std::tanh(gr[2 * H + j] + b[2 * H + j]), go = sigm(gr[3 * H + j] + b[3 * H + j]);
        T cv = gf * cp[j] + gi * gg, tv = std::tanh(cv);
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
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"]  # vectorised exp/tanh loops


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

            name = f"drigm_lstm_{_cpu_tag()}"
            from torch.utils.cpp_extension import _get_build_directory

            if not os.path.exists(os.path.join(_get_build_directory(name, False), f"{name}.so")):
                print("lstm_kernel: building the C++ LSTM kernel (first run only, ~30 s)", file=sys.stderr, flush=True)
            _kernel = load_inline(name, cpp_sources=[_SOURCE], functions=["forward", "backward"],
                                  extra_cflags=_FLAGS, verbose=False)
        except Exception as err:  # no compiler, no ninja, ...: same numbers from the reference
            reason = str(err).strip().splitlines()[-1][:160] if str(err).strip() else type(err).__name__
            print(f"lstm_kernel: C++ kernel unavailable ({reason}); using the pure-torch LSTM "
                  "(same numbers, slower)", file=sys.stderr, flush=True)
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
