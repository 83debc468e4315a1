// The CUDA backend's fused linear ops (log-prob, entropy, exact KL of softmax(hidden @ weight.T + bias)): the whole
// vocabulary loop runs here, so a step costs one Python call instead of several launches per chunk from Python.
//
// Per chunk of w <= `chunk` columns, on one stream: cuBLAS forms the logits tile [n, w] = hidden @ W[v0:v0+w].T
// (+ bias) in the compute dtype (bf16 / fp16 operands on tensor cores, float32 accumulation), the vocab_softmax.cu
// kernels fold it into the online log-sum-exp (forward) or turn it in place into d(value)/dlogits (backward), and
// the backward's two more GEMMs carry that tile to grad_hidden (accumulated over chunks) and to its rows of
// grad_weight. The tile (n * chunk elements, allocated by the caller so torch's allocator sees it) is reused by
// every chunk: at n * chunk * 4 bytes of a few tens of MB it stays close to the L2 cache between the GEMM that
// writes it and the kernel that reads it.
//
// Row-major [rows, cols] buffers are cuBLAS column-major [cols, rows] matrices; each GEMM below is written in
// that view. Plain C++: the kernels are launched through their host entry points, from a table, so that the same
// loop also runs on host buffers with the CPU tile kernels (host_vocab_softmax_loop_*; tests/test_vocab_softmax_loop.py
// runs it against a cuBLAS stand-in that multiplies host memory, on machines with no GPU).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../ra3_native.h"
#include "cublas_loader.h"
#include "cuda_utils.cuh"
#include "tile_ops.h"

namespace ra3::cuda {
namespace {

using blas::kNoTrans;
using blas::kTrans;

struct Operand {
  cudaDataType type;
  int64_t bytes;
};

Operand operand(int in_dtype) {
  switch (in_dtype) {
    case kFloat32: return {CUDA_R_32F, 4};
    case kFloat64: return {CUDA_R_64F, 8};
    case kBFloat16: return {CUDA_R_16BF, 2};
    case kFloat16: return {CUDA_R_16F, 2};
    default:
      throw std::invalid_argument("in_dtype must be 0 (float32), 1 (float64), 2 (bfloat16) or 3 (float16), got " +
                                  std::to_string(in_dtype));
  }
}

// One model's side of the product: hidden [n, h], weight [vocab, h], bias [vocab] (compute dtype) or 0.
struct Source {
  std::string name;
  Operand op;
  uintptr_t hidden, weight, bias;
  int64_t h;
};

// Where the loop's tile work runs: the CUDA kernels on a stream, or (tests) the CPU kernels on host buffers.
struct Tiles {
  void (*stats)(const VocabSoftmaxFwdArgs& a, uintptr_t stream);
  void (*grad)(const VocabSoftmaxGradArgs& a, uintptr_t stream);
  void (*round_bf16)(uintptr_t src, uintptr_t hi, uintptr_t lo, int64_t count, cudaStream_t stream);
  void (*log)(int dtype, uintptr_t s, uintptr_t logs, int64_t n, cudaStream_t stream);
};

const Tiles kCudaTiles{&vocab_softmax_fwd, &vocab_softmax_grad, &round_to_bf16, &log_of};

// bfloat16 bits of x rounded to nearest even on the dropped 16 bits; a NaN stays a (quiet) NaN.
uint16_t host_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

void host_round_bf16(uintptr_t src, uintptr_t hi, uintptr_t lo, int64_t count, cudaStream_t) {
  const float* in = cptr<float>(src);
  for (int64_t i = 0; i < count; ++i) {
    const uint16_t b = host_bf16(in[i]);
    mptr<uint16_t>(hi)[i] = b;
    if (lo != 0) {
      const uint32_t u = uint32_t(b) << 16;
      float back;
      std::memcpy(&back, &u, 4);
      mptr<uint16_t>(lo)[i] = host_bf16(in[i] - back);
    }
  }
}

const Tiles kHostTiles{
    [](const VocabSoftmaxFwdArgs& a, uintptr_t) { cpu::vocab_softmax_fwd(a); },
    [](const VocabSoftmaxGradArgs& a, uintptr_t) { cpu::vocab_softmax_grad(a); },
    &host_round_bf16,
    [](int dtype, uintptr_t s, uintptr_t logs, int64_t n, cudaStream_t) {
      dispatch_dtype(dtype, [&](auto tag) {
        using T = decltype(tag);
        for (int64_t i = 0; i < n; ++i) mptr<T>(logs)[i] = std::log(cptr<T>(s)[i]);
      });
    }};

// The compute dtype's GEMM settings (float32 accumulates float32, no TF32; float64 float64) and where they run.
struct Compute {
  cudaDataType type;
  int64_t bytes;
  blas::ComputeType gemm;
  cudaStream_t stream;
  int device;
  const Tiles* tiles;
};

// The checked Source of `a`, called `name` in error messages; `dtype` is the compute dtype.
Source source(const char* name, const LinearSourceArgs& a, int dtype) {
  Source s{name, operand(a.in_dtype), a.hidden, a.weight, a.bias, a.h};
  if (a.hidden == 0 || a.weight == 0) throw std::invalid_argument(s.name + " and its weight are required");
  if (a.h <= 0) throw std::invalid_argument(s.name + ": the hidden size must be > 0, got " + std::to_string(a.h));
  // cuBLAS multiplies two operands of one type into a float32 or float64 result, not float64 from narrower ones.
  if ((dtype == kFloat64) != (a.in_dtype == kFloat64))
    throw std::invalid_argument(s.name + ": in_dtype " + std::to_string(a.in_dtype) +
                                " does not go with compute dtype " + std::to_string(dtype) +
                                " (float64 operands exactly when computing in float64)");
  return s;
}

uintptr_t offset(uintptr_t base, int64_t elements, int64_t bytes) {
  return base + static_cast<uintptr_t>(elements * bytes);
}

// tile [n, w] = hidden @ W[v0:v0+w].T (+ bias[v0:v0+w]), row-major with ld w.
void logits_tile(const Compute& c, const Source& s, int64_t n, int64_t v0, int64_t w, uintptr_t ones,
                 uintptr_t tile) {
  // column-major: tile^T [w, n] = (W chunk stored [h, w])^T @ (hidden stored [h, n])
  blas::gemm(c.device, c.stream, kTrans, kNoTrans, w, n, s.h, 1.0, offset(s.weight, v0 * s.h, s.op.bytes), s.op.type,
             s.h, s.hidden, s.op.type, s.h, 0.0, tile, c.type, w, c.gemm, "logits tile");
  if (s.bias != 0)  // a rank-1 update: tile^T [w, n] += bias [w, 1] @ ones [1, n]
    blas::gemm(c.device, c.stream, kNoTrans, kNoTrans, w, n, 1, 1.0, offset(s.bias, v0, c.bytes), c.type, w, ones,
               c.type, 1, 1.0, tile, c.type, w, c.gemm, "bias");
}

// The GEMM operands for a float32/float64 gradient tile d [r, w] (row-major, ld w): d itself or, for bfloat16
// sources, its bf16 term(s) in tile16 (both operands of a GEMM share a type: bf16 x bf16 -> float32 runs on
// tensor cores).
struct Terms {
  uintptr_t p[2];
  int count;
  cudaDataType type;
};

Terms gradient_terms(const Compute& c, const Source& src, uintptr_t tile, uintptr_t tile16, int bf16_terms,
                     int64_t elements) {
  if (src.op.type != CUDA_R_16BF) return {{tile, 0}, 1, c.type};
  // lo starts on a 16-byte boundary (the rounding kernel's vector path, cuBLAS's aligned kernels)
  const uintptr_t lo = bf16_terms == 2 ? offset(tile16, (elements + 7) / 8 * 8, 2) : 0;
  c.tiles->round_bf16(tile, tile16, lo, elements, c.stream);
  return {{tile16, lo}, bf16_terms, CUDA_R_16BF};
}

// grad_hidden rows^T [h, r] (+)= (W[v0:v0+w] stored [h, w]) @ (d stored [w, r]); `accumulate` false overwrites.
void grad_hidden_gemm(const Compute& c, const Source& src, const Terms& d, int64_t r, int64_t v0, int64_t w,
                      uintptr_t grad_rows, bool accumulate) {
  for (int t = 0; t < d.count; ++t)
    blas::gemm(c.device, c.stream, kNoTrans, kNoTrans, src.h, r, w, 1.0, offset(src.weight, v0 * src.h, src.op.bytes),
               src.op.type, src.h, d.p[t], d.type, w, (accumulate || t > 0) ? 1.0 : 0.0, grad_rows, c.type, src.h,
               c.gemm, "grad_hidden");
}

// grad_weight[v0:v0+w]^T [h, w] (+)= (hidden rows stored [h, r]) @ (d stored [w, r])^T.
void grad_weight_gemm(const Compute& c, const Source& src, uintptr_t hidden_rows, const Terms& d, int64_t r,
                      int64_t v0, int64_t w, uintptr_t grad_weight, bool accumulate) {
  for (int t = 0; t < d.count; ++t)
    blas::gemm(c.device, c.stream, kNoTrans, kTrans, src.h, w, r, 1.0, hidden_rows, src.op.type, src.h, d.p[t],
               d.type, w, (accumulate || t > 0) ? 1.0 : 0.0, offset(grad_weight, v0 * src.h, c.bytes), c.type, src.h,
               c.gemm, "grad_weight");
}

// grad_bias[v0:v0+w] [w, 1] (+)= d^T @ ones, from the unrounded tile.
void grad_bias_gemm(const Compute& c, uintptr_t tile, uintptr_t ones, int64_t r, int64_t v0, int64_t w,
                    uintptr_t grad_bias, bool accumulate) {
  blas::gemm(c.device, c.stream, kNoTrans, kNoTrans, w, 1, r, 1.0, tile, c.type, w, ones, c.type, r,
             accumulate ? 1.0 : 0.0, offset(grad_bias, v0, c.bytes), c.type, w, c.gemm, "grad_bias");
}

void check_terms(const Source& src, int bf16_terms, uintptr_t tile16) {
  if (src.op.type != CUDA_R_16BF) return;
  if (bf16_terms != 1 && bf16_terms != 2)
    throw std::invalid_argument("bf16_terms must be 1 or 2, got " + std::to_string(bf16_terms));
  if (tile16 == 0) throw std::invalid_argument("tile16 is required (bfloat16 operands)");
}

void check_not_f16(int in_dtype) {
  // A float16 gradient tile would underflow (upstream gradients of 1/n times probabilities of 1/vocab): the
  // caller runs float16 gradients on float32 operands instead.
  if (in_dtype == kFloat16)
    throw std::invalid_argument("hidden: float16 operands are not taken where gradients are formed (in_dtype 3)");
}

void check_common(int mode, int dtype, int64_t n, int64_t chunk) {
  check_softmax_mode(mode);
  check_dtype(dtype);
  if (n > int64_t(0x7fffffff)) throw std::invalid_argument("n must be < 2^31 rows per call, got " + std::to_string(n));
  if (chunk <= 0) throw std::invalid_argument("chunk must be > 0, got " + std::to_string(chunk));
}

Compute compute(int dtype, uintptr_t stream, int device, const Tiles& tiles) {
  if (dtype == kFloat64) return {CUDA_R_64F, 8, blas::kCompute64F, as_stream(stream), device, &tiles};
  return {CUDA_R_32F, 4, blas::kCompute32F, as_stream(stream), device, &tiles};
}

int current_device() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

void require(uintptr_t p, const char* name) {
  if (p == 0) throw std::invalid_argument(std::string(name) + " is required");
}

void run_fwd(const VocabSoftmaxLoopFwdArgs& a, const Compute& c) {
  const bool kl = a.mode == kExactKl;
  const Source src = source("hidden", a.source, a.dtype);
  const Source ref = kl ? source("ref_hidden", a.ref_source, a.dtype) : Source{};
  require(a.tile, "tile");
  if (kl) require(a.ref_tile, "ref_tile");
  if (a.source.bias != 0 || (kl && a.ref_source.bias != 0)) require(a.ones, "ones (with a bias)");
  const uintptr_t stream = reinterpret_cast<uintptr_t>(c.stream);
  for (int64_t v0 = 0; v0 < a.vocab; v0 += a.chunk) {
    const int64_t w = std::min(a.chunk, a.vocab - v0);
    logits_tile(c, src, a.n, v0, w, a.ones, a.tile);
    if (kl) logits_tile(c, ref, a.n, v0, w, a.ones, a.ref_tile);
    c.tiles->stats(VocabSoftmaxFwdArgs{.mode = a.mode, .dtype = a.dtype, .z = a.tile, .ldz = w,
                                       .r = kl ? a.ref_tile : 0, .ldr = w, .n = a.n, .vc = w, .v_offset = v0,
                                       .inv_temp = a.inv_temp, .targets = a.targets, .m = a.m, .s = a.s, .a = a.a,
                                       .mr = a.mr, .sr = a.sr, .tgt = a.tgt},
                   stream);
  }
}

void run_grad(const VocabSoftmaxLoopGradArgs& a, const Compute& c) {
  const bool kl = a.mode == kExactKl;
  const Source src = source("hidden", a.source, a.dtype);
  const Source ref = kl ? source("ref_hidden", a.ref_source, a.dtype) : Source{};
  check_not_f16(a.source.in_dtype);
  check_terms(src, a.bf16_terms, a.tile16);
  require(a.tile, "tile");
  require(a.grad_hidden, "grad_hidden");
  if (kl) require(a.ref_tile, "ref_tile");
  if (a.grad_bias != 0 && a.source.bias == 0) throw std::invalid_argument("grad_bias is given but bias is not");
  if (a.grad_bias != 0 || (kl && a.ref_source.bias != 0)) require(a.ones, "ones (with a bias)");
  const uintptr_t stream = reinterpret_cast<uintptr_t>(c.stream);
  for (int64_t v0 = 0; v0 < a.vocab; v0 += a.chunk) {
    const int64_t w = std::min(a.chunk, a.vocab - v0);
    logits_tile(c, src, a.n, v0, w, a.ones, a.tile);
    if (kl) logits_tile(c, ref, a.n, v0, w, a.ones, a.ref_tile);
    // in place: the gradient overwrites the logits tile
    c.tiles->grad(VocabSoftmaxGradArgs{.mode = a.mode, .dtype = a.dtype, .z = a.tile, .ldz = w,
                                       .r = kl ? a.ref_tile : 0, .ldr = w, .out = a.tile, .ldo = w, .n = a.n,
                                       .vc = w, .v_offset = v0, .inv_temp = a.inv_temp, .targets = a.targets,
                                       .m = a.m, .logs = a.logs, .q = a.q, .g = a.g},
                  stream);
    if (a.grad_bias != 0) grad_bias_gemm(c, a.tile, a.ones, a.n, v0, w, a.grad_bias, false);
    const Terms d = gradient_terms(c, src, a.tile, a.tile16, a.bf16_terms, a.n * w);
    grad_hidden_gemm(c, src, d, a.n, v0, w, a.grad_hidden, v0 > 0);  // summed over the vocabulary chunks
    if (a.grad_weight != 0) grad_weight_gemm(c, src, src.hidden, d, a.n, v0, w, a.grad_weight, false);
  }
}

// Token chunks of whole vocabulary rows: each tile's log-sum-exp is final at once, so its gradient is formed
// while it is still in memory (3 GEMMs in all, against 4 for a per-token op with its backward pass).
void run_ce(const VocabSoftmaxLoopCrossEntropyArgs& a, const Compute& c) {
  const Source src = source("hidden", a.source, a.dtype);
  const bool grads = a.grad_hidden != 0 || a.grad_weight != 0 || a.grad_bias != 0;
  if (grads) {
    check_not_f16(a.source.in_dtype);
    check_terms(src, a.bf16_terms, a.tile16);
    require(a.g, "g (with gradients)");
  }
  require(a.tile, "tile");
  require(a.m, "m");
  require(a.s, "s");
  require(a.tgt, "tgt");
  require(a.logs, "logs");
  if (a.grad_bias != 0 && a.source.bias == 0) throw std::invalid_argument("grad_bias is given but bias is not");
  if (a.source.bias != 0) require(a.ones, "ones (with a bias)");
  const uintptr_t stream = reinterpret_cast<uintptr_t>(c.stream);
  for (int64_t i0 = 0; i0 < a.n; i0 += a.rows) {
    const int64_t r = std::min(a.rows, a.n - i0);
    Source part = src;
    part.hidden = offset(a.source.hidden, i0 * a.source.h, src.op.bytes);
    const uintptr_t t_i = offset(a.targets, i0, 8);
    logits_tile(c, part, r, 0, a.vocab, a.ones, a.tile);
    // the fields left out (r, ldr, a, mr, sr) stay 0: mode 0 reads none of them
    c.tiles->stats(VocabSoftmaxFwdArgs{.mode = kLogprob, .dtype = a.dtype, .z = a.tile, .ldz = a.vocab, .n = r,
                                       .vc = a.vocab, .v_offset = 0, .inv_temp = a.inv_temp, .targets = t_i,
                                       .m = offset(a.m, i0, c.bytes), .s = offset(a.s, i0, c.bytes),
                                       .tgt = offset(a.tgt, i0, c.bytes)},
                   stream);
    c.tiles->log(a.dtype, offset(a.s, i0, c.bytes), offset(a.logs, i0, c.bytes), r, c.stream);
    if (!grads) continue;
    // in place, as in run_grad; r, ldr and q stay 0 (mode 0)
    c.tiles->grad(VocabSoftmaxGradArgs{.mode = kLogprob, .dtype = a.dtype, .z = a.tile, .ldz = a.vocab,
                                       .out = a.tile, .ldo = a.vocab, .n = r, .vc = a.vocab, .v_offset = 0,
                                       .inv_temp = a.inv_temp, .targets = t_i, .m = offset(a.m, i0, c.bytes),
                                       .logs = offset(a.logs, i0, c.bytes), .g = offset(a.g, i0, c.bytes)},
                  stream);
    if (a.grad_bias != 0) grad_bias_gemm(c, a.tile, a.ones, r, 0, a.vocab, a.grad_bias, i0 > 0);
    const Terms d = gradient_terms(c, src, a.tile, a.tile16, a.bf16_terms, r * a.vocab);
    if (a.grad_hidden != 0)
      grad_hidden_gemm(c, src, d, r, 0, a.vocab, offset(a.grad_hidden, i0 * a.source.h, c.bytes), false);
    if (a.grad_weight != 0)
      grad_weight_gemm(c, src, part.hidden, d, r, 0, a.vocab, a.grad_weight, i0 > 0);  // over chunks
  }
}

}  // namespace

CublasInfo cublas_info() {
  const blas::LibraryInfo& lib = blas::library();
  return {lib.path, lib.major, lib.minor, lib.patch};
}

void vocab_softmax_loop_fwd(const VocabSoftmaxLoopFwdArgs& a, uintptr_t stream) {
  check_common(a.mode, a.dtype, a.n, a.chunk);
  if (a.n <= 0 || a.vocab <= 0) return;
  DeviceGuard guard(a.m);
  run_fwd(a, compute(a.dtype, stream, current_device(), kCudaTiles));
}

void vocab_softmax_loop_grad(const VocabSoftmaxLoopGradArgs& a, uintptr_t stream) {
  check_common(a.mode, a.dtype, a.n, a.chunk);
  if (a.n <= 0 || a.vocab <= 0) return;
  DeviceGuard guard(a.grad_hidden);
  run_grad(a, compute(a.dtype, stream, current_device(), kCudaTiles));
}

void host_vocab_softmax_loop_fwd(const VocabSoftmaxLoopFwdArgs& a) {
  check_common(a.mode, a.dtype, a.n, a.chunk);
  if (a.n <= 0 || a.vocab <= 0) return;
  run_fwd(a, compute(a.dtype, 0, -1, kHostTiles));
}

void host_vocab_softmax_loop_grad(const VocabSoftmaxLoopGradArgs& a) {
  check_common(a.mode, a.dtype, a.n, a.chunk);
  if (a.n <= 0 || a.vocab <= 0) return;
  run_grad(a, compute(a.dtype, 0, -1, kHostTiles));
}

void vocab_softmax_loop_cross_entropy(const VocabSoftmaxLoopCrossEntropyArgs& a, uintptr_t stream) {
  check_common(kLogprob, a.dtype, a.n, a.rows);
  if (a.n <= 0 || a.vocab <= 0) return;
  DeviceGuard guard(a.logs);
  run_ce(a, compute(a.dtype, stream, current_device(), kCudaTiles));
}

void host_vocab_softmax_loop_cross_entropy(const VocabSoftmaxLoopCrossEntropyArgs& a) {
  check_common(kLogprob, a.dtype, a.n, a.rows);
  if (a.n <= 0 || a.vocab <= 0) return;
  run_ce(a, compute(a.dtype, 0, -1, kHostTiles));
}

}  // namespace ra3::cuda
