// Fast CPU kernels for the MemoryFormer Memory Layer (see memoryformer/layer.py for the math).
//
// Registered as torch.library custom ops in the `memoryformer` namespace; the Python side
// (memoryformer/kernels) adds fake (meta) kernels, autograd formulas and dispatch rules.
//
// Notation: x (N, D = K * tau); rows (N, K) are global table rows `k * 2^tau + code`;
// w (N, K) the weights; a table is (R = K * 2^tau, d); out (N, d) = sum_k w[n,k] table[rows[n,k]].
//
// Vector code uses GCC/Clang vector extensions (16 floats, one cache line): the compiler maps them
// to AVX-512, AVX2 or SSE as -march allows. Parallelism is at::parallel_for (ATen's OpenMP pool),
// so torch.set_num_threads is respected.

#include "memory_common.h"

namespace mf {


static int64_t set_option(c10::string_view name, int64_t value) {
  const std::string s(name);
  int64_t* p = nullptr;
  if (s == "fwd_algo") p = &g_opt.fwd_algo;
  else if (s == "cb_fwd") p = &g_opt.cb_fwd;
  else if (s == "cb_bucket") p = &g_opt.cb_bucket;
  else if (s == "small_n") p = &g_opt.small_n;
  else if (s == "seg_max") p = &g_opt.seg_max;
  else if (s == "split_min") p = &g_opt.split_min;
  else if (s == "prefetch") p = &g_opt.prefetch;
  else if (s == "bucket_min_n") p = &g_opt.bucket_min_n;
  else if (s == "bucket_min_table_bytes") p = &g_opt.bucket_min_table_bytes;
  else if (s == "bucket_min_entries") p = &g_opt.bucket_min_entries;
  else if (s == "bucket_min_half_entries_lowp") p = &g_opt.bucket_min_half_entries_lowp;
  else if (s == "tile_bytes") p = &g_opt.tile_bytes;
  else if (s == "tile_bytes_bwd") p = &g_opt.tile_bytes_bwd;
  else if (s == "row_prefetch") p = &g_opt.row_prefetch;
  else if (s == "pf_loc") p = &g_opt.pf_loc;
  else if (s == "hugepages") p = &g_opt.hugepages;
  else if (s == "nt_store") p = &g_opt.nt_store;
  else if (s == "grad_sqnorm") p = &g_opt.grad_sqnorm;
  TORCH_CHECK(p != nullptr, "memoryformer::_set_option: unknown option '", s, "'");
  const int64_t old = *p;
  if (value >= 0) *p = value;
  return old;
}

// Tables are read in column blocks, one short run per 4 KiB row: with 4 KiB pages nearly every
// run is a TLB miss (measured about 1.5x slower than with 2 MiB pages). On first use of a large
// table, ask Linux to back its 2 MiB-aligned interior with huge pages: MADV_COLLAPSE (Linux 6.1+,
// synchronous, same addresses and contents) else MADV_HUGEPAGE (a hint). Failures are ignored.
// Each address range is handled once per process. Opt-in: _set_option("hugepages", 1) (the first
// call then pays the collapse, about 0.1-0.3 s per 128 MiB; THP_MEM_ALLOC_ENABLE=1 before start-up
// gets the same pages from the allocator for free).
static void maybe_hugepages(const void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t H = uintptr_t(1) << 21;
  if (!g_opt.hugepages || bytes < (int64_t(8) << 20)) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + H - 1) & ~(H - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(H - 1);
  if (e <= a) return;
  static std::mutex mu;
  static std::unordered_set<uintptr_t> seen;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (seen.size() > 65536) seen.clear();
    if (!seen.insert(a ^ (e << 1)).second) return;
  }
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
  if (madvise(reinterpret_cast<void*>(a), e - a, MADV_COLLAPSE) != 0)
    madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

static void maybe_hugepages(const at::Tensor& t) {
  if (t.numel() > 0) maybe_hugepages(t.data_ptr(), static_cast<int64_t>(t.nbytes()));
}

// ------------------------------------------------------------------------------------------------
// Bucket-major (CSR) structure: the N*K (token, slot) entries grouped by table row.
// ------------------------------------------------------------------------------------------------
struct CSR {
  std::vector<int32_t> start;  // R + 1
  std::vector<int32_t> tok;    // entry -> token n
  std::vector<int32_t> slot;   // entry -> k * N + n (transposed: a table's slots are contiguous)
  std::vector<float> w;        // entry -> weight
};

// Stable counting sort of the entries by row (ties keep token order): deterministic.
static void build_csr(const int32_t* rows, const float* w, int64_t N, int64_t K, int64_t R, CSR& csr) {
  const int64_t E = N * K;
  TORCH_CHECK(E < (int64_t(1) << 31), "memoryformer: N*K = ", E,
              " entries exceed the int32 index range; split the batch into smaller calls");
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + 63) / 64));
  std::vector<int32_t> counts(static_cast<size_t>(T * R), 0);
  const int64_t chunk = (N + T - 1) / T;
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int32_t* c = counts.data() + t * R;
      const int64_t s0 = std::min(N, t * chunk) * K, s1 = std::min(N, (t + 1) * chunk) * K;
      for (int64_t i = s0; i < s1; ++i) c[rows[i]]++;
    }
  });
  csr.start.assign(static_cast<size_t>(R + 1), 0);
  int32_t run = 0;
  for (int64_t r = 0; r < R; ++r) {
    csr.start[r] = run;
    for (int64_t t = 0; t < T; ++t) {
      const int32_t c = counts[t * R + r];
      counts[t * R + r] = run;
      run += c;
    }
  }
  csr.start[R] = run;
  csr.tok.resize(E);
  csr.slot.resize(E);
  csr.w.resize(E);
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int32_t* c = counts.data() + t * R;
      const int64_t n0 = std::min(N, t * chunk), n1 = std::min(N, (t + 1) * chunk);
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = n * K + k;
          const int32_t pos = c[rows[i]]++;
          csr.tok[pos] = static_cast<int32_t>(n);
          csr.slot[pos] = static_cast<int32_t>(k * N + n);
          csr.w[pos] = w[i];
        }
    }
  });
}

// (K, N) -> (N, K)
static void transpose_kn(const float* src, int64_t K, int64_t N, float* dst) {
  constexpr int64_t B = 32;
  for (int64_t n0 = 0; n0 < N; n0 += B)
    for (int64_t k0 = 0; k0 < K; k0 += B)
      for (int64_t n = n0; n < std::min(N, n0 + B); ++n)
        for (int64_t k = k0; k < std::min(K, k0 + B); ++k) dst[n * K + k] = src[k * N + n];
}

// Column block for the bucket-major passes: the largest of cb_bucket, /2, /4 (>= 16 floats) whose
// (N, cb) float tile fits `bytes`. Wider blocks read longer runs of each table row (fewer DRAM
// pages per byte); narrower keep the tile in L2. Measured: forward prefers the wider, backward
// (two tiles' worth of traffic per entry) the narrower.
static int64_t bucket_cb(int64_t N, int64_t bytes) {
  int64_t cb = std::max<int64_t>(16, g_opt.cb_bucket);
  while (cb > 16 && N * cb * 4 > bytes) cb /= 2;
  return cb;
}

// Bucket-major forward for column blocks; out tile (N, cb) in float stays in L2.
template <int NV, typename TT>
static inline void bucket_fwd_block(const CSR& csr, const Table<TT>& T, int64_t c, float* tile,
                                    int64_t ld) {
  const int64_t d = T.d, pd = g_opt.row_prefetch;
  const int64_t loc = g_opt.pf_loc;
  const int32_t* start = csr.start.data();
  const int32_t* tok = csr.tok.data();
  const float* wts = csr.w.data();
  for (int64_t r = 0; r < T.R; ++r) {
    const int32_t p0 = start[r], p1 = start[r + 1];
    if (pd && r + pd < T.R && start[r + pd] < start[r + pd + 1])  // only rows that are used
      prefetch_span(T.data + (r + pd) * d + c, NV * VW * sizeof(TT), loc);
    if (p0 == p1) continue;
    vf row[NV];
    const float sc = T.scales ? T.scales[r] : 1.f;
    for (int v = 0; v < NV; ++v) row[v] = sc * vload(T.data + r * d + c + VW * v);
    for (int32_t p = p0; p < p1; ++p) {
      float* o = tile + static_cast<int64_t>(tok[p]) * ld;
      const float ww = wts[p];
      for (int v = 0; v < NV; ++v) vstore(o + VW * v, vload(o + VW * v) + ww * row[v]);
    }
  }
}

template <typename TT, typename OT>
static void fwd_bucket_major(const CSR& csr, int64_t N, const Table<TT>& T, const float* bias, OT* out) {
  const int64_t d = T.d;
  const int64_t cb = bucket_cb(N, g_opt.tile_bytes);
  const int64_t nvec = d / VW;
  const int64_t nblk = (nvec * VW + cb - 1) / cb;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    AlignedFloats tilebuf(N * cb);
    float* tile = tilebuf.p;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c = b * cb;
      const int64_t w = std::min(cb, nvec * VW - c);
      std::fill(tile, tile + N * cb, 0.f);
      for (int64_t off = 0; off < w;) {  // w/VW vectors as blocks of 8, 4, 2, 1 vectors
        const int64_t nv = (w - off) / VW;
        if (nv >= 8) bucket_fwd_block<8>(csr, T, c + off, tile + off, cb), off += 8 * VW;
        else if (nv >= 4) bucket_fwd_block<4>(csr, T, c + off, tile + off, cb), off += 4 * VW;
        else if (nv >= 2) bucket_fwd_block<2>(csr, T, c + off, tile + off, cb), off += 2 * VW;
        else bucket_fwd_block<1>(csr, T, c + off, tile + off, cb), off += VW;
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < w; i += VW) {
          vf v = vload(tile + n * cb + i);
          if (bias) v += vload(bias + c + i);
          vstore(out + n * d + c + i, v);
        }
    }
  });
}

// Bucket-major backward for one column block [c, c + VW*NV): grad-table rows written once (acc in
// registers); per-entry partial dots <g[n], T[r]> accumulated into gwT[k * N + n] (a table's
// entries then update one contiguous, cache-resident stretch). `gt` is the (N, ld)
// contiguous tile of grad_out's column block (a strided view would map every token's slice to
// the same cache sets, since rows are d*4 bytes apart).
template <int NV, typename TT>
static inline void bucket_bwd_block(const CSR& csr, const Table<TT>& T, const float* gt, int64_t ld,
                                    int64_t r0, int64_t r1, int64_t c, TT* gT, float* gw, double* sq) {
  const int64_t d = T.d, pd = g_opt.row_prefetch, loc = g_opt.pf_loc;
  const bool nts = g_opt.nt_store != 0;
  const int32_t* start = csr.start.data();
  const int32_t* tok = csr.tok.data();
  const int32_t* slot = csr.slot.data();
  const float* wts = csr.w.data();
  // squares of the rows written, in float for 64 rows at a time, then in double; one accumulator per
  // vector of the block, so that no chain of dependent adds runs through the row loop (a single
  // accumulator made the backward at d = 128 about 30% slower)
  vf sqv[NV];
  for (int v = 0; v < NV; ++v) sqv[v] = vf{} + 0.f;
  double sqd = 0.0;
  int sq_rows = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t p0 = start[r], p1 = start[r + 1];
    vf acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = vf{} + 0.f;
    if (gw) {
      if (pd && r + pd < r1 && start[r + pd] < start[r + pd + 1])
        prefetch_span(T.data + (r + pd) * d + c, NV * VW * sizeof(TT), loc);
      if (p0 < p1) {
        vf row[NV];
        for (int v = 0; v < NV; ++v) row[v] = vload(T.data + r * d + c + VW * v);
        for (int32_t p = p0; p < p1; ++p) {
          const float* gn = gt + static_cast<int64_t>(tok[p]) * ld;
          const float ww = wts[p];
          vf dot = vf{} + 0.f;
          for (int v = 0; v < NV; ++v) {
            const vf gv = vload(gn + VW * v);
            if (gT) acc[v] += ww * gv;
            dot += gv * row[v];
          }
          gw[slot[p]] += hsum(dot);
        }
      }
    } else {
      for (int32_t p = p0; p < p1; ++p) {
        const float* gn = gt + static_cast<int64_t>(tok[p]) * ld;
        const float ww = wts[p];
        for (int v = 0; v < NV; ++v) acc[v] += ww * vload(gn + VW * v);
      }
    }
    if (gT) {
      if (nts)
        for (int v = 0; v < NV; ++v) vstore_nt(gT + r * d + c + VW * v, acc[v]);
      else
        for (int v = 0; v < NV; ++v) vstore(gT + r * d + c + VW * v, acc[v]);
      if (sq && p0 < p1) {  // the squared norm of what was just written, while it is in registers
        for (int v = 0; v < NV; ++v) sqv[v] += acc[v] * acc[v];
        if (++sq_rows == 64) {
          for (int v = 0; v < NV; ++v) sqd += hsum(sqv[v]), sqv[v] = vf{} + 0.f;
          sq_rows = 0;
        }
      }
    }
  }
  if (sq) {
    for (int v = 0; v < NV; ++v) sqd += hsum(sqv[v]);
    *sq += sqd;
  }
}

// Scalar tail columns [c0, d) of the backward (g: full (N, d) grad).
template <typename TT>
static void bucket_bwd_scalar(const CSR& csr, const Table<TT>& T, const float* g, int64_t r0,
                              int64_t r1, int64_t c0, TT* gT, float* gw, double* sq) {
  const int64_t d = T.d;
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t p0 = csr.start[r], p1 = csr.start[r + 1];
    for (int64_t c = c0; c < d; ++c) {
      float acc = 0.f;
      const float tv = to_f(T.data[r * d + c]);
      for (int32_t p = p0; p < p1; ++p) {
        const float gv = g[static_cast<int64_t>(csr.tok[p]) * d + c];
        acc += csr.w[p] * gv;
        if (gw) gw[csr.slot[p]] += gv * tv;
      }
      if (gT) sstore(gT + r * d + c, acc);
      if (gT && sq) *sq += static_cast<double>(acc) * acc;
    }
  }
}

// gT (R, d) (optional) and gw += partial dots (optional); parallel over row ranges of equal work.
// sq (optional, fp32 gT only): set to gT's squared 2-norm, summed as the rows are written (each
// thread in float over 64 rows at a time, then in double over its row range, then the threads in
// order), so that gradient clipping need not read gT again.
template <typename TT>
static void bwd_bucket_major(const CSR& csr, int64_t N, const Table<TT>& T, const float* g, TT* gT,
                             float* gw, double* sq = nullptr) {
  const int64_t R = T.R, d = T.d;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  std::vector<int64_t> bnd(static_cast<size_t>(nt + 1), R);
  bnd[0] = 0;
  const int64_t E = csr.start[R];
  for (int64_t t = 1, r = 0; t < nt; ++t) {
    const int64_t target = (E * t) / nt + (R * t) / nt;  // balance entries and rows
    while (r < R && static_cast<int64_t>(csr.start[r]) + r < target) ++r;
    bnd[t] = r;
  }
  const int64_t cb = bucket_cb(N, g_opt.tile_bytes_bwd);
  const int64_t cv = (d / VW) * VW;
  std::vector<double> sq_part(static_cast<size_t>(nt), 0.0);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    AlignedFloats tilebuf(N * cb);
    float* tile = tilebuf.p;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = bnd[t], r1 = bnd[t + 1];
      if (r0 >= r1) continue;
      double* tsq = (sq && gT) ? &sq_part[static_cast<size_t>(t)] : nullptr;
      for (int64_t c = 0; c < cv; c += cb) {
        const int64_t w = std::min(cb, cv - c);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t i = 0; i < w; i += VW) vstore(tile + n * cb + i, vload(g + n * d + c + i));
        for (int64_t off = 0; off < w;) {  // w/VW vectors as blocks of 4, 2, 1 vectors
          const int64_t nv = (w - off) / VW;
          if (nv >= 4) bucket_bwd_block<4>(csr, T, tile + off, cb, r0, r1, c + off, gT, gw, tsq), off += 4 * VW;
          else if (nv >= 2) bucket_bwd_block<2>(csr, T, tile + off, cb, r0, r1, c + off, gT, gw, tsq), off += 2 * VW;
          else bucket_bwd_block<1>(csr, T, tile + off, cb, r0, r1, c + off, gT, gw, tsq), off += VW;
        }
      }
      if (cv < d) bucket_bwd_scalar(csr, T, g, r0, r1, cv, gT, gw, tsq);
    }
#if defined(__AVX__) || defined(__AVX512F__)
    _mm_sfence();  // order the non-temporal stores before the result is used
#endif
  });
  if (sq) {
    *sq = 0.0;
    for (const double v : sq_part) *sq += v;
  }
}

// ------------------------------------------------------------------------------------------------
// Forward driver: hashed rows/w (N, K) -> out (N, d) with the algorithm chosen by shape.
// ------------------------------------------------------------------------------------------------
template <typename TT, typename OT>
static void forward_rows(const int32_t* rows, const float* w, int64_t N, int64_t K, const Table<TT>& T,
                         const float* bias, OT* out, const CSR* csr) {
  const int64_t nt = at::get_num_threads();
  int64_t algo = g_opt.fwd_algo;
  if (algo == 2 && !csr) algo = 1;
  if (algo == 0) algo = (N <= g_opt.small_n * nt) ? 3 : (csr ? 2 : 1);
  const int64_t d = T.d;
  if (algo == 3) {
    // split each token's columns across threads
    const int64_t want = (N * K * d >= g_opt.split_min) ? std::max<int64_t>(1, nt) : 1;
    int64_t seg = ((d + want - 1) / want + VW - 1) / VW * VW;
    seg = std::max<int64_t>(VW, std::min(seg, std::min<int64_t>(g_opt.seg_max, 1024)));
    const int64_t nseg = (d + seg - 1) / seg;
    if (nseg == 1) {
      fwd_segment(rows, w, N, K, T, bias, out, 0, d);  // no parallel region for one item
    } else {
      at::parallel_for(0, nseg, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s)
          fwd_segment(rows, w, N, K, T, bias, out, s * seg, std::min(d, (s + 1) * seg));
      });
    }
  } else if (algo == 2) {
    fwd_bucket_major(*csr, N, T, bias, out);
    const int64_t cv = (d / VW) * VW;
    if (cv < d)
      at::parallel_for(0, N, 64, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n)
          tok_scalar(rows + n * K, w + n * K, K, T, cv, d, bias, out + n * d);
      });
  } else {
    at::parallel_for(0, N, 8, [&](int64_t b, int64_t e) {
      fwd_token_major(rows, w, K, T, bias, out, b, e);
    });
  }
}

// Bucket-major pays a counting sort and an (N, cb) tile; it wins only when the table does not stay in
// the last-level cache (so token-major reads would come from DRAM) and each table row serves several
// tokens (so a row loaded once is reused). Measured on a 2-core AVX2 host (Zen 3, 32 MiB L3), forward,
// fp32: 6-8 MB tables were 1.3-1.6x faster token-major at every N; 34-134 MB tables were 0.73-0.97x
// bucket-major from 4 entries per row, a coin flip at 2 (0.89-1.12x across runs; 1.17x the official
// kernels' time against token-major's 0.96-1.03x at d = 1024, N = 512), and 1.2-3.5x slower at 1 or
// fewer (the tau = 10 Memory Block table at N = 1024 among them): bucket_min_entries 3. On a 2-core
// AVX-512 host (family 26, 1 MiB L2 per core, 32 MiB L3) bucket-major won every interleaved run at 2
// entries per row: 0.74-0.85x token-major at d = 512, 768 and 1024 with N = 512, fp32 (0.67x the
// official kernels' time against 0.91x), and lost at 1.5 for d = 512 (1.3-1.6x): bucket_min_entries 2
// where the build has AVX-512. bf16 and int8 tables convert every element they read, which token-major
// does once per entry and bucket-major once per row: on the AVX-512 host bucket-major took 0.44-0.54x
// token-major's time for bf16 and 0.31-0.99x for int8 at 2 entries per row (d = 512-1024, N = 512),
// and at 1.5 entries 0.61-0.67x (bf16) and 0.41-0.46x (int8); at 1 entry bf16 lost at d = 512 (1.7x):
// bucket_min_half_entries_lowp 3 (1.5 entries) there, the fp32 rule elsewhere.
static bool want_csr(int64_t N, int64_t K, int64_t R, int64_t table_bytes, int64_t elem_bytes) {
  const int64_t nt = at::get_num_threads();
  if (g_opt.fwd_algo == 2) return true;
  if (g_opt.fwd_algo != 0) return false;
  if (N <= g_opt.small_n * nt || N < g_opt.bucket_min_n || table_bytes < g_opt.bucket_min_table_bytes) return false;
  const int64_t half_entries = elem_bytes >= 4 ? 2 * g_opt.bucket_min_entries : g_opt.bucket_min_half_entries_lowp;
  return 2 * N * K >= half_entries * R;  // twice the entries per table row, 2 N K / R
}

static bool want_csr(int64_t N, int64_t K, int64_t R, at::TensorList tables) {
  int64_t bytes = 0, elem = 4;
  for (const auto& t : tables) {
    bytes = std::max<int64_t>(bytes, t.numel() * t.element_size());
    elem = std::min<int64_t>(elem, t.element_size());
  }
  return want_csr(N, K, R, bytes, elem);
}

// ------------------------------------------------------------------------------------------------
// Checks
// ------------------------------------------------------------------------------------------------
static void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "memoryformer kernels run on CPU tensors; got x on ", x.device());
  TORCH_CHECK(x.dim() == 2, "memoryformer kernels expect x of shape (N, K*tau); got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "memoryformer kernels support float32/bfloat16 x; got ", x.scalar_type());
}

static void check_table(const at::Tensor& t, int64_t R) {
  TORCH_CHECK(t.device().is_cpu(), "memoryformer kernels run on CPU tensors; got a table on ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == R, "memoryformer: table must have shape (", R,
              ", out_features); got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "memoryformer kernels support float32/bfloat16 tables; got ", t.scalar_type());
  TORCH_CHECK(R < (int64_t(1) << 31), "memoryformer: table has too many rows for int32 indices");
}

// An undefined or empty (numel 0) bias means "no bias".
static at::Tensor bias_f32(const at::Tensor& b, int64_t d) {
  if (!b.defined() || (b.numel() == 0 && d > 0)) return at::Tensor();
  TORCH_CHECK(b.dim() == 1 && b.size(0) == d, "memoryformer: bias must have shape (", d, ",); got ",
              b.sizes());
  return b.to(at::kFloat).contiguous();
}
static at::Tensor bias_f32(const c10::optional<at::Tensor>& b, int64_t d) {
  return b.has_value() ? bias_f32(*b, d) : at::Tensor();
}

template <typename F>
static void dispatch_x(at::ScalarType st, const F& f) {
  if (st == at::kFloat) f(float{});
  else f(bf16{});
}

// x (N, D) hashed: rows and weights (N, K), and, when `sort`, the entries grouped by table row (CSR).
struct Hashed {
  std::vector<int32_t> rows;
  std::vector<float> w;
  CSR csr;
  bool sorted;
  Hashed(const at::Tensor& x, const HashSpec& hs, int64_t N, int64_t R, bool sort)
      : rows(static_cast<size_t>(N * hs.K)), w(static_cast<size_t>(N * hs.K)), sorted(sort) {
    dispatch_x(x.scalar_type(), [&](auto xt) {
      using XT = decltype(xt);
      hash_all(x.data_ptr<XT>(), hs, N, rows.data(), w.data());
    });
    if (sort) build_csr(rows.data(), w.data(), N, hs.K, R, csr);
  }
};

// ------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------
// Hash once, gather from every table (tables share the hash: Q, K, V).
std::vector<at::Tensor> memory_layer(const at::Tensor& x_, at::TensorList tables, at::TensorList biases,
                                     int64_t tau,
                                     c10::string_view weighting, double temperature) {
  check_x(x_);
  const at::Tensor x = x_.contiguous();
  const HashSpec hs = make_spec(x.size(1), tau, weighting, temperature);
  TORCH_CHECK(biases.size() == tables.size(), "memoryformer: got ", tables.size(), " tables but ",
              biases.size(), " biases (pass an empty tensor for a table without bias)");
  const int64_t N = x.size(0), K = hs.K, R = K << tau;
  std::vector<at::Tensor> outs;
  for (const auto& t : tables) check_table(t, R);
  if (N == 0) {
    for (const auto& t : tables) outs.push_back(at::empty({0, t.size(1)}, t.options()));
    return outs;
  }
  const Hashed hd(x, hs, N, R, want_csr(N, K, R, tables));
  const std::vector<int32_t>& rows = hd.rows;
  const std::vector<float>& w = hd.w;
  const bool use_csr = hd.sorted;
  const CSR& csr = hd.csr;
  for (size_t i = 0; i < tables.size(); ++i) {
    const at::Tensor t = tables[i].contiguous();
    maybe_hugepages(t);
    const int64_t d = t.size(1);
    const at::Tensor b = bias_f32(biases[i], d);
    at::Tensor out = at::empty({N, d}, t.options());
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    if (t.scalar_type() == at::kFloat) {
      Table<float> T{t.data_ptr<float>(), nullptr, R, d};
      forward_rows(rows.data(), w.data(), N, K, T, bp, out.data_ptr<float>(), use_csr ? &csr : nullptr);
    } else {
      Table<bf16> T{t.data_ptr<bf16>(), nullptr, R, d};
      forward_rows(rows.data(), w.data(), N, K, T, bp, out.data_ptr<bf16>(), use_csr ? &csr : nullptr);
    }
    outs.push_back(out);
  }
  return outs;
}

// int8 tables with per-row fp32 scales (inference): out float32.
at::Tensor memory_layer_q8(const at::Tensor& x_, const at::Tensor& qtable_, const at::Tensor& scales_,
                           const c10::optional<at::Tensor>& bias, int64_t tau, c10::string_view weighting,
                           double temperature) {
  check_x(x_);
  const at::Tensor x = x_.contiguous();
  const HashSpec hs = make_spec(x.size(1), tau, weighting, temperature);
  const int64_t N = x.size(0), K = hs.K, R = K << tau;
  TORCH_CHECK(qtable_.scalar_type() == at::kChar && qtable_.dim() == 2 && qtable_.size(0) == R,
              "memoryformer: int8 table must be int8 of shape (", R, ", out_features); got ",
              qtable_.scalar_type(), " ", qtable_.sizes());
  TORCH_CHECK(scales_.dim() == 1 && scales_.size(0) == R, "memoryformer: scales must have shape (", R,
              ",); got ", scales_.sizes());
  const at::Tensor qt = qtable_.contiguous();
  maybe_hugepages(qt);
  const at::Tensor sc = scales_.to(at::kFloat).contiguous();
  const int64_t d = qt.size(1);
  const at::Tensor b = bias_f32(bias, d);
  at::Tensor out = at::empty({N, d}, x.options().dtype(at::kFloat));
  if (N == 0) return out;
  const Hashed hd(x, hs, N, R, want_csr(N, K, R, qt.numel(), 1));
  const std::vector<int32_t>& rows = hd.rows;
  const std::vector<float>& w = hd.w;
  const bool use_csr = hd.sorted;
  const CSR& csr = hd.csr;
  Table<int8_t> T{qt.data_ptr<int8_t>(), sc.data_ptr<float>(), R, d};
  forward_rows(rows.data(), w.data(), N, K, T, b.defined() ? b.data_ptr<float>() : nullptr,
               out.data_ptr<float>(), use_csr ? &csr : nullptr);
  return out;
}

// Backward of memory_layer: grad_x (or empty), one grad per table (or empty), and (tables,) float64
// squared 2-norms of the fp32 table grads as written (-1 for a bf16 table; empty without them).
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> memory_layer_backward(
    at::TensorList grads, const at::Tensor& x_, at::TensorList tables, int64_t tau,
    c10::string_view weighting, double temperature, bool need_x, bool need_tables) {
  check_x(x_);
  const at::Tensor x = x_.contiguous();
  const HashSpec hs = make_spec(x.size(1), tau, weighting, temperature);
  const int64_t N = x.size(0), K = hs.K, R = K << tau;
  TORCH_CHECK(grads.size() == tables.size(), "memoryformer: got ", grads.size(), " grads for ",
              tables.size(), " tables");
  std::vector<at::Tensor> gtables;
  for (size_t i = 0; i < tables.size(); ++i) {
    check_table(tables[i], R);
    TORCH_CHECK(grads[i].dim() == 2 && grads[i].size(0) == N && grads[i].size(1) == tables[i].size(1),
                "memoryformer: grad ", i, " must have shape (", N, ", ", tables[i].size(1), "); got ",
                grads[i].sizes());
    if (need_tables) gtables.push_back(at::empty_like(tables[i], at::MemoryFormat::Contiguous));
    else gtables.push_back(at::empty({0}, tables[i].options()));
  }
  at::Tensor gx = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor sqnorms = at::full({need_tables ? static_cast<int64_t>(tables.size()) : 0}, -1.0,
                                x.options().dtype(at::kDouble));
  if (N == 0) {
    for (auto& g : gtables) g.zero_();
    if (need_tables) sqnorms.zero_();
    return {gx, gtables, sqnorms};
  }
  const Hashed hd(x, hs, N, R, true);
  const std::vector<int32_t>& rows = hd.rows;
  const std::vector<float>& w = hd.w;
  const CSR& csr = hd.csr;
  std::vector<float> gwT(need_x ? static_cast<size_t>(N * K) : 0, 0.f);  // (K, N)
  for (size_t i = 0; i < tables.size(); ++i) {
    const at::Tensor t = tables[i].contiguous();
    maybe_hugepages(t);
    const at::Tensor g = grads[i].to(at::kFloat).contiguous();
    float* gwp = need_x ? gwT.data() : nullptr;
    if (t.scalar_type() == at::kFloat) {
      Table<float> T{t.data_ptr<float>(), nullptr, R, t.size(1)};
      bwd_bucket_major(csr, N, T, g.data_ptr<float>(), need_tables ? gtables[i].data_ptr<float>() : nullptr, gwp,
                       need_tables && g_opt.grad_sqnorm ? sqnorms.data_ptr<double>() + i : nullptr);
    } else {
      Table<bf16> T{t.data_ptr<bf16>(), nullptr, R, t.size(1)};
      bwd_bucket_major(csr, N, T, g.data_ptr<float>(), need_tables ? gtables[i].data_ptr<bf16>() : nullptr, gwp);
    }
  }
  if (need_x) {
    std::vector<float> gw(static_cast<size_t>(N * K));
    transpose_kn(gwT.data(), K, N, gw.data());
    dispatch_x(x.scalar_type(), [&](auto xt) {
      using XT = decltype(xt);
      const XT* xp = x.data_ptr<XT>();
      XT* gxp = gx.data_ptr<XT>();
      at::parallel_for(0, N, std::max<int64_t>(1, 4096 / hs.D), [&](int64_t b, int64_t e) {
        std::vector<float> scratch(hs.D);
        for (int64_t n = b; n < e; ++n)
          hash_token_backward(xp + n * hs.D, hs, gw.data() + n * K, scratch.data(), gxp + n * hs.D);
      });
    });
  }
  return {gx, gtables, sqnorms};
}

// rows (N, K) int64/int32 -> validated int32 copy.
static std::vector<int32_t> rows_i32(const at::Tensor& rows, int64_t R) {
  const at::Tensor r = rows.contiguous();
  std::vector<int32_t> out(static_cast<size_t>(r.numel()));
  bool bad = false;
  if (r.scalar_type() == at::kLong) {
    const int64_t* p = r.data_ptr<int64_t>();
    for (int64_t i = 0; i < r.numel(); ++i) {
      bad |= (p[i] < 0) | (p[i] >= R);
      out[i] = static_cast<int32_t>(p[i]);
    }
  } else {
    TORCH_CHECK(r.scalar_type() == at::kInt, "memoryformer: rows must be int64 or int32; got ", r.scalar_type());
    const int32_t* p = r.data_ptr<int32_t>();
    for (int64_t i = 0; i < r.numel(); ++i) {
      bad |= (p[i] < 0) | (p[i] >= R);
      out[i] = p[i];
    }
  }
  TORCH_CHECK(!bad, "memoryformer: rows must lie in [0, ", R, ") (the table's row count)");
  return out;
}

static void check_rows_weights(const at::Tensor& rows, const at::Tensor& weights) {
  TORCH_CHECK(rows.dim() == 2 && weights.sizes() == rows.sizes(),
              "memoryformer: rows and weights must both be (N, K); got ", rows.sizes(), " and ",
              weights.sizes());
  TORCH_CHECK(rows.device().is_cpu() && weights.device().is_cpu(), "memoryformer kernels run on CPU tensors");
  TORCH_CHECK(weights.is_floating_point(), "memoryformer: weights must be floating point");
}

// out = sum_k weights[n,k] table[rows[n,k]] + bias, for precomputed (shared) hashes.
at::Tensor gather_sum(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& table_,
                      const c10::optional<at::Tensor>& bias) {
  check_rows_weights(rows, weights);
  TORCH_CHECK(table_.dim() == 2, "memoryformer: table must be 2-D; got ", table_.sizes());
  check_table(table_, table_.size(0));
  const int64_t N = rows.size(0), K = rows.size(1), R = table_.size(0), d = table_.size(1);
  const at::Tensor t = table_.contiguous();
  maybe_hugepages(t);
  const at::Tensor b = bias_f32(bias, d);
  at::Tensor out = at::empty({N, d}, t.options());
  if (N == 0 || K == 0) {
    out.zero_();
    if (b.defined()) out.add_(b.to(out.scalar_type()));
    return out;
  }
  const std::vector<int32_t> r = rows_i32(rows, R);
  const at::Tensor wt = weights.to(at::kFloat).contiguous();
  const float* w = wt.data_ptr<float>();
  CSR csr;
  const bool use_csr = want_csr(N, K, R, t.numel() * t.element_size(), t.element_size());
  if (use_csr) build_csr(r.data(), w, N, K, R, csr);
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (t.scalar_type() == at::kFloat) {
    Table<float> T{t.data_ptr<float>(), nullptr, R, d};
    forward_rows(r.data(), w, N, K, T, bp, out.data_ptr<float>(), use_csr ? &csr : nullptr);
  } else {
    Table<bf16> T{t.data_ptr<bf16>(), nullptr, R, d};
    forward_rows(r.data(), w, N, K, T, bp, out.data_ptr<bf16>(), use_csr ? &csr : nullptr);
  }
  return out;
}

// Backward of gather_sum: (grad_weights (N, K) or empty, grad_table (R, d) or empty).
std::tuple<at::Tensor, at::Tensor> gather_sum_backward(const at::Tensor& grad, const at::Tensor& rows,
                                                       const at::Tensor& weights, const at::Tensor& table_,
                                                       bool need_weights, bool need_table) {
  check_rows_weights(rows, weights);
  check_table(table_, table_.size(0));
  const int64_t N = rows.size(0), K = rows.size(1), R = table_.size(0), d = table_.size(1);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == N && grad.size(1) == d, "memoryformer: grad must be (",
              N, ", ", d, "); got ", grad.sizes());
  const at::Tensor t = table_.contiguous();
  maybe_hugepages(t);
  at::Tensor gT = need_table ? at::empty_like(t) : at::empty({0}, t.options());
  at::Tensor gw = need_weights ? at::zeros({N, K}, weights.options().dtype(at::kFloat))
                               : at::empty({0}, weights.options());
  std::vector<float> gwT(need_weights ? static_cast<size_t>(N * K) : 0, 0.f);  // (K, N)
  if (N == 0 || K == 0) {
    if (need_table) gT.zero_();
    return {need_weights ? gw.to(weights.scalar_type()) : gw, gT};
  }
  const std::vector<int32_t> r = rows_i32(rows, R);
  const at::Tensor wt = weights.to(at::kFloat).contiguous();
  CSR csr;
  build_csr(r.data(), wt.data_ptr<float>(), N, K, R, csr);
  const at::Tensor g = grad.to(at::kFloat).contiguous();
  float* gwp = need_weights ? gwT.data() : nullptr;
  if (t.scalar_type() == at::kFloat) {
    Table<float> T{t.data_ptr<float>(), nullptr, R, d};
    bwd_bucket_major(csr, N, T, g.data_ptr<float>(), need_table ? gT.data_ptr<float>() : nullptr, gwp);
  } else {
    Table<bf16> T{t.data_ptr<bf16>(), nullptr, R, d};
    bwd_bucket_major(csr, N, T, g.data_ptr<float>(), need_table ? gT.data_ptr<bf16>() : nullptr, gwp);
  }
  if (need_weights) transpose_kn(gwT.data(), K, N, gw.data_ptr<float>());
  return {need_weights ? gw.to(weights.scalar_type()) : gw, gT};
}

// Hash only: weights (N, K) in x's dtype and rows (N, K) int64 (weights first: a float output
// first keeps torch.library.opcheck's autograd check happy).
std::tuple<at::Tensor, at::Tensor> hash(const at::Tensor& x_, int64_t tau, c10::string_view weighting,
                                        double temperature) {
  check_x(x_);
  const at::Tensor x = x_.contiguous();
  const HashSpec hs = make_spec(x.size(1), tau, weighting, temperature);
  const int64_t N = x.size(0), K = hs.K;
  at::Tensor rows32 = at::empty({N, K}, x.options().dtype(at::kInt));
  at::Tensor w = at::empty({N, K}, x.options().dtype(at::kFloat));
  if (N > 0)
    dispatch_x(x.scalar_type(), [&](auto xt) {
      using XT = decltype(xt);
      hash_all(x.data_ptr<XT>(), hs, N, rows32.data_ptr<int32_t>(), w.data_ptr<float>());
    });
  return {w.to(x.scalar_type()), rows32.to(at::kLong)};
}

at::Tensor hash_backward(const at::Tensor& grad_w, const at::Tensor& x_, int64_t tau,
                         c10::string_view weighting, double temperature) {
  check_x(x_);
  const at::Tensor x = x_.contiguous();
  const HashSpec hs = make_spec(x.size(1), tau, weighting, temperature);
  const int64_t N = x.size(0), K = hs.K;
  TORCH_CHECK(grad_w.dim() == 2 && grad_w.size(0) == N && grad_w.size(1) == K,
              "memoryformer: grad of weights must be (", N, ", ", K, "); got ", grad_w.sizes());
  const at::Tensor g = grad_w.to(at::kFloat).contiguous();
  at::Tensor gx = at::empty_like(x);
  if (N == 0) return gx;
  dispatch_x(x.scalar_type(), [&](auto xt) {
    using XT = decltype(xt);
    const XT* xp = x.data_ptr<XT>();
    XT* gxp = gx.data_ptr<XT>();
    const float* gp = g.data_ptr<float>();
    at::parallel_for(0, N, std::max<int64_t>(1, 4096 / hs.D), [&](int64_t b, int64_t e) {
      std::vector<float> scratch(hs.D);
      for (int64_t n = b; n < e; ++n) hash_token_backward(xp + n * hs.D, hs, gp + n * K, scratch.data(), gxp + n * hs.D);
    });
  });
  return gx;
}

}  // namespace mf

TORCH_LIBRARY(memoryformer, m) {
  // biases: one per table; an empty tensor (numel 0) means no bias (Tensor?[] would hide the
  // defined ones from autograd's tensor-list support)
  m.def("memory_layer(Tensor x, Tensor[] tables, Tensor[] biases, int tau, str weighting, "
        "float temperature) -> Tensor[]");
  m.def("memory_layer_backward(Tensor[] grads, Tensor x, Tensor[] tables, int tau, str weighting, "
        "float temperature, bool need_x, bool need_tables) -> (Tensor, Tensor[], Tensor)");
  m.def("memory_layer_q8(Tensor x, Tensor qtable, Tensor scales, Tensor? bias, int tau, str weighting, "
        "float temperature) -> Tensor");
  m.def("gather_sum(Tensor rows, Tensor weights, Tensor table, Tensor? bias) -> Tensor");
  m.def("gather_sum_backward(Tensor grad, Tensor rows, Tensor weights, Tensor table, bool need_weights, "
        "bool need_table) -> (Tensor, Tensor)");
  m.def("hash(Tensor x, int tau, str weighting, float temperature) -> (Tensor weights, Tensor rows)");
  m.def("hash_backward(Tensor grad_weights, Tensor x, int tau, str weighting, float temperature) -> Tensor");
  // Inference twins (no autograd formula, so no Python autograd wrapper on the call path: about
  // 10-30 us less per call at decode). Used only when no gradient is needed.
  m.def("memory_layer_infer(Tensor x, Tensor[] tables, Tensor[] biases, int tau, str weighting, "
        "float temperature) -> Tensor[]");
  m.def("gather_sum_infer(Tensor rows, Tensor weights, Tensor table, Tensor? bias) -> Tensor");
  m.def("hash_infer(Tensor x, int tau, str weighting, float temperature) -> (Tensor weights, Tensor rows)");
  m.def("_set_option(str name, int value) -> int", &mf::set_option);
}

TORCH_LIBRARY_IMPL(memoryformer, CPU, m) {
  m.impl("memory_layer", &mf::memory_layer);
  m.impl("memory_layer_backward", &mf::memory_layer_backward);
  m.impl("memory_layer_q8", &mf::memory_layer_q8);
  m.impl("gather_sum", &mf::gather_sum);
  m.impl("gather_sum_backward", &mf::gather_sum_backward);
  m.impl("hash", &mf::hash);
  m.impl("hash_backward", &mf::hash_backward);
  m.impl("memory_layer_infer", &mf::memory_layer);
  m.impl("gather_sum_infer", &mf::gather_sum);
  m.impl("hash_infer", &mf::hash);
}
