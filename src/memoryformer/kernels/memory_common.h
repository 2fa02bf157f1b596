// Shared helpers of the memoryformer C++ kernels: vector types, options, the hash, and the
// token-major / small-N gather kernels. Included by memory_kernels.cpp (the Memory Layer ops) and
// decode_kernels.cpp (the fused MemoryFormer decode block).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif


namespace mf {

// ------------------------------------------------------------------------------------------------
// Vector helpers
// ------------------------------------------------------------------------------------------------
// Native vector width: 64 bytes with AVX-512, 32 with AVX/AVX2, 16 otherwise (wider vectors than
// the hardware's make GCC emulate them through the stack).
#if defined(__AVX512F__)
#define MF_VBYTES 64
#elif defined(__AVX__)
#define MF_VBYTES 32
#else
#define MF_VBYTES 16
#endif
constexpr int64_t VW = MF_VBYTES / 4;  // floats per vector
typedef float vf __attribute__((vector_size(MF_VBYTES)));
typedef float vfu __attribute__((vector_size(MF_VBYTES), aligned(4), may_alias));
typedef uint16_t vhu __attribute__((vector_size(MF_VBYTES / 2), aligned(2), may_alias));
typedef uint16_t vh __attribute__((vector_size(MF_VBYTES / 2)));
typedef uint32_t vu __attribute__((vector_size(MF_VBYTES)));
typedef int32_t vi __attribute__((vector_size(MF_VBYTES)));
typedef int8_t vqu __attribute__((vector_size(MF_VBYTES / 4), aligned(1), may_alias));

using bf16 = c10::BFloat16;

static inline float to_f(float v) { return v; }
static inline float to_f(bf16 v) { return static_cast<float>(v); }
static inline float to_f(int8_t v) { return static_cast<float>(v); }

static inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline vf vload(const bf16* p) {
  vu u = __builtin_convertvector(*reinterpret_cast<const vhu*>(p), vu) << 16;
  return reinterpret_cast<vf&>(u);
}
static inline vf vload(const int8_t* p) {
  return __builtin_convertvector(*reinterpret_cast<const vqu*>(p), vf);
}

static inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline void vstore(bf16* p, vf v) {
  // round to nearest even, NaN -> quiet NaN (as c10::BFloat16)
  vu u = reinterpret_cast<vu&>(v);
  vu r = (u + (vu)((u >> 16) & 1u) + 0x7FFFu) >> 16;
  vi nan = (v != v);
  r = (r & ~(vu)nan) | ((vu)nan & 0x7FC0u);
  *reinterpret_cast<vhu*>(p) = __builtin_convertvector(r, vh);
}
// Non-temporal store when p is vector-aligned (write-once outputs: skips the read-for-ownership).
static inline void vstore_nt(float* p, vf v) {
#if defined(__AVX512F__)
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
#elif defined(__AVX__)
  if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_ps(p, reinterpret_cast<__m256&>(v));
#endif
  vstore(p, v);
}
static inline void vstore_nt(bf16* p, vf v) { vstore(p, v); }
static inline void sstore(float* p, float v) { *p = v; }
static inline void sstore(bf16* p, float v) { *p = bf16(v); }

static inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512&>(v));
#elif defined(__AVX__)
  const __m256 x = reinterpret_cast<__m256&>(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
#else
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
#endif
}

// exp(x) for x <= 0 (NaN propagates); Cephes-style, about 1 ulp; clamps below -87 (result ~1e-38).
static inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float fn = (t + 12582912.0f) - 12582912.0f;  // round to nearest, |t| < 2^22
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fn);
  const uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// 64-byte aligned float buffer (cache-line aligned rows; unaligned tiles split vector accesses
// across lines, which measured about 2x slower).
struct AlignedFloats {
  float* p = nullptr;
  explicit AlignedFloats(int64_t n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * 4 + 63) / 64 * 64;
    p = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p != nullptr, "memoryformer: out of memory allocating ", bytes, " bytes");
  }
  ~AlignedFloats() { std::free(p); }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
};

// ------------------------------------------------------------------------------------------------
// Options (tunable at run time through memoryformer::_set_option, for benchmarks)
// ------------------------------------------------------------------------------------------------
struct Options {
  int64_t fwd_algo = 0;      // 0 auto, 1 token-major, 2 bucket-major (CSR), 3 small-N column split
  int64_t cb_fwd = 64;       // token-major column block (floats, multiple of 16; 16/32/64)
  int64_t cb_bucket = 64;    // bucket-major forward / backward column block (16/32/64), upper bound
  int64_t small_n = 16;      // N <= small_n per thread: column-split small-N path
  int64_t seg_max = 1024;    // small-N: max columns per work item
  int64_t split_min = 16384; // small-N: split a token's columns across threads only if N*K*d >= this
  int64_t prefetch = 4;      // rows ahead for software prefetch (0: off)
  int64_t bucket_min_n = 256;   // auto: bucket-major forward only for N >= this, ...
  int64_t bucket_min_table_bytes = 16 << 20;  // ... a table of at least this many bytes ...
  // ... and at least bucket_min_entries entries per table row (N K / R) for fp32 tables, or at least
  // bucket_min_half_entries_lowp halves of one (2 N K / R) for bf16 and int8 tables. The values follow
  // the two hosts measured (memory_kernels.cpp: want_csr), not a known mechanism.
#if defined(__AVX512F__)
  int64_t bucket_min_entries = 2;
  int64_t bucket_min_half_entries_lowp = 3;
#else
  int64_t bucket_min_entries = 3;
  int64_t bucket_min_half_entries_lowp = 6;
#endif
  int64_t tile_bytes = 1048576;     // bucket-major forward: max bytes of the (N, cb) tile (halves cb)
  int64_t tile_bytes_bwd = 262144;  // bucket-major backward: same for the grad tile
  int64_t row_prefetch = 16;    // bucket-major: table rows ahead for software prefetch
  int64_t nt_store = 1;         // bucket-major backward: non-temporal stores of the table gradient
  int64_t grad_sqnorm = 1;      // backward: sum each fp32 table gradient's squares as it is written
  int64_t hugepages = 0;        // 1: back large tables with 2 MiB pages on first use (Linux madvise)
  int64_t pf_loc = 2;           // bucket-major: prefetch locality 0..3 (2: into L2; rows are
                                // 4 KiB apart, so L1 prefetches conflict in one set)
};

// Prefetch the `bytes` bytes at p (all cache lines), for reading.
static inline void prefetch_span(const void* p, int64_t bytes, int64_t loc) {
  const char* c = static_cast<const char*>(p);
  switch (loc) {
    case 0: for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 0); break;
    case 1: for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 1); break;
    case 2: for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2); break;
    default: for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3); break;
  }
}
inline Options g_opt;  // one instance shared by every translation unit

// ------------------------------------------------------------------------------------------------
// Hashing
// ------------------------------------------------------------------------------------------------
struct HashSpec {
  int64_t K, tau, D;
  float scale;  // 2 / temperature ("prob") or 2 ("l1")
  bool l1;
};

static inline HashSpec make_spec(int64_t D, int64_t tau, c10::string_view weighting, double temperature) {
  TORCH_CHECK(tau >= 1 && tau <= 16, "memoryformer: tau must be in 1..16, got ", tau);
  TORCH_CHECK(D > 0 && D % tau == 0, "memoryformer: in_features=", D,
              " must be a positive multiple of tau=", tau);
  const std::string w(weighting);
  TORCH_CHECK(w == "prob" || w == "l1", "memoryformer: weighting must be 'prob' or 'l1', got '", w,
              "'");
  TORCH_CHECK(temperature > 0, "memoryformer: temperature must be positive, got ", temperature);
  HashSpec hs;
  hs.K = D / tau;
  hs.tau = tau;
  hs.D = D;
  hs.l1 = (w == "l1");
  hs.scale = hs.l1 ? 2.0f : static_cast<float>(2.0 / temperature);
  return hs;
}

// tau = 8 (the paper's and the presets' hash width): one chunk is one 8-float vector, so a chunk's
// product, sign code and L1 norm are three butterfly reductions instead of three serial chains
// (measured: the chains were about half of a hash). Products and sums are taken pairwise, so the
// weights can differ from the serial loop's in the last bit.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define MF_CHUNK8 1
#endif
#endif
#ifdef MF_CHUNK8
typedef float v8f __attribute__((vector_size(32)));
typedef float v8fu __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8hu __attribute__((vector_size(16), aligned(2), may_alias));

static inline v8f load8(const float* p) { return *reinterpret_cast<const v8fu*>(p); }
static inline v8f load8(const bf16* p) {
  v8u u = __builtin_convertvector(*reinterpret_cast<const v8hu*>(p), v8u) << 16;
  return reinterpret_cast<v8f&>(u);
}
static inline v8f abs8(v8f v) {
  v8u u = reinterpret_cast<v8u&>(v) & 0x7FFFFFFFu;
  return reinterpret_cast<v8f&>(u);
}
// Every lane: the product / sum / bitwise or of the 8 lanes.
static inline v8f all_prod8(v8f f) {
  f *= __builtin_shufflevector(f, f, 1, 0, 3, 2, 5, 4, 7, 6);
  f *= __builtin_shufflevector(f, f, 2, 3, 0, 1, 6, 7, 4, 5);
  return f * __builtin_shufflevector(f, f, 4, 5, 6, 7, 0, 1, 2, 3);
}
static inline v8f all_sum8(v8f f) {
  f += __builtin_shufflevector(f, f, 1, 0, 3, 2, 5, 4, 7, 6);
  f += __builtin_shufflevector(f, f, 2, 3, 0, 1, 6, 7, 4, 5);
  return f + __builtin_shufflevector(f, f, 4, 5, 6, 7, 0, 1, 2, 3);
}
static inline int32_t or8(v8i b) {
  b |= __builtin_shufflevector(b, b, 1, 0, 3, 2, 5, 4, 7, 6);
  b |= __builtin_shufflevector(b, b, 2, 3, 0, 1, 6, 7, 4, 5);
  return b[0] | b[4];
}

// hash_token's chunk loop for tau = 8, given e[i] = exp(-scale |x[i]|).
template <typename XT>
static inline void hash_chunks8(const XT* x, const HashSpec& hs, const float* e, int32_t* rows, float* w) {
  const v8i bit = {128, 64, 32, 16, 8, 4, 2, 1};  // the chunk's first element is the top bit
  for (int64_t k = 0; k < hs.K; ++k) {
    const v8f z = load8(x + k * 8);
    const float prod = all_prod8(1.f + load8(e + k * 8))[0];
    rows[k] = static_cast<int32_t>((k << 8) | or8((z >= 0.f) & bit));
    const float wk = hs.l1 ? all_sum8(abs8(z))[0] / prod : 1.f / prod;
    w[k] = to_f(static_cast<XT>(wk));  // weights live in x's dtype, as in memoryformer.layer
  }
}

// hash_token_backward's chunk loop for tau = 8.
template <typename XT>
static inline void hash_chunks8_backward(const XT* x, const HashSpec& hs, const float* gw, const float* e,
                                         XT* gx) {
  const float s = hs.scale;
  for (int64_t k = 0; k < hs.K; ++k) {
    const v8f z = load8(x + k * 8);
    const v8f ek = load8(e + k * 8);
    const v8f f = 1.f + ek;
    const v8f P = 1.f / all_prod8(f);
    const v8f sg = __builtin_convertvector((z < 0.f) - (z > 0.f), v8f);  // sign, 0 for 0 and NaN
    const v8f q = ek / f;  // 1 - sigmoid(s |v|)
    const v8f d = hs.l1 ? P * (1.f + s * all_sum8(abs8(z)) * q) : P * s * q;
    const v8f out = gw[k] * sg * d;
    for (int j = 0; j < 8; ++j) gx[k * 8 + j] = static_cast<XT>(out[j]);
  }
}
#endif

// One token: rows[k] = k*2^tau + code, w[k]; e is scratch of D floats.
template <typename XT>
static inline void hash_token(const XT* x, const HashSpec& hs, float* e, int32_t* rows, float* w) {
  const int64_t D = hs.D, tau = hs.tau;
  const float ns = -hs.scale;
  for (int64_t i = 0; i < D; ++i) e[i] = exp_nonpos(ns * std::fabs(to_f(x[i])));
#ifdef MF_CHUNK8
  if (tau == 8) return hash_chunks8(x, hs, e, rows, w);
#endif
  for (int64_t k = 0; k < hs.K; ++k) {
    const XT* z = x + k * tau;
    const float* ek = e + k * tau;
    int32_t code = 0;
    float prod = 1.f, l1 = 0.f;
    for (int64_t j = 0; j < tau; ++j) {
      const float v = to_f(z[j]);
      code = (code << 1) | static_cast<int32_t>(v >= 0.f);
      prod *= 1.f + ek[j];
      l1 += std::fabs(v);
    }
    rows[k] = static_cast<int32_t>((k << tau) | code);
    const float wk = hs.l1 ? l1 / prod : 1.f / prod;
    w[k] = to_f(static_cast<XT>(wk));  // weights live in x's dtype, as in memoryformer.layer
  }
}

// One token: gx[k*tau+j] = gw[k] * dw_k/dx_{k*tau+j}; e is scratch of D floats.
template <typename XT>
static inline void hash_token_backward(const XT* x, const HashSpec& hs, const float* gw, float* e,
                                       XT* gx) {
  const int64_t D = hs.D, tau = hs.tau;
  const float s = hs.scale, ns = -hs.scale;
  for (int64_t i = 0; i < D; ++i) e[i] = exp_nonpos(ns * std::fabs(to_f(x[i])));
#ifdef MF_CHUNK8
  if (tau == 8) return hash_chunks8_backward(x, hs, gw, e, gx);
#endif
  for (int64_t k = 0; k < hs.K; ++k) {
    const XT* z = x + k * tau;
    const float* ek = e + k * tau;
    float prod = 1.f, l1 = 0.f;
    for (int64_t j = 0; j < tau; ++j) {
      prod *= 1.f + ek[j];
      l1 += std::fabs(to_f(z[j]));
    }
    const float P = 1.f / prod;
    const float g = gw[k];
    for (int64_t j = 0; j < tau; ++j) {
      const float v = to_f(z[j]);
      const float sg = static_cast<float>((v > 0.f) - (v < 0.f));
      const float q = ek[j] / (1.f + ek[j]);  // 1 - sigmoid(s |v|)
      const float d = hs.l1 ? P * (1.f + s * l1 * q) : P * s * q;
      gx[k * tau + j] = static_cast<XT>(g * sg * d);
    }
  }
}

// Hash tokens [n0, n1) of x (N, D) into rows/w (N, K) (parallel over tokens).
template <typename XT>
static inline void hash_all(const XT* x, const HashSpec& hs, int64_t N, int32_t* rows, float* w) {
  const int64_t grain = std::max<int64_t>(1, 4096 / hs.D);
  at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    std::vector<float> scratch(hs.D);
    for (int64_t n = b; n < e; ++n) hash_token(x + n * hs.D, hs, scratch.data(), rows + n * hs.K, w + n * hs.K);
  });
}

// ------------------------------------------------------------------------------------------------
// Gather kernels. A Table couples data (TT = float, bf16 or int8) with optional per-row scales.
// ------------------------------------------------------------------------------------------------
template <typename TT>
struct Table {
  const TT* data;
  const float* scales;  // int8 only, else nullptr
  int64_t R, d;
  inline float wscale(int32_t r, float w) const { return scales ? w * scales[r] : w; }
};

// Token-major register-blocked: dst[c..c+NV*16) = bias + sum_k w_k T[rows_k, c..]
template <int NV, typename TT, typename OT>
static inline void tok_block(const int32_t* rows, const float* w, int64_t K, const Table<TT>& T,
                             int64_t c, const float* bias, OT* dst, int64_t pd) {
  vf a[NV];
  for (int v = 0; v < NV; ++v) a[v] = vf{} + 0.f;
  const int64_t d = T.d;
  for (int64_t k = 0; k < K; ++k) {
    if (pd && k + pd < K) __builtin_prefetch(T.data + rows[k + pd] * d + c);
    const int32_t r = rows[k];
    const float ww = T.wscale(r, w[k]);
    const TT* p = T.data + static_cast<int64_t>(r) * d + c;
    for (int v = 0; v < NV; ++v) a[v] += ww * vload(p + VW * v);
  }
  for (int v = 0; v < NV; ++v) {
    if (bias) a[v] += vload(bias + c + VW * v);
    vstore(dst + c + VW * v, a[v]);
  }
}

// Scalar columns [c0, c1) of one token.
template <typename TT, typename OT>
static inline void tok_scalar(const int32_t* rows, const float* w, int64_t K, const Table<TT>& T,
                              int64_t c0, int64_t c1, const float* bias, OT* dst) {
  for (int64_t c = c0; c < c1; ++c) {
    float a = 0.f;
    for (int64_t k = 0; k < K; ++k) a += T.wscale(rows[k], w[k]) * to_f(T.data[rows[k] * T.d + c]);
    sstore(dst + c, bias ? a + bias[c] : a);
  }
}

// One token, columns [c0, c1): register blocks of cb floats, then 16, then scalar.
template <typename TT, typename OT>
static inline void tok_cols(const int32_t* rows, const float* w, int64_t K, const Table<TT>& T,
                            int64_t c0, int64_t c1, int64_t cb, const float* bias, OT* dst,
                            int64_t pd) {
  int64_t c = c0;
  if (cb >= 64)
    for (; c + 64 <= c1; c += 64) tok_block<64 / VW>(rows, w, K, T, c, bias, dst, pd);
  if (cb >= 32)
    for (; c + 32 <= c1; c += 32) tok_block<32 / VW>(rows, w, K, T, c, bias, dst, pd);
  for (; c + VW <= c1; c += VW) tok_block<1>(rows, w, K, T, c, bias, dst, pd);
  if (c < c1) tok_scalar(rows, w, K, T, c, c1, bias, dst);
}

// Token-major forward for tokens [n0, n1): column blocks outer so each block's table slice
// (R x cb) is reused across the tokens while it is cache-resident.
template <typename TT, typename OT>
static inline void fwd_token_major(const int32_t* rows, const float* w, int64_t K, const Table<TT>& T,
                            const float* bias, OT* out, int64_t n0, int64_t n1) {
  const int64_t cb = g_opt.cb_fwd, pd = g_opt.prefetch, d = T.d;
  const int64_t step = std::max<int64_t>(cb, 16);
  for (int64_t c = 0; c < d; c += step) {
    const int64_t ce = std::min(d, c + step);
    for (int64_t n = n0; n < n1; ++n)
      tok_cols(rows + n * K, w + n * K, K, T, c, ce, cb, bias, out + n * d, pd);
  }
}

// Small-N forward, one work item: all N tokens, columns [c0, c1): rows read contiguously,
// accumulators in an L1 buffer.
template <typename TT, typename OT>
static inline void fwd_segment(const int32_t* rows, const float* w, int64_t N, int64_t K, const Table<TT>& T,
                        const float* bias, OT* out, int64_t c0, int64_t c1) {
  const int64_t d = T.d, pd = g_opt.prefetch;
  const int64_t nv = (c1 - c0) / VW;
  const int64_t cv = c0 + nv * VW;
  alignas(64) float acc[1024];
  for (int64_t n = 0; n < N; ++n) {
    const int32_t* rn = rows + n * K;
    const float* wn = w + n * K;
    for (int64_t i = 0; i < nv; ++i) vstore(acc + i * VW, vf{} + 0.f);
    if (pd)
      for (int64_t k = 0; k < std::min(pd, K); ++k)
        for (int64_t c = c0; c < c1; c += 64 / sizeof(TT)) __builtin_prefetch(T.data + rn[k] * d + c);
    for (int64_t k = 0; k < K; ++k) {
      if (pd && k + pd < K) {
        const TT* q = T.data + rn[k + pd] * d;
        for (int64_t c = c0; c < c1; c += 64 / sizeof(TT)) __builtin_prefetch(q + c);
      }
      const float ww = T.wscale(rn[k], wn[k]);
      const TT* p = T.data + static_cast<int64_t>(rn[k]) * d + c0;
      for (int64_t i = 0; i < nv; ++i) vstore(acc + i * VW, vload(acc + i * VW) + ww * vload(p + i * VW));
    }
    OT* o = out + n * d;
    for (int64_t i = 0; i < nv; ++i) {
      vf v = vload(acc + i * VW);
      if (bias) v += vload(bias + c0 + i * VW);
      vstore(o + c0 + i * VW, v);
    }
    if (cv < c1) tok_scalar(rn, wn, K, T, cv, c1, bias, o);
  }
}

}  // namespace mf
