// One MemoryFormer block for one decoding step, fused into a single op (float32, CPU).
//
// The eager block (memoryformer/model.py, MemoryFormerBlock) runs about 60 small PyTorch ops per
// token; at batch 1 their dispatch costs more than the few table rows they read. This op does the
// same math in four parallel phases:
//   1. RMSNorm, the shared hash, and the Q/K/V gathers (column segments of each table across threads)
//   2. per (token, head): rotary on q and k, write k and v into the KV cache at `pos`, attention
//      over positions [0, pos]
//   3. residual, RMSNorm, hash, ML1 gather
//   4. LayerNorm, [GeLU], hash with tau + e bits, ML2 gather, residual
//
// x (B, d) is the block input of B sequences at position `pos`; k_cache and v_cache
// (B, H, max_len, Dh) are written at `pos`. `params` holds the block's tensors in DecodeSlot order
// (an empty tensor = no bias); `scales` is empty or holds the (R,) per-row scales of the int8 tables in
// ScaleSlot order (an empty tensor for a table that is not int8). Tables may be float32, bfloat16 or
// int8; sums are float32. Returns the block output (B, d).
//
// decode_blocks runs every block of a model in turn, then the final RMSNorm, in one call.
//
// The Python side names the same slots: memoryformer.kernels.DecodeWeights and DecodeScales (the
// field order must match these enums; tests/test_decode_kernel.py compares them).

#include "memory_common.h"

namespace mf {

namespace {

// The positions of the block's tensors in `params`.
enum DecodeSlot : int {
  ATTN_NORM_W,  // (d) RMSNorm before attention
  Q_TABLE, Q_BIAS, K_TABLE, K_BIAS, V_TABLE, V_BIAS,  // (K1*2^tau, d), (d); a bias follows its table
  MLP_NORM_W,  // (d) RMSNorm before the Memory Block
  ML1_TABLE, ML1_BIAS,  // (K1*2^tau, hidden), (hidden)
  LN_W, LN_B,  // (hidden) the Memory Block's LayerNorm
  ML2_TABLE, ML2_BIAS,  // (K2*2^tau2, d), (d)
  NUM_DECODE_SLOTS
};

// The positions of the int8 tables' scales in `scales`.
enum ScaleSlot : int { SCALE_Q, SCALE_K, SCALE_V, SCALE_ML1, SCALE_ML2, NUM_SCALE_SLOTS };

// One gather job: out (N, d) = bias + sum_k w[n,k] scale[row] table[rows[n,k]], the table float32,
// bfloat16, or int8 with per-row scales.
struct GatherJob {
  const int32_t* rows;
  const float* w;
  int64_t K;
  const at::Tensor* table;
  const float* scales;  // int8 only
  const float* bias;
  float* out;
};

void gather_segment(const GatherJob& g, int64_t N, int64_t c0, int64_t c1) {
  const int64_t R = g.table->size(0), d = g.table->size(1);
  switch (g.table->scalar_type()) {
    case at::kFloat:
      fwd_segment(g.rows, g.w, N, g.K, Table<float>{g.table->data_ptr<float>(), nullptr, R, d}, g.bias, g.out, c0, c1);
      break;
    case at::kBFloat16:
      fwd_segment(g.rows, g.w, N, g.K, Table<bf16>{g.table->data_ptr<bf16>(), nullptr, R, d}, g.bias, g.out, c0, c1);
      break;
    default:
      fwd_segment(g.rows, g.w, N, g.K, Table<int8_t>{g.table->data_ptr<int8_t>(), g.scales, R, d}, g.bias, g.out,
                  c0, c1);
  }
}

// Run the jobs with each table's columns split into segments across threads (all N tokens per item).
void run_gathers(const std::vector<GatherJob>& jobs, int64_t N) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::pair<int64_t, int64_t>> items;  // (job, segment start column)
  std::vector<int64_t> seg(jobs.size());
  for (size_t j = 0; j < jobs.size(); ++j) {
    const int64_t d = jobs[j].table->size(1);
    int64_t s = ((d + nt - 1) / nt + VW - 1) / VW * VW;
    seg[j] = std::max<int64_t>(VW, std::min<int64_t>(s, 1024));
    for (int64_t c = 0; c < d; c += seg[j]) items.emplace_back(static_cast<int64_t>(j), c);
  }
  auto run = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const GatherJob& g = jobs[items[i].first];
      const int64_t c0 = items[i].second, c1 = std::min(g.table->size(1), c0 + seg[items[i].first]);
      gather_segment(g, N, c0, c1);
    }
  };
  const int64_t n = static_cast<int64_t>(items.size());
  if (nt == 1 || n == 1) run(0, n);
  else at::parallel_for(0, n, 1, run);
}

// GPT-NeoX RMSNorm: w * x / (sqrt(mean(x^2)) + eps).
void rms_norm(const float* x, const float* w, int64_t d, float eps, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = 1.0f / (static_cast<float>(std::sqrt(ss / d)) + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = w[i] * (x[i] * inv);
}

// nn.LayerNorm (biased variance) then optional exact GeLU, in place.
void layer_norm_act(float* x, const float* w, const float* b, int64_t d, float eps, bool gelu) {
  double s = 0.0;
  for (int64_t i = 0; i < d; ++i) s += x[i];
  const double mean = s / d;
  double v = 0.0;
  for (int64_t i = 0; i < d; ++i) v += (x[i] - mean) * (x[i] - mean);
  const float inv = static_cast<float>(1.0 / std::sqrt(v / d + eps));
  const float m = static_cast<float>(mean);
  for (int64_t i = 0; i < d; ++i) {
    float y = (x[i] - m) * inv * w[i] + b[i];
    if (gelu) y = 0.5f * y * (1.0f + std::erf(y * 0.70710678118654752f));
    x[i] = y;
  }
}

// GPT-NeoX rotary on the first `rot` dims of one head vector (half-split rule), in place.
void rotary(float* x, const float* cos, const float* sin, int64_t rot) {
  const int64_t half = rot / 2;
  float tmp[1024];
  for (int64_t i = 0; i < rot; ++i) tmp[i] = x[i];
  for (int64_t i = 0; i < rot; ++i) {
    const float r = i < half ? -tmp[i + half] : tmp[i - half];
    x[i] = tmp[i] * cos[i] + r * sin[i];
  }
}

// <a, b> over n floats, vectorised with two accumulators.
inline float dot(const float* a, const float* b, int64_t n) {
  vf acc0 = vf{} + 0.f, acc1 = vf{} + 0.f;
  int64_t j = 0;
  for (; j + 2 * VW <= n; j += 2 * VW) {
    acc0 += vload(a + j) * vload(b + j);
    acc1 += vload(a + j + VW) * vload(b + j + VW);
  }
  for (; j + VW <= n; j += VW) acc0 += vload(a + j) * vload(b + j);
  float s = hsum(acc0 + acc1);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// Scores of one query against S keys, Dh = NV * VW: four keys at a time (four independent FMA chains).
template <int NV>
void scores_fixed(const float* q, const float* keys, int64_t S, float scale, float* scores) {
  vf qv[NV];
  for (int v = 0; v < NV; ++v) qv[v] = vload(q + v * VW);
  constexpr int64_t Dh = NV * VW;
  int64_t s = 0;
  for (; s + 4 <= S; s += 4) {
    vf a0 = vf{} + 0.f, a1 = a0, a2 = a0, a3 = a0;
    const float* k = keys + s * Dh;
    for (int v = 0; v < NV; ++v) {
      a0 += qv[v] * vload(k + v * VW);
      a1 += qv[v] * vload(k + Dh + v * VW);
      a2 += qv[v] * vload(k + 2 * Dh + v * VW);
      a3 += qv[v] * vload(k + 3 * Dh + v * VW);
    }
    scores[s] = hsum(a0) * scale;
    scores[s + 1] = hsum(a1) * scale;
    scores[s + 2] = hsum(a2) * scale;
    scores[s + 3] = hsum(a3) * scale;
  }
  for (; s < S; ++s) {
    vf a = vf{} + 0.f;
    for (int v = 0; v < NV; ++v) a += qv[v] * vload(keys + s * Dh + v * VW);
    scores[s] = hsum(a) * scale;
  }
}

// out (Dh) = sum_s p[s] values[s], Dh = NV * VW, the accumulators in registers.
template <int NV>
void weighted_values_fixed(const float* p, const float* values, int64_t S, float* out) {
  vf acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = vf{} + 0.f;
  for (int64_t s = 0; s < S; ++s) {
    const float ps = p[s];
    const float* row = values + s * NV * VW;
    for (int v = 0; v < NV; ++v) acc[v] += ps * vload(row + v * VW);
  }
  for (int v = 0; v < NV; ++v) vstore(out + v * VW, acc[v]);
}

// Softmax attention of one query q (Dh) over S cached keys/values (S, Dh) -> out (Dh).
void attend_one(const float* q, const float* keys, const float* values, int64_t S, int64_t Dh, float* out,
                std::vector<float>& scores) {
  scores.resize(static_cast<size_t>(S));
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  const int64_t nv = Dh % VW == 0 ? Dh / VW : 0;
  switch (nv) {  // head sizes that are whole vectors take the register-blocked kernels
    case 2: scores_fixed<2>(q, keys, S, scale, scores.data()); break;
    case 4: scores_fixed<4>(q, keys, S, scale, scores.data()); break;
    case 8: scores_fixed<8>(q, keys, S, scale, scores.data()); break;
    case 16: scores_fixed<16>(q, keys, S, scale, scores.data()); break;
    default:
      for (int64_t s = 0; s < S; ++s) scores[s] = dot(q, keys + s * Dh, Dh) * scale;
  }
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) mx = std::max(mx, scores[s]);
  float total = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    scores[s] = std::exp(scores[s] - mx);
    total += scores[s];
  }
  const float inv = 1.0f / total;
  for (int64_t s = 0; s < S; ++s) scores[s] *= inv;
  switch (nv) {
    case 2: return weighted_values_fixed<2>(scores.data(), values, S, out);
    case 4: return weighted_values_fixed<4>(scores.data(), values, S, out);
    case 8: return weighted_values_fixed<8>(scores.data(), values, S, out);
    case 16: return weighted_values_fixed<16>(scores.data(), values, S, out);
    default:
      for (int64_t j = 0; j < Dh; ++j) out[j] = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        const float* v = values + s * Dh;
        for (int64_t j = 0; j < Dh; ++j) out[j] += scores[s] * v[j];
      }
  }
}

const float* ptr_or_null(const at::Tensor& t) { return t.numel() > 0 ? t.data_ptr<float>() : nullptr; }
const float* ptr_or_null(at::TensorList ts, size_t i) { return ts.empty() ? nullptr : ptr_or_null(ts[i]); }

void check_f32(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "memoryformer::decode_block: ", name, " must be a contiguous float32 CPU tensor; got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes().equals(shape), "memoryformer::decode_block: ", name, " must have shape ",
              at::IntArrayRef(shape), "; got ", t.sizes());
}

// A table: float32, bfloat16, or int8 with (R,) float32 scales (an empty scales tensor: none).
void check_table(const at::Tensor& t, const at::Tensor& scales, const char* name, int64_t R, int64_t d) {
  const auto st = t.scalar_type();
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && (st == at::kFloat || st == at::kBFloat16 || st == at::kChar),
              "memoryformer::decode_block: ", name, " must be a contiguous float32, bfloat16 or int8 CPU tensor; got ",
              st, " on ", t.device());
  TORCH_CHECK(t.sizes().equals({R, d}), "memoryformer::decode_block: ", name, " must have shape ",
              at::IntArrayRef({R, d}), "; got ", t.sizes());
  const bool scaled = scales.defined() && scales.numel() > 0;
  if (st == at::kChar) {
    TORCH_CHECK(scaled, "memoryformer::decode_block: int8 ", name, " needs per-row scales");
    check_f32(scales, "scales", {R});
  } else {
    TORCH_CHECK(!scaled, "memoryformer::decode_block: scales are for int8 tables only (", name, ")");
  }
}

void check_bias(const at::Tensor& t, const char* name, int64_t d) {
  if (t.numel() == 0) return;
  check_f32(t, name, {d});
}

// The block's sizes, from x and the tables, once every input is checked.
struct DecodeDims {
  int64_t B, d, H, Dh, L, rot, hidden;
  HashSpec hs, hs2;  // the hash of the d-wide inputs (tau) and of the hidden layer (tau2)
};

// Check every input of decode_block (counts, dtypes, shapes, position) and return the sizes.
DecodeDims check_decode_inputs(const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               int64_t pos, const at::Tensor& cosf, const at::Tensor& sinf, at::TensorList params,
                               at::TensorList scales, int64_t n_heads, int64_t tau, int64_t tau2,
                               c10::string_view weighting, double temperature) {
  TORCH_CHECK(params.size() == NUM_DECODE_SLOTS, "memoryformer::decode_block: expected ", int(NUM_DECODE_SLOTS),
              " parameter tensors, got ", params.size());
  TORCH_CHECK(scales.empty() || scales.size() == NUM_SCALE_SLOTS, "memoryformer::decode_block: expected no "
              "scales or 5 (q, k, v, ml1, ml2; empty tensors for tables that are not int8), got ", scales.size());
  TORCH_CHECK(x.dim() == 2, "memoryformer::decode_block: x must be (batch, d_model); got ", x.sizes());
  DecodeDims m{};
  m.B = x.size(0), m.d = x.size(1);
  check_f32(x, "x", {m.B, m.d});
  TORCH_CHECK(n_heads > 0 && m.d % n_heads == 0, "memoryformer::decode_block: d_model=", m.d,
              " is not divisible by n_heads=", n_heads);
  m.H = n_heads, m.Dh = m.d / n_heads;
  TORCH_CHECK(k_cache.dim() == 4, "memoryformer::decode_block: k_cache must be (B, H, max_len, Dh)");
  m.L = k_cache.size(2);
  check_f32(k_cache, "k_cache", {m.B, m.H, m.L, m.Dh});
  check_f32(v_cache, "v_cache", {m.B, m.H, m.L, m.Dh});
  TORCH_CHECK(pos >= 0 && pos < m.L, "memoryformer::decode_block: position ", pos, " is outside the cache of ",
              m.L, " positions");
  m.rot = cosf.numel();
  TORCH_CHECK(m.rot <= m.Dh && m.rot <= 1024 && m.rot % 2 == 0 && sinf.numel() == m.rot,
              "memoryformer::decode_block: cos and sin must hold the same even number (<= head_dim, <= 1024) "
              "of rotary dims; got ", m.rot, " and ", sinf.numel());
  check_f32(cosf, "cos", {m.rot});
  check_f32(sinf, "sin", {m.rot});
  const at::Tensor& ml1 = params[ML1_TABLE];
  TORCH_CHECK(ml1.dim() == 2, "memoryformer::decode_block: ml1_table must be 2-D");
  m.hidden = ml1.size(1);
  m.hs = make_spec(m.d, tau, weighting, temperature);
  m.hs2 = make_spec(m.hidden, tau2, weighting, temperature);
  return m;
}

// Check the weights against the sizes (DecodeSlot order; biases may be empty).
void check_decode_weights(const DecodeDims& m, at::TensorList params, at::TensorList scales) {
  const at::Tensor none;
  auto scale_of = [&](int i) -> const at::Tensor& { return scales.empty() ? none : scales[i]; };
  const int64_t R = m.hs.K << m.hs.tau, R2 = m.hs2.K << m.hs2.tau;
  check_f32(params[ATTN_NORM_W], "attn_norm_w", {m.d});
  const int tables[3] = {Q_TABLE, K_TABLE, V_TABLE};
  for (int i = 0; i < 3; ++i) {
    check_table(params[tables[i]], scale_of(SCALE_Q + i), "q/k/v table", R, m.d);
    check_bias(params[tables[i] + 1], "q/k/v bias", m.d);  // each bias follows its table
  }
  check_f32(params[MLP_NORM_W], "mlp_norm_w", {m.d});
  check_table(params[ML1_TABLE], scale_of(SCALE_ML1), "ml1_table", R, m.hidden);
  check_bias(params[ML1_BIAS], "ml1_bias", m.hidden);
  check_f32(params[LN_W], "ln_w", {m.hidden});
  check_f32(params[LN_B], "ln_b", {m.hidden});
  check_table(params[ML2_TABLE], scale_of(SCALE_ML2), "ml2_table", R2, m.d);
  check_bias(params[ML2_BIAS], "ml2_bias", m.d);
}

// One gather job of a (table, bias) pair in DecodeSlot order.
GatherJob job(at::TensorList params, at::TensorList scales, int table, int scale, const int32_t* rows,
              const float* w, int64_t K, float* out) {
  return {rows, w, K, &params[table], ptr_or_null(scales, scale), ptr_or_null(params[table + 1]), out};
}

// Phase 2: per (token, head) rotary on q and k, the cache write at `pos`, attention over [0, pos] -> out.
void attend_all(const DecodeDims& m, float* q, float* k, const float* v, float* kc, float* vc, int64_t pos,
                const float* cp, const float* sp, float* out) {
  const int64_t H = m.H, Dh = m.Dh, L = m.L, d = m.d, S = pos + 1;
  auto attend = [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      float* qh = q + b * d + h * Dh;
      float* kh = k + b * d + h * Dh;
      rotary(qh, cp, sp, m.rot);
      rotary(kh, cp, sp, m.rot);
      float* kbase = kc + (b * H + h) * L * Dh;
      float* vbase = vc + (b * H + h) * L * Dh;
      std::memcpy(kbase + pos * Dh, kh, Dh * sizeof(float));
      std::memcpy(vbase + pos * Dh, v + b * d + h * Dh, Dh * sizeof(float));
      attend_one(qh, kbase, vbase, S, Dh, out + b * d + h * Dh, scores);
    }
  };
  if (m.B * H * S * Dh < 32768) attend(0, m.B * H);
  else at::parallel_for(0, m.B * H, 1, attend);
}

}  // namespace

at::Tensor decode_block(const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t pos,
                        const at::Tensor& cos_, const at::Tensor& sin_, at::TensorList params,
                        at::TensorList scales, double rms_eps,
                        double ln_eps, int64_t n_heads, int64_t tau, int64_t tau2, c10::string_view weighting,
                        double temperature, bool gelu) {
  const at::Tensor cosf = cos_.reshape({-1}), sinf = sin_.reshape({-1});
  const DecodeDims m = check_decode_inputs(x, k_cache, v_cache, pos, cosf, sinf, params, scales, n_heads, tau,
                                           tau2, weighting, temperature);
  check_decode_weights(m, params, scales);
  const int64_t B = m.B, d = m.d, hidden = m.hidden;
  const HashSpec &hs = m.hs, &hs2 = m.hs2;
  const float eps = static_cast<float>(rms_eps);
  const float* xp = x.data_ptr<float>();
  at::Tensor y = at::empty({B, d}, x.options());
  float* yp = y.data_ptr<float>();
  // scratch: normed input / attention output (B, d), q k v (B, d) each, hidden (B, hidden)
  std::vector<float> a(B * d), q(B * d), k(B * d), v(B * d), u(B * hidden), e(std::max(d, hidden));
  std::vector<int32_t> rows(B * std::max(hs.K, hs2.K));
  std::vector<float> w(B * std::max(hs.K, hs2.K));

  // 1. RMSNorm, one hash, Q/K/V
  for (int64_t b = 0; b < B; ++b) {
    rms_norm(xp + b * d, params[ATTN_NORM_W].data_ptr<float>(), d, eps, a.data() + b * d);
    hash_token(a.data() + b * d, hs, e.data(), rows.data() + b * hs.K, w.data() + b * hs.K);
  }
  run_gathers({job(params, scales, Q_TABLE, SCALE_Q, rows.data(), w.data(), hs.K, q.data()),
               job(params, scales, K_TABLE, SCALE_K, rows.data(), w.data(), hs.K, k.data()),
               job(params, scales, V_TABLE, SCALE_V, rows.data(), w.data(), hs.K, v.data())}, B);

  // 2. rotary, cache write, attention per (token, head); the output overwrites `a`
  attend_all(m, q.data(), k.data(), v.data(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), pos,
             cosf.data_ptr<float>(), sinf.data_ptr<float>(), a.data());

  // 3. residual h = x + attn (kept in y), RMSNorm, hash, ML1
  for (int64_t b = 0; b < B; ++b) {
    float* hb = yp + b * d;
    for (int64_t i = 0; i < d; ++i) hb[i] = xp[b * d + i] + a[b * d + i];
    rms_norm(hb, params[MLP_NORM_W].data_ptr<float>(), d, eps, a.data() + b * d);
    hash_token(a.data() + b * d, hs, e.data(), rows.data() + b * hs.K, w.data() + b * hs.K);
  }
  run_gathers({job(params, scales, ML1_TABLE, SCALE_ML1, rows.data(), w.data(), hs.K, u.data())}, B);

  // 4. LayerNorm, [GeLU], hash with tau2 bits, ML2 into `a`, residual
  for (int64_t b = 0; b < B; ++b) {
    float* ub = u.data() + b * hidden;
    layer_norm_act(ub, params[LN_W].data_ptr<float>(), params[LN_B].data_ptr<float>(), hidden,
                   static_cast<float>(ln_eps), gelu);
    hash_token(ub, hs2, e.data(), rows.data() + b * hs2.K, w.data() + b * hs2.K);
  }
  run_gathers({job(params, scales, ML2_TABLE, SCALE_ML2, rows.data(), w.data(), hs2.K, a.data())}, B);
  for (int64_t i = 0; i < B * d; ++i) yp[i] += a[i];
  return y;
}

// Every block of a model for one decoding step, then the final RMSNorm: decode_block for each block in
// turn, in one call (one dispatch from Python instead of one per block). k_caches and v_caches hold
// one (B, H, max_len, Dh) cache per block; params the blocks' tensors, NUM_DECODE_SLOTS per block in
// block order; scales is empty or NUM_SCALE_SLOTS per block; norm_w (d) is the final RMSNorm's weight
// (empty: no final norm). Every block shares the scalar settings.
at::Tensor decode_blocks(const at::Tensor& x, at::TensorList k_caches, at::TensorList v_caches, int64_t pos,
                         const at::Tensor& cos_, const at::Tensor& sin_, at::TensorList params,
                         at::TensorList scales, const at::Tensor& norm_w, double rms_eps, double ln_eps,
                         int64_t n_heads, int64_t tau, int64_t tau2, c10::string_view weighting,
                         double temperature, bool gelu) {
  const int64_t L = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(L > 0 && static_cast<int64_t>(v_caches.size()) == L,
              "memoryformer::decode_blocks: expected one key and one value cache per block; got ", k_caches.size(),
              " and ", v_caches.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == L * NUM_DECODE_SLOTS, "memoryformer::decode_blocks: expected ",
              int(NUM_DECODE_SLOTS), " parameter tensors for each of the ", L, " blocks, got ", params.size());
  TORCH_CHECK(scales.empty() || static_cast<int64_t>(scales.size()) == L * NUM_SCALE_SLOTS,
              "memoryformer::decode_blocks: expected no scales or ", int(NUM_SCALE_SLOTS), " for each of the ", L,
              " blocks, got ", scales.size());
  at::Tensor h = x;
  for (int64_t l = 0; l < L; ++l) {
    const at::TensorList block_scales = scales.empty() ? scales : scales.slice(l * NUM_SCALE_SLOTS, NUM_SCALE_SLOTS);
    h = decode_block(h, k_caches[l], v_caches[l], pos, cos_, sin_, params.slice(l * NUM_DECODE_SLOTS,
                     NUM_DECODE_SLOTS), block_scales, rms_eps, ln_eps, n_heads, tau, tau2, weighting, temperature,
                     gelu);
  }
  if (norm_w.numel() == 0) return h;
  const int64_t B = h.size(0), d = h.size(1);
  check_f32(norm_w, "norm_w", {d});
  at::Tensor y = at::empty_like(h);
  for (int64_t b = 0; b < B; ++b)
    rms_norm(h.data_ptr<float>() + b * d, norm_w.data_ptr<float>(), d, static_cast<float>(rms_eps),
             y.data_ptr<float>() + b * d);
  return y;
}

}  // namespace mf

TORCH_LIBRARY_FRAGMENT(memoryformer, m) {
  m.def("decode_block(Tensor x, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, Tensor cos, Tensor sin, "
        "Tensor[] params, Tensor[] scales, float rms_eps, float ln_eps, int n_heads, int tau, int tau2, str weighting, "
        "float temperature, bool gelu) -> Tensor");
  m.def("decode_blocks(Tensor x, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int pos, Tensor cos, Tensor sin, "
        "Tensor[] params, Tensor[] scales, Tensor norm_w, float rms_eps, float ln_eps, int n_heads, int tau, "
        "int tau2, str weighting, float temperature, bool gelu) -> Tensor");
}

TORCH_LIBRARY_IMPL(memoryformer, CPU, m) {
  m.impl("decode_block", &mf::decode_block);
  m.impl("decode_blocks", &mf::decode_blocks);
}
