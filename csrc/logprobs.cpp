// Fused row log-probs on CPU: logp[n] = logit[n, y[n]] - logsumexp_v(logit[n, v]), logits = h @ w.T, and its
// backward, without ever holding a (N, V) logits tensor. The contract is "Low-level log-prob primitive" in
// helpers/CONTRACT.md; nanoalign/native.py builds this file on first use and nanoalign/ops.py dispatches to it.
//
// Build (done for you by nanoalign/native.py, cached under ~/.cache/nanoalign/torch_extensions/<hash>/, compiled
// from a copy of this file placed there so that every checkout with the same source shares the build):
//   torch.utils.cpp_extension.load(name="nanoalign_native_<hash>", sources=["<that folder>/logprobs.cpp"],
//       extra_cflags=["-O3", "-fopenmp", "-march=native"], extra_ldflags=["-fopenmp"], is_python_module=False)
// then torch.ops.nanoalign.logprob_rows_fwd / logprob_rows_bwd / logprob_rows_fwd_dh (row_tile, v_block: the tile
// shape, chosen by native.py from the L2 size: a square of fp32 filling half the L2 a thread has; 0 = 256 x 256).
//
// Design. The (N, V) logits are cut into tiles of ROW_TILE rows x V_BLOCK vocabulary columns. OpenMP threads take
// groups of consecutive vocabulary blocks, first come first served; partial sums belong to groups, not threads, so
// they do not depend on timing (with per-thread partials and schedule dynamic two runs differed whenever another
// process shared the cores, and 5,000 training steps turned that into a different model). For its block a thread runs, per row tile, one single-threaded
// MKL GEMM (at::mm_out, MKL does not thread inside an OpenMP region) into a private ROW_TILE x V_BLOCK fp32 scratch
// (half the L2 a thread has: 256 x 256 = 256 KB of a 512 KB L2, so it stays in L2; row tiles are balanced, 300 rows
// as 2 x 150, not 256 + 44), and while that tile is hot it
//   fwd: takes the row maxima, the online sum of exp (own vectorised exp) and picks the target logit;
//        per-group (max, sum) pairs are merged at the end, so lse is exact whatever the split.
//   bwd: overwrites the tile with grad_logits = g * (1[v == y] - exp(logit - lse)) and feeds it to two GEMMs:
//        grad_w[block] += G^T @ h_tile (written straight into grad_w, the thread owns the block: no atomics) and
//        grad_h_partial[group] += G @ w_block (group 0 into grad_h itself, the others into buffers from a pool of
//        2 per thread, each added into grad_h in group order as soon as the groups before it are in).
// What it does better than the pure-torch chunked path (nanoalign.ops, chunk of rows x full V):
//   * no (chunk, V) logits tensor: the torch path writes and re-reads chunk x 32000 fp32 values 4-6 times
//     (matmul out, max, sub, exp, sum, gather; in backward softmax, scatter, two matmuls), each a pass over
//     memory larger than the caches; here every logit is produced and consumed in L2 exactly once.
//   * one exp per logit in each direction and no temporaries, so the time is the GEMMs' time; the elementwise
//     work runs at SIMD speed between GEMMs instead of as separate memory-bound kernels. (It did not until
//     2026-11-30: the exp loop compiled to scalar code, 16% of the forward's profile samples at 1200 rows; with the
//     explicit 8-float exp below the op's own code is under 1% and MKL's GEMM kernel and packing are the rest.)
//   * the w block a thread works on (256 x H) stays in cache across all row tiles.
// bf16/fp16 inputs are converted to fp32 (h once, w one block at a time into a private buffer); all arithmetic and
// accumulation is fp32; grad_h / grad_w are returned in h.dtype / w.dtype.
//
// Frozen LM head (LoRA: w needs no gradient): logprob_rows_fwd_dh(h, w, y) -> (logp, lse, D), D (N, H) = dlogp/dh.
// The gradient of logp_n = z_n[y_n] - lse_n with respect to h_n is D_n = w[y_n] - sum_v p_nv w_v, which does not
// depend on the upstream gradient g, so the backward is just grad_h = g[:, None] * D, and D is accumulated in the
// forward while each logits tile is hot: 2 GEMMs per tile (logits, then E @ w_block) instead of the 3 of fwd +
// frozen bwd (logits, logits again, G @ w_block). Per group and row, with the running max m and sum s of the
// forward, an accumulator A_row (H floats) = sum_v exp(z_v - m) w_v: when a block raises the max m_old -> m_new, s
// and A_row are multiplied by exp(m_old - m_new) (flash attention's online softmax), the tile is overwritten with
// E = exp(z - m_new) (its sum, in the forward's order, is the forward's s: logp and lse are the forward's bits) and
// A_tile += E @ w_block. The groups' (m, A) are merged in group order through the backward's pool (GradHMerge with
// a rescaling merge: A = A exp(M - M') + A_g exp(m_g - M'), M' = max(M, m_g)), so D is the same bit for bit
// whichever thread ran which group; at the end E_n[w] = exp(M_n - lse_n) A_n and D_n = w[y_n] - E_n[w]. Rows are
// done in chunks so that the pool fits partial_bytes(), as in the backward. A row whose logits are all -inf or
// include a NaN has lse -inf or NaN and gets NaN in D (exp(M - lse) is NaN), as the backward gives NaN there.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <tuple>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// Tile shape (rows x vocabulary columns of one thread's logits tile). The caller (nanoalign/native.py) derives it
// from the machine's L2 size and passes it; 0 means the default 256 x 256 (256 KB of fp32, half a 512 KB L2).
struct Tiles {
  int64_t rows, vocab;
};
Tiles tiles_for(int64_t N, int64_t row_tile, int64_t v_block) {
  TORCH_CHECK_VALUE(row_tile >= 0 && v_block >= 0, "nanoalign native op: row_tile and v_block must be >= 0, got ",
                    row_tile, " and ", v_block);
  Tiles t{row_tile > 0 ? row_tile : 256, v_block > 0 ? v_block : 256};
  // Balanced row tiles: 300 rows as 150 + 150 instead of 256 + 44 (a 44-row GEMM runs far below the GEMM rate).
  const int64_t n_tiles = std::max<int64_t>(1, (N + t.rows - 1) / t.rows);
  t.rows = std::max<int64_t>(1, std::min(t.rows, ((N + n_tiles - 1) / n_tiles + 7) / 8 * 8));
  return t;
}
// The backward's pool of fp32 grad_h partials (pool buffers x rows x H) is capped at this size; more rows are done
// in chunks.
// NANOALIGN_NATIVE_PARTIAL_BYTES overrides it (the tests use it to exercise the chunked path at small shapes).
int64_t partial_bytes() {
  const char* env = std::getenv("NANOALIGN_NATIVE_PARTIAL_BYTES");
  return env != nullptr ? std::max<int64_t>(1, std::atoll(env)) : (256LL << 20);
}
// Vocabulary blocks are dealt to threads in GROUPS_PER_THREAD * threads groups of consecutive blocks, first come
// first served (schedule dynamic): when another process takes a core, the other thread does more groups instead of
// waiting for it at the end (with schedule static one descheduled thread held the whole op). Every partial result
// -- the (max, sum) of lse, the grad_h partials -- belongs to a group, not to a thread, and groups are merged in
// group order, so the numbers are the same whichever thread ran which group (bit for bit; tested under contention).
constexpr int64_t GROUPS_PER_THREAD = 4;
constexpr int64_t POOL_PER_THREAD = 2;  // grad_h partial buffers in the backward's pool, per thread
int64_t n_groups(int64_t nvb, int nt) { return std::max<int64_t>(1, std::min<int64_t>(nvb, GROUPS_PER_THREAD * nt)); }

// The backward's grad_h partials. Group 0 accumulates into grad_h itself; group k > 0 takes a buffer from the pool,
// fills it, and hands it back with done(k); once group 0 is done, grad_h += partial(k) is done for k = 1, 2, ...
// strictly in group order (by whichever thread completes the run), so the sum is the same bit for bit whichever
// thread ran which group. (It replaced one (groups, rows, H) buffer, zero-filled, summed at the end: 78 MB at 8
// pairs, H 1024.)
// take(k) waits while the pool is empty, except for the group next in line to be added, which gets a new buffer:
// the pool is at most pool_cap buffers plus those rare extras, and nothing can wait forever (the waiters all hold
// later groups; the group next in line never waits, finishes, is added and frees buffers).
// fwd_dh uses it with a merge hook instead of the add: merge(k, partial) is called for every group k = 0, 1, ... in
// group order (group 0's partial is the output buffer itself).
class GradHMerge {
 public:
  using Merge = std::function<void(int64_t, float*)>;
  GradHMerge(int64_t ng, int64_t pool_cap, int64_t numel, Merge merge = nullptr)
      : ng_(ng), cap_(pool_cap), numel_(numel), merge_(std::move(merge)) {}
  void start(float* gh, int64_t n) {  // a new row chunk: gh (n floats), written by group 0
    gh_ = gh;
    n_ = n;
    next_ = 0;
    ready_.assign(ng_, nullptr);
  }
  float* take(int64_t grp) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !free_.empty() || owned_.size() < static_cast<size_t>(cap_) || grp == next_; });
    if (!free_.empty()) {
      float* p = free_.back();
      free_.pop_back();
      return p;
    }
    owned_.push_back(at::empty({numel_}, at::TensorOptions().dtype(at::kFloat)));
    return owned_.back().data_ptr<float>();
  }
  void done(int64_t grp, float* p) {
    std::lock_guard<std::mutex> lock(mu_);
    ready_[grp] = p;
    while (next_ < ng_ && ready_[next_] != nullptr) {
      float* q = ready_[next_];
      if (merge_) merge_(next_, q);
      if (q != gh_) {  // group 0's partial is grad_h itself
        if (!merge_) {
#pragma omp simd
          for (int64_t i = 0; i < n_; ++i) gh_[i] += q[i];
        }
        free_.push_back(q);
      }
      ++next_;
    }
    cv_.notify_all();
  }

 private:
  const int64_t ng_, cap_, numel_;
  const Merge merge_;
  float* gh_ = nullptr;
  int64_t n_ = 0, next_ = 0;
  std::vector<float*> ready_, free_;
  std::vector<at::Tensor> owned_;
  std::mutex mu_;
  std::condition_variable cv_;
};
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// exp(x) for fp32: x = k ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial (Cephes' coefficients), 2^k from
// the exponent bits; relative error about 2e-7. x <= -87.33 (and -inf) gives about 1.2e-38 (not 0, harmless in the
// sums it feeds), x >= 88.37 gives about 3.4e38, NaN propagates. Written once on 8-float vectors (AVX2 + FMA, what
// -march=native gives on x86-64 v3 and later, AVX512 machines included) with a scalar twin for other builds; the
// tail of a row is done by the same vector code on a masked load, so every element of a row takes the same path
// and a row's numbers do not depend on where the tile boundaries fall. The scalar loop this replaces did not
// vectorise (GCC kept floor and the bit cast scalar: no vroundps in the build), and the exp passes took 15-25% of
// the op at 4 pairs.
#if defined(__AVX2__) && defined(__FMA__)
constexpr int64_t VEC = 8;
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.37f), x);  // operand order: a NaN x is returned as is
  x = _mm256_max_ps(_mm256_set1_ps(-87.33f), x);
  const __m256 k = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
// lanes [0, n) of a vector, n in [0, 8]
inline __m256i lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

inline float exp1(float x) {  // scalar twin of exp8 (used where AVX2 + FMA are not compiled in)
  x = x > 88.37f ? 88.37f : x;
  x = x < -87.33f ? -87.33f : x;
  const float k = std::floor(std::fma(x, 1.44269504088896341f, 0.5f));
  float r = std::fma(-k, 0.693359375f, x);
  r = std::fma(-k, -2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

// max over row[0, n)
inline float row_max(const float* row, int64_t n) {
  float m = NEG_INF;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, row[j]);
  return m;
}

// sum over j of exp(row[j] - shift), row[0, n)
inline float row_sum_exp(const float* row, int64_t n, float shift) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 2 * VEC <= n; j += 2 * VEC) {
    acc0 = _mm256_add_ps(acc0, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), s)));
    acc1 = _mm256_add_ps(acc1, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j + VEC), s)));
  }
  for (; j < n; j += VEC) {
    const __m256i m = lanes(n - j);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_maskload_ps(row + j, m), s));
    acc0 = _mm256_add_ps(acc0, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
  }
  return hsum8(_mm256_add_ps(acc0, acc1));
#else
  float acc = 0.f;
  for (int64_t j = 0; j < n; ++j) acc += exp1(row[j] - shift);
  return acc;
#endif
}

// row[j] = scale * exp(row[j] - shift) for j in [0, n), in place
inline void row_scaled_exp(float* row, int64_t n, float shift, float scale) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 s = _mm256_set1_ps(shift), c = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + VEC <= n; j += VEC)
    _mm256_storeu_ps(row + j, _mm256_mul_ps(c, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), s))));
  if (j < n) {
    const __m256i m = lanes(n - j);
    _mm256_maskstore_ps(row + j, m, _mm256_mul_ps(c, exp8(_mm256_sub_ps(_mm256_maskload_ps(row + j, m), s))));
  }
#else
  for (int64_t j = 0; j < n; ++j) row[j] = scale * exp1(row[j] - shift);
#endif
}

// row[j] = exp(row[j] - shift) for j in [0, n), in place; returns their sum, added in row_sum_exp's order (so the
// same bits as row_sum_exp(row, n, shift) on the row before).
inline float row_exp_sum(float* row, int64_t n, float shift) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 2 * VEC <= n; j += 2 * VEC) {
    const __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), s));
    const __m256 e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j + VEC), s));
    _mm256_storeu_ps(row + j, e0);
    _mm256_storeu_ps(row + j + VEC, e1);
    acc0 = _mm256_add_ps(acc0, e0);
    acc1 = _mm256_add_ps(acc1, e1);
  }
  for (; j < n; j += VEC) {
    const __m256i m = lanes(n - j);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_maskload_ps(row + j, m), s));
    _mm256_maskstore_ps(row + j, m, e);
    acc0 = _mm256_add_ps(acc0, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
  }
  return hsum8(_mm256_add_ps(acc0, acc1));
#else
  float acc = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    row[j] = exp1(row[j] - shift);
    acc += row[j];
  }
  return acc;
#endif
}

// Merge the per-group (max, sum) pairs of rows [n0, n1) in group order: lse = M + log(sum_g s_g exp(m_g - M)),
// logp = target - lse. mp, sp: (ng, N) row-major.
void merge_lse(const float* mp, const float* sp, int64_t ng, int64_t N, int64_t n0, int64_t n1, const float* tp,
               float* lp, float* op) {
  for (int64_t n = n0; n < n1; ++n) {
    float M = NEG_INF;
    for (int64_t t = 0; t < ng; ++t) M = std::max(M, mp[t * N + n]);
    double s = 0.0;
    for (int64_t t = 0; t < ng; ++t)  // a group whose max is still -inf holds a sum of 0 (or NaN: propagate it)
      s += mp[t * N + n] == NEG_INF ? sp[t * N + n] : sp[t * N + n] * std::exp(static_cast<double>(mp[t * N + n] - M));
    lp[n] = M == NEG_INF ? (std::isnan(s) ? static_cast<float>(s) : NEG_INF) : M + static_cast<float>(std::log(s));
    op[n] = tp[n] - lp[n];
  }
}

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_rows(const at::Tensor& h, const at::Tensor& w, const at::Tensor& y, const char* fn) {
  TORCH_CHECK_VALUE(h.device().is_cpu() && w.device().is_cpu() && y.device().is_cpu(),
                    fn, ": h, w and y must be CPU tensors");
  TORCH_CHECK_VALUE(h.dim() == 2, fn, ": h must be (N, H), got shape ", h.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2, fn, ": w must be (V, H), got shape ", w.sizes());
  TORCH_CHECK_VALUE(h.size(1) == w.size(1), fn, ": hidden sizes differ: h ", h.sizes(), " vs w ", w.sizes());
  TORCH_CHECK_VALUE(w.size(0) > 0, fn, ": w has an empty vocabulary");
  TORCH_CHECK_VALUE(is_float_type(h.scalar_type()) && is_float_type(w.scalar_type()),
                    fn, ": h and w must be float32/bfloat16/float16, got ", h.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == h.size(0), fn, ": y must be (N,) = (", h.size(0),
                    ",), got shape ", y.sizes());
  TORCH_CHECK_VALUE(y.scalar_type() == at::kLong, fn, ": y must be int64, got ", y.scalar_type());
  if (y.numel() > 0) {
    auto mm = at::aminmax(y);
    int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < w.size(0), fn, ": y must be in [0, ", w.size(0), "), got values in [",
                      lo, ", ", hi, "]");
  }
}

at::Tensor f32_contig(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous();
}

// Pointer to rows [v0, v0 + bv) of w as contiguous fp32 (bv, H): w itself if it is fp32, else converted into buf.
const float* w_block_f32(const at::Tensor& w, bool w_f32, int64_t v0, int64_t bv, float* buf) {
  const int64_t H = w.size(1);
  if (w_f32) return w.data_ptr<float>() + v0 * H;
  at::from_blob(buf, {bv, H}, at::kFloat).copy_(w.narrow(0, v0, bv));
  return buf;
}

// S (rt, bv) with row stride V_BLOCK = h_tile (rt, H) @ w_block (bv, H)^T, one thread.
void logits_tile(const float* h_tile, const float* w_blk, int64_t rt, int64_t bv, int64_t H, float* S,
                 int64_t V_BLOCK) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::from_blob(S, {rt, bv}, {V_BLOCK, 1}, opts);
  at::Tensor a = at::from_blob(const_cast<float*>(h_tile), {rt, H}, opts);
  at::Tensor b = at::from_blob(const_cast<float*>(w_blk), {bv, H}, opts);
  at::mm_out(out, a, b.t());
}

std::tuple<at::Tensor, at::Tensor> logprob_rows_fwd(const at::Tensor& h, const at::Tensor& w, const at::Tensor& y,
                                                    int64_t row_tile, int64_t v_block) {
  check_rows(h, w, y, "logprob_rows_fwd");
  const int64_t N = h.size(0), H = h.size(1), V = w.size(0);
  const Tiles tl = tiles_for(N, row_tile, v_block);
  const int64_t ROW_TILE = tl.rows, V_BLOCK = tl.vocab;
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, f32), lse = at::empty({N}, f32);
  if (N == 0) return {logp, lse};
  at::Tensor h32 = f32_contig(h).detach();               // (N, H)
  const bool w_f32 = w.scalar_type() == at::kFloat;
  at::Tensor wc = w.contiguous().detach();               // (V, H)
  at::Tensor yc = y.contiguous();
  const int64_t nvb = (V + V_BLOCK - 1) / V_BLOCK;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nvb)));
  const int64_t ng = n_groups(nvb, nt);
  at::Tensor run_max = at::full({ng, N}, NEG_INF, f32);  // per-group running max of each row
  at::Tensor run_sum = at::zeros({ng, N}, f32);          // per-group sum of exp(logit - run_max)
  at::Tensor target = at::empty({N}, f32);               // logit[n, y[n]], written by the block holding y[n]
  at::Tensor scratch = at::empty({nt, ROW_TILE * V_BLOCK}, f32);
  at::Tensor wbuf = w_f32 ? at::Tensor() : at::empty({nt, V_BLOCK * H}, f32);
  const float* hp = h32.data_ptr<float>();
  const int64_t* yp = yc.data_ptr<int64_t>();
  float* tp = target.data_ptr<float>();

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    float* S = scratch.data_ptr<float>() + tid * ROW_TILE * V_BLOCK;
    float* wb_buf = w_f32 ? nullptr : wbuf.data_ptr<float>() + tid * V_BLOCK * H;
#pragma omp for schedule(dynamic, 1)
    for (int64_t grp = 0; grp < ng; ++grp) {
    float* m_t = run_max.data_ptr<float>() + grp * N;
    float* s_t = run_sum.data_ptr<float>() + grp * N;
    for (int64_t b = grp * nvb / ng; b < (grp + 1) * nvb / ng; ++b) {
      const int64_t v0 = b * V_BLOCK, bv = std::min(V_BLOCK, V - v0);
      const float* wb = w_block_f32(wc, w_f32, v0, bv, wb_buf);
      for (int64_t r0 = 0; r0 < N; r0 += ROW_TILE) {
        const int64_t rt = std::min(ROW_TILE, N - r0);
        logits_tile(hp + r0 * H, wb, rt, bv, H, S, V_BLOCK);
        for (int64_t i = 0; i < rt; ++i) {
          const float* row = S + i * V_BLOCK;
          const int64_t n = r0 + i;
          const int64_t yy = yp[n] - v0;
          if (yy >= 0 && yy < bv) tp[n] = row[yy];  // (before the skip below: an all -inf row's target is -inf)
          const float m_new = std::max(m_t[n], row_max(row, bv));
          if (m_new == NEG_INF) {  // every logit so far is -inf or NaN (max skips NaN): nothing to add, but a NaN
            for (int64_t j = 0; j < bv; ++j)  // must reach lse as it does from a row where some logits are finite
              if (std::isnan(row[j])) s_t[n] = std::numeric_limits<float>::quiet_NaN();
            continue;
          }
          const float acc = row_sum_exp(row, bv, m_new);
          s_t[n] = s_t[n] * exp1(m_t[n] - m_new) + acc;
          m_t[n] = m_new;
        }
      }
    }
    }
  }

  merge_lse(run_max.data_ptr<float>(), run_sum.data_ptr<float>(), ng, N, 0, N, tp, lse.data_ptr<float>(),
            logp.data_ptr<float>());
  return {logp, lse};
}

std::tuple<at::Tensor, at::Tensor> logprob_rows_bwd(const at::Tensor& h, const at::Tensor& w, const at::Tensor& y,
                                                    const at::Tensor& lse, const at::Tensor& g, bool need_grad_w,
                                                    int64_t row_tile, int64_t v_block) {
  check_rows(h, w, y, "logprob_rows_bwd");
  const int64_t N = h.size(0), H = h.size(1), V = w.size(0);
  const Tiles tl = tiles_for(N, row_tile, v_block);
  const int64_t ROW_TILE = tl.rows, V_BLOCK = tl.vocab;
  TORCH_CHECK_VALUE(lse.device().is_cpu() && lse.dim() == 1 && lse.size(0) == N,
                    "logprob_rows_bwd: lse must be a CPU tensor of shape (", N, ",), got ", lse.sizes());
  TORCH_CHECK_VALUE(g.device().is_cpu() && g.dim() == 1 && g.size(0) == N,
                    "logprob_rows_bwd: g must be a CPU tensor of shape (", N, ",), got ", g.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(lse.scalar_type()) && at::isFloatingType(g.scalar_type()),
                    "logprob_rows_bwd: lse and g must be floating point");
  // need_grad_w = false (frozen LM head, e.g. LoRA): skip the grad_w GEMM, a third of the work; grad_w is then (0,).
  at::Tensor grad_w = need_grad_w ? at::empty({V, H}, w.options().memory_format(at::MemoryFormat::Contiguous))
                                  : at::empty({0}, w.options());
  if (N == 0) {
    grad_w.zero_();
    return {at::zeros_like(h, at::MemoryFormat::Contiguous), grad_w};
  }
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor h32 = f32_contig(h).detach();  // (N, H)
  at::Tensor lse32 = f32_contig(lse), g32 = f32_contig(g), yc = y.contiguous();
  const bool w_f32 = w.scalar_type() == at::kFloat;
  at::Tensor wc = w.contiguous().detach();
  const int64_t nvb = (V + V_BLOCK - 1) / V_BLOCK;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nvb)));

  const int64_t ng = n_groups(nvb, nt);
  // grad_h partials: group 0 accumulates straight into grad_h; every other group into an fp32 (chunk, H) buffer
  // from a small pool, added to grad_h in group order as soon as the groups before it are in (see GradHMerge).
  // At most POOL_PER_THREAD * nt buffers (plus one, rarely: see take()), so the memory no longer grows with the
  // number of groups. Rows are done in chunks so that the pool fits partial_bytes().
  const int64_t pool_cap = std::max<int64_t>(1, std::min<int64_t>(ng - 1, POOL_PER_THREAD * nt));
  int64_t chunk = partial_bytes() / ((pool_cap + 1) * H * 4);
  chunk = std::max<int64_t>(ROW_TILE, chunk / ROW_TILE * ROW_TILE);
  chunk = std::min(chunk, N);
  const int64_t n_chunks = (N + chunk - 1) / chunk;
  // grad_w accumulates in fp32: in grad_w itself when it is fp32; else in a per-block buffer when one chunk
  // covers all rows (copied out once per block), else in a full fp32 (V, H) buffer.
  at::Tensor gw_full = (need_grad_w && !w_f32 && n_chunks > 1) ? at::empty({V, H}, f32) : at::Tensor();
  at::Tensor gw_blocks = (need_grad_w && !w_f32 && n_chunks == 1) ? at::empty({nt, V_BLOCK * H}, f32) : at::Tensor();
  at::Tensor gh32 = at::empty({N, H}, f32);  // grad_h in fp32
  at::Tensor scratch = at::empty({nt, ROW_TILE * V_BLOCK}, f32);
  at::Tensor wbuf = w_f32 ? at::Tensor() : at::empty({nt, V_BLOCK * H}, f32);
  const float* hp = h32.data_ptr<float>();
  const float* lsep = lse32.data_ptr<float>();
  const float* gp = g32.data_ptr<float>();
  const int64_t* yp = yc.data_ptr<int64_t>();
  GradHMerge merge(ng, pool_cap, chunk * H);

  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t cn = std::min(chunk, N - c0);
    float* gh_chunk = gh32.data_ptr<float>() + c0 * H;
    merge.start(gh_chunk, cn * H);
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      float* S = scratch.data_ptr<float>() + tid * ROW_TILE * V_BLOCK;
      float* wb_buf = w_f32 ? nullptr : wbuf.data_ptr<float>() + tid * V_BLOCK * H;
      auto opts = at::TensorOptions().dtype(at::kFloat);
#pragma omp for schedule(dynamic, 1)
      for (int64_t grp = 0; grp < ng; ++grp) {
      float* P = grp == 0 ? gh_chunk : merge.take(grp);  // (cn, H) grad_h partial of this group
      const int64_t b_first = grp * nvb / ng;
      for (int64_t b = b_first; b < (grp + 1) * nvb / ng; ++b) {
        const int64_t v0 = b * V_BLOCK, bv = std::min(V_BLOCK, V - v0);
        const float* wb = w_block_f32(wc, w_f32, v0, bv, wb_buf);
        float* gw = nullptr;  // fp32 (bv, H) accumulator of grad_w[v0 : v0 + bv]
        if (!need_grad_w) {
        } else if (w_f32) gw = grad_w.data_ptr<float>() + v0 * H;
        else if (n_chunks > 1) gw = gw_full.data_ptr<float>() + v0 * H;
        else gw = gw_blocks.data_ptr<float>() + tid * V_BLOCK * H;
        at::Tensor gw_t = need_grad_w ? at::from_blob(gw, {bv, H}, opts) : at::Tensor();
        at::Tensor wb_t = at::from_blob(const_cast<float*>(wb), {bv, H}, opts);
        for (int64_t r0 = c0; r0 < c0 + cn; r0 += ROW_TILE) {
          const int64_t rt = std::min(ROW_TILE, c0 + cn - r0);
          logits_tile(hp + r0 * H, wb, rt, bv, H, S, V_BLOCK);
          // S <- grad_logits = g * (1[v == y] - exp(logit - lse))   (rt, bv)
          for (int64_t i = 0; i < rt; ++i) {
            float* row = S + i * V_BLOCK;
            const int64_t n = r0 + i;
            const float gn = gp[n], l = lsep[n];
            if (gn == 0.f) {
              std::memset(row, 0, bv * sizeof(float));
              continue;
            }
            row_scaled_exp(row, bv, l, -gn);
            const int64_t yy = yp[n] - v0;
            if (yy >= 0 && yy < bv) row[yy] += gn;
          }
          at::Tensor G = at::from_blob(S, {rt, bv}, {V_BLOCK, 1}, opts);
          at::Tensor h_t = at::from_blob(const_cast<float*>(hp + r0 * H), {rt, H}, opts);
          if (need_grad_w && r0 == 0) at::mm_out(gw_t, G.t(), h_t);  // first rows: overwrite (not zeroed)
          else if (need_grad_w) gw_t.addmm_(G.t(), h_t);              // grad_w[block] += G^T @ h_tile  (bv, H)
          at::Tensor P_t = at::from_blob(P + (r0 - c0) * H, {rt, H}, opts);
          if (b == b_first) at::mm_out(P_t, G, wb_t);  // the group's first block: overwrite (nothing to zero)
          else P_t.addmm_(G, wb_t);                    // grad_h partial += G @ w_block   (rt, H)
        }
        if (need_grad_w && !w_f32 && n_chunks == 1) grad_w.narrow(0, v0, bv).copy_(gw_t);
      }
      merge.done(grp, P);
      }
    }
  }
  if (need_grad_w && !w_f32 && n_chunks > 1) grad_w.copy_(gw_full);
  at::Tensor grad_h = h.scalar_type() == at::kFloat ? gh32 : gh32.to(h.scalar_type());
  return {grad_h, grad_w};
}

// Frozen-head forward (see the design note at the top): (logp (N,) fp32, lse (N,) fp32, D (N, H) h.dtype) with
// D_n = dlogp_n / dh_n = w[y_n] - sum_v softmax(h_n w^T)_v w_v; logp and lse are logprob_rows_fwd's bits.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_rows_fwd_dh(const at::Tensor& h, const at::Tensor& w,
                                                                   const at::Tensor& y, int64_t row_tile,
                                                                   int64_t v_block) {
  check_rows(h, w, y, "logprob_rows_fwd_dh");
  const int64_t N = h.size(0), H = h.size(1), V = w.size(0);
  const Tiles tl = tiles_for(N, row_tile, v_block);
  const int64_t ROW_TILE = tl.rows, V_BLOCK = tl.vocab;
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, f32), lse = at::empty({N}, f32);
  if (N == 0) return {logp, lse, at::empty({0, H}, h.options())};
  at::Tensor h32 = f32_contig(h).detach();  // (N, H)
  const bool w_f32 = w.scalar_type() == at::kFloat;
  at::Tensor wc = w.contiguous().detach();  // (V, H)
  at::Tensor yc = y.contiguous();
  const int64_t nvb = (V + V_BLOCK - 1) / V_BLOCK;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nvb)));
  const int64_t ng = n_groups(nvb, nt);
  at::Tensor run_max = at::full({ng, N}, NEG_INF, f32);  // per-group running max of each row
  at::Tensor run_sum = at::zeros({ng, N}, f32);          // per-group sum of exp(logit - run_max)
  at::Tensor target = at::empty({N}, f32);               // logit[n, y[n]]
  // The groups' A partials (chunk, H): group 0 into D itself, the others from the pool, merged in group order; rows
  // in chunks so that the pool fits partial_bytes() (the backward's rule).
  const int64_t pool_cap = std::max<int64_t>(1, std::min<int64_t>(ng - 1, POOL_PER_THREAD * nt));
  int64_t chunk = partial_bytes() / ((pool_cap + 1) * H * 4);
  chunk = std::max<int64_t>(ROW_TILE, chunk / ROW_TILE * ROW_TILE);
  chunk = std::min(chunk, N);
  at::Tensor D32 = at::empty({N, H}, f32);         // A, merged, then D in place
  at::Tensor merged_max = at::empty({chunk}, f32);  // max of the groups merged so far, per row of the chunk
  at::Tensor scratch = at::empty({nt, ROW_TILE * V_BLOCK}, f32);
  at::Tensor wbuf = w_f32 ? at::Tensor() : at::empty({nt, V_BLOCK * H}, f32);
  const float* hp = h32.data_ptr<float>();
  const int64_t* yp = yc.data_ptr<int64_t>();
  float* tp = target.data_ptr<float>();
  float* Mp = merged_max.data_ptr<float>();
  int64_t c0 = 0, cn = 0;
  float* acc = nullptr;  // D32's rows of the chunk: the merged A
  // Group k's (m_k, A_k) into the merged (M, A), called in group order under the pool's lock:
  // M' = max(M, m_k), A = A exp(M - M') + A_k exp(m_k - M'). Group 0 wrote A itself: M = m_0.
  auto merge_group = [&](int64_t grp, float* q) {
    const float* mg = run_max.data_ptr<float>() + grp * N + c0;
    if (grp == 0) {
      std::memcpy(Mp, mg, cn * sizeof(float));
      return;
    }
    for (int64_t i = 0; i < cn; ++i) {
      const float M = Mp[i], m = mg[i], M2 = std::max(M, m);
      if (M2 == NEG_INF) continue;  // no finite logit in either yet: both A rows are 0 (lse carries any NaN)
      const float ca = std::exp(M - M2), cb = std::exp(m - M2);  // M = -inf: ca = 0
      float* a = acc + i * H;
      const float* b = q + i * H;
      if (ca == 1.f) {
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) a[k] += cb * b[k];
      } else {
#pragma omp simd
        for (int64_t k = 0; k < H; ++k) a[k] = ca * a[k] + cb * b[k];
      }
      Mp[i] = M2;
    }
  };
  GradHMerge merge(ng, pool_cap, chunk * H, merge_group);

  for (c0 = 0; c0 < N; c0 += chunk) {
    cn = std::min(chunk, N - c0);
    acc = D32.data_ptr<float>() + c0 * H;
    merge.start(acc, cn * H);
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      float* S = scratch.data_ptr<float>() + tid * ROW_TILE * V_BLOCK;
      float* wb_buf = w_f32 ? nullptr : wbuf.data_ptr<float>() + tid * V_BLOCK * H;
      auto opts = at::TensorOptions().dtype(at::kFloat);
#pragma omp for schedule(dynamic, 1)
      for (int64_t grp = 0; grp < ng; ++grp) {
      float* m_t = run_max.data_ptr<float>() + grp * N;
      float* s_t = run_sum.data_ptr<float>() + grp * N;
      float* P = grp == 0 ? acc : merge.take(grp);  // (cn, H) A partial of this group
      const int64_t b_first = grp * nvb / ng;
      for (int64_t b = b_first; b < (grp + 1) * nvb / ng; ++b) {
        const int64_t v0 = b * V_BLOCK, bv = std::min(V_BLOCK, V - v0);
        const float* wb = w_block_f32(wc, w_f32, v0, bv, wb_buf);
        at::Tensor wb_t = at::from_blob(const_cast<float*>(wb), {bv, H}, opts);
        for (int64_t r0 = c0; r0 < c0 + cn; r0 += ROW_TILE) {
          const int64_t rt = std::min(ROW_TILE, c0 + cn - r0);
          logits_tile(hp + r0 * H, wb, rt, bv, H, S, V_BLOCK);
          // S <- E = exp(logit - m_new); s and the row's A rescaled when the max rises   (rt, bv)
          for (int64_t i = 0; i < rt; ++i) {
            float* row = S + i * V_BLOCK;
            const int64_t n = r0 + i;
            const int64_t yy = yp[n] - v0;
            if (yy >= 0 && yy < bv) tp[n] = row[yy];
            const float m_new = std::max(m_t[n], row_max(row, bv));
            if (m_new == NEG_INF) {  // as in the forward; the row adds nothing to A
              for (int64_t j = 0; j < bv; ++j)
                if (std::isnan(row[j])) s_t[n] = std::numeric_limits<float>::quiet_NaN();
              std::memset(row, 0, bv * sizeof(float));
              continue;
            }
            const float alpha = exp1(m_t[n] - m_new);
            const float sum = row_exp_sum(row, bv, m_new);
            s_t[n] = s_t[n] * alpha + sum;
            if (b != b_first && m_new != m_t[n]) {  // A_row *= exp(m_old - m_new) (not yet written on b_first)
              float* a = P + (n - c0) * H;
#pragma omp simd
              for (int64_t k = 0; k < H; ++k) a[k] *= alpha;
            }
            m_t[n] = m_new;
          }
          at::Tensor E = at::from_blob(S, {rt, bv}, {V_BLOCK, 1}, opts);
          at::Tensor P_t = at::from_blob(P + (r0 - c0) * H, {rt, H}, opts);
          if (b == b_first) at::mm_out(P_t, E, wb_t);  // the group's first block: overwrite (nothing to zero)
          else P_t.addmm_(E, wb_t);                    // A += E @ w_block   (rt, H)
        }
      }
      merge.done(grp, P);
      }
    }
    // This chunk's rows are complete: lse, logp, then D = w[y] - exp(M - lse) A in place.
    float* lp = lse.data_ptr<float>();
    merge_lse(run_max.data_ptr<float>(), run_sum.data_ptr<float>(), ng, N, c0, c0 + cn, tp, lp,
              logp.data_ptr<float>());
    at::Tensor wy = f32_contig(wc.index_select(0, yc.narrow(0, c0, cn)));  // (cn, H)
    const float* wyp = wy.data_ptr<float>();
    for (int64_t i = 0; i < cn; ++i) {
      const float coef = std::exp(Mp[i] - lp[c0 + i]);  // 1 / sum_v exp(z_v - M); NaN for an all -inf / NaN row
      float* d = acc + i * H;
      const float* wr = wyp + i * H;
#pragma omp simd
      for (int64_t k = 0; k < H; ++k) d[k] = wr[k] - coef * d[k];
    }
  }
  at::Tensor D = h.scalar_type() == at::kFloat ? D32 : D32.to(h.scalar_type());
  return {logp, lse, D};
}

}  // namespace

TORCH_LIBRARY(nanoalign, m) {
  m.def("logprob_rows_fwd(Tensor h, Tensor w, Tensor y, int row_tile=0, int v_block=0) -> (Tensor, Tensor)");
  m.def("logprob_rows_bwd(Tensor h, Tensor w, Tensor y, Tensor lse, Tensor g, bool need_grad_w=True,"
        " int row_tile=0, int v_block=0) -> (Tensor, Tensor)");
  m.def("logprob_rows_fwd_dh(Tensor h, Tensor w, Tensor y, int row_tile=0, int v_block=0)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nanoalign, CPU, m) {
  m.impl("logprob_rows_fwd", &logprob_rows_fwd);
  m.impl("logprob_rows_bwd", &logprob_rows_bwd);
  m.impl("logprob_rows_fwd_dh", &logprob_rows_fwd_dh);
}
