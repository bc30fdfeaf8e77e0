// y = S x for S in capllm's bitmask layout, on the CPU, for a few tokens at a time (decode).
//
// Layout (capllm/format/bitmask.py): `values` holds the non-zeros of S (m x n) row-major and
// `bitmask` (m x ceil(n/8), uint8) has bit j%8 (LSB first) of byte j/8 of row i set iff
// S[i,j] != 0. `row_ptr` (m+1, int64) is the exclusive prefix sum of the row counts, so row i's
// values start at values[row_ptr[i]]. `values` carries >= 16 padding elements after the last
// non-zero: the vector paths load 16 (or 8) values at a time and keep only the mask's share.
//
// Per row and per 16 columns the AVX-512 path reads 16 mask bits, loads 16 values, widens them
// to fp32 (bf16: shift into the high half; fp16: vcvtph2ps), expands them into the set lanes
// (vexpandps, zeros elsewhere) and multiplies with the matching 16 entries of every token's x
// (fp32 FMA). The bytes read per row are the values plus n/8 mask bytes, against 4n for a dense
// fp32 row: that is where batch-1 decode, bound by weight bytes, gets its speed. The AVX2 path
// does the same 8 columns at a time with a 256-entry permutation table (vpermps + vblendvps per
// mask byte) and several chunks' FMA chains in flight; the scalar path walks the set bits. Rows
// are divided among torch's intra-op threads (at::parallel_for; cpu_build.py compiles with -fopenmp, without which it runs on one thread).
//
// unpack_rows (the prefill path) writes rows of S (+ U Vᵀ) dense into a caller's buffer, four
// rows side by side so their popcount -> load chains overlap (AVX2, SmolLM2 shapes: 4-26 % less
// time than one row at a time, 0.85-1.28x a plain copy of the dense matrix); at small rank the low-rank
// rows are added in registers before the store (bitmask.py FUSED_UNPACK_MAX_RANK says up to which rank, per ISA).
//
// Exactness: every path sums row i's products in the same per-lane order within a path; paths
// differ from each other and from a dense GEMV only by floating-point summation order.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

enum ValueType { F32 = 0, BF16 = 1, F16 = 2 };
enum Isa { AUTO = 0, SCALAR = 1, AVX2 = 2, AVX512 = 3, AVX512_ROWWISE = 4, AVX2_ROWWISE = 5 };  // 4, 5: one row at a time (for tests and A/B)

struct Problem {
  const float* x;      // (T, n) fp32
  const void* values;  // (nnz + pad,)
  const uint8_t* bm;   // (m, nb)
  const int64_t* rp;   // (m + 1,)
  float* y;            // (T, m) fp32, or the dense (m, n) output of unpack
  int64_t m, n, nb, T;
  int64_t bs;          // bytes from one row's mask to the next: nb, or more for a column block (unpack_cols)
};

inline float scalar_value(const void* v, int64_t p, int vt) {
  if (vt == F32) return static_cast<const float*>(v)[p];
  uint16_t h = static_cast<const uint16_t*>(v)[p];
  if (vt == BF16) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// ---------------------------------------------------------------- scalar
void rows_scalar(const Problem& P, int vt, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const uint8_t* b = P.bm + i * P.bs;
    int64_t p = P.rp[i];
    for (int64_t t = 0; t < P.T; ++t) P.y[t * P.m + i] = 0.f;
    for (int64_t k = 0; k < P.nb; ++k) {
      unsigned bits = b[k];
      while (bits) {
        int j = __builtin_ctz(bits);
        bits &= bits - 1;
        float w = scalar_value(P.values, p++, vt);
        int64_t col = 8 * k + j;
        for (int64_t t = 0; t < P.T; ++t) P.y[t * P.m + i] += w * P.x[t * P.n + col];
      }
    }
  }
}

void unpack_scalar(const Problem& P, int vt, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const uint8_t* b = P.bm + i * P.bs;
    int64_t p = P.rp[i];
    float* out = P.y + i * P.n;
    std::memset(out, 0, sizeof(float) * P.n);
    for (int64_t k = 0; k < P.nb; ++k) {
      unsigned bits = b[k];
      while (bits) {
        int j = __builtin_ctz(bits);
        bits &= bits - 1;
        out[8 * k + j] = scalar_value(P.values, p++, vt);
      }
    }
  }
}

// Rows [i0, i0 + RB) of an unpack: each row's mask, its first value and its output row (the
// ISA-independent set-up both vector unpacks share).
template <int RB>
struct RowBlock {
  const uint8_t* b[RB];
  int64_t p[RB];
  float* out[RB];
  RowBlock(const Problem& P, int64_t i0) {
    for (int r = 0; r < RB; ++r) {
      b[r] = P.bm + (i0 + r) * P.bs;
      p[r] = P.rp[i0 + r];
      out[r] = P.y + (i0 + r) * P.n;
    }
  }
};

// ---------------------------------------------------------------- AVX-512
// How far ahead of the current read the decode loops prefetch the packed values, and with which
// hint (see rows_avx2_tb for why they prefetch at all). Each value is read once per token, so NTA
// would be the textbook hint, and on AMD (Zen 3) it beat T0 in 30 of 32 cases of
// benchmarks/decode_ab.py (middle half 1.02-1.09x); on Intel (an AVX-512 Xeon, 2026-12-03) NTA
// made the fp32 path 1.6x slower than T0 (NTA fills L1 only and leaves the L2 streamer idle), so
// the hint is chosen by vendor, once.
constexpr int64_t kPrefetchBytes = 2048;
template <int VT>
constexpr int64_t kValueBytes = VT == F32 ? 4 : 2;  // bytes per stored value
bool prefetch_nta() {
  __builtin_cpu_init();  // this runs as a static initialiser, possibly before libgcc's own
  return __builtin_cpu_is("amd");
}
const bool kPrefetchNta = prefetch_nta();

inline void prefetch_values(const char* p) {
  if (kPrefetchNta) _mm_prefetch(p, _MM_HINT_NTA);
  else _mm_prefetch(p, _MM_HINT_T0);
}

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,popcnt,f16c,fma")))

template <int VT>
AVX512_TARGET inline __m512 load16(const void* v, int64_t p) {
  if constexpr (VT == F32) {
    return _mm512_loadu_ps(static_cast<const float*>(v) + p);
  } else if constexpr (VT == BF16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(v) + p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(v) + p));
    return _mm512_cvtph_ps(h);
  }
}

AVX512_TARGET inline uint32_t mask16(const uint8_t* b, int64_t k, int64_t nb) {
  uint32_t lo = b[2 * k];
  uint32_t hi = (2 * k + 1 < nb) ? b[2 * k + 1] : 0u;
  return lo | (hi << 8);
}

// KU = 2 chunks of 16 columns per step, each with its own accumulators (TB * KU FMA chains; four
// chunks at one token measured the same, within 3 %), and the values prefetched kPrefetchBytes
// ahead, as in the AVX2 path below: the value loads' addresses hang on the popcounts of the mask.
// On an AVX-512 Xeon the prefetch took the fp32 path at one token from 1.19-1.33x dense to
// 1.44-1.65x and bf16 values from 1.30-1.55x to 2.12-2.68x (benchmarks/decode_ab.py, SmolLM2
// shapes, 1 GB of copies per case, 1 thread).
template <int VT, int TB>
AVX512_TARGET void rows_avx512_tb(const Problem& P, int64_t r0, int64_t r1, int64_t t0) {
  constexpr int KU = 2;
  constexpr int64_t item = kValueBytes<VT>, step_bytes = 16 * KU * item;  // most value bytes one step reads
  const char* vbytes = static_cast<const char*>(P.values);
  const int64_t n = P.n, full = n / 16, rem = n - 16 * full;
  const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1u);
  const float* x = P.x + t0 * n;
  for (int64_t i = r0; i < r1; ++i) {
    const uint8_t* b = P.bm + i * P.bs;
    int64_t p = P.rp[i];
    __m512 a[KU][TB];
    for (int u = 0; u < KU; ++u)
      for (int t = 0; t < TB; ++t) a[u][t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + KU <= full; k += KU) {
      for (int64_t o = 0; o < step_bytes; o += 64) prefetch_values(vbytes + p * item + kPrefetchBytes + o);
      for (int u = 0; u < KU; ++u) {
        uint32_t mk;
        std::memcpy(&mk, b + 2 * (k + u), 2);
        mk &= 0xFFFFu;
        __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(mk), load16<VT>(P.values, p));
        p += __builtin_popcount(mk);
        for (int t = 0; t < TB; ++t) a[u][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * n + 16 * (k + u)), a[u][t]);
      }
    }
    for (; k < full; ++k) {
      uint32_t mk = mask16(b, k, P.nb);
      __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(mk), load16<VT>(P.values, p));
      p += __builtin_popcount(mk);
      for (int t = 0; t < TB; ++t) a[0][t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * n + 16 * k), a[0][t]);
    }
    if (rem) {
      uint32_t mk = mask16(b, full, P.nb) & tail;
      __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(mk), load16<VT>(P.values, p));
      for (int t = 0; t < TB; ++t) a[0][t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(tail, x + t * n + 16 * full), a[0][t]);
    }
    for (int t = 0; t < TB; ++t) {
      __m512 s = a[0][t];
      for (int u = 1; u < KU; ++u) s = _mm512_add_ps(s, a[u][t]);
      P.y[(t0 + t) * P.m + i] = _mm512_reduce_add_ps(s);
    }
  }
}

// RB rows at a time: each 16-column chunk of x is loaded once per token for all RB rows, and the
// RB rows' value/popcount chains run side by side. This pays only for long rows, whose x does not
// fit in L1 (measured on Qwen2.5-1.5B's down_proj, 1536 x 8960: 1.0x -> 1.55x dense at 1 thread);
// for rows that fit, the single-row loop with two chunk chains is faster (8960 x 1536: 2.1x vs
// 1.35x), so rows_vector picks by the bytes of x a token block reads (kBlockRowsMinXBytes).
template <int VT, int TB, int RB>
AVX512_TARGET void rows_avx512_rb(const Problem& P, int64_t i0, int64_t t0) {
  const int64_t n = P.n, full = n / 16, rem = n - 16 * full;
  const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1u);
  const float* x = P.x + t0 * n;
  const uint8_t* b[RB];
  int64_t p[RB];
  __m512 a[RB][TB];
  for (int r = 0; r < RB; ++r) {
    b[r] = P.bm + (i0 + r) * P.bs;
    p[r] = P.rp[i0 + r];
    for (int t = 0; t < TB; ++t) a[r][t] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < full; ++k) {
    __m512 w[RB];
    for (int r = 0; r < RB; ++r) {
      uint32_t mk;
      std::memcpy(&mk, b[r] + 2 * k, 2);
      mk &= 0xFFFFu;
      prefetch_values(static_cast<const char*>(P.values) + p[r] * kValueBytes<VT> + kPrefetchBytes);
      w[r] = _mm512_maskz_expand_ps(static_cast<__mmask16>(mk), load16<VT>(P.values, p[r]));
      p[r] += __builtin_popcount(mk);
    }
    for (int t = 0; t < TB; ++t) {
      __m512 xv = _mm512_loadu_ps(x + t * n + 16 * k);
      for (int r = 0; r < RB; ++r) a[r][t] = _mm512_fmadd_ps(w[r], xv, a[r][t]);
    }
  }
  if (rem) {
    __m512 w[RB];
    for (int r = 0; r < RB; ++r) {
      uint32_t mk = mask16(b[r], full, P.nb) & tail;
      w[r] = _mm512_maskz_expand_ps(static_cast<__mmask16>(mk), load16<VT>(P.values, p[r]));
    }
    for (int t = 0; t < TB; ++t) {
      __m512 xv = _mm512_maskz_loadu_ps(tail, x + t * n + 16 * full);
      for (int r = 0; r < RB; ++r) a[r][t] = _mm512_fmadd_ps(w[r], xv, a[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) P.y[(t0 + t) * P.m + i0 + r] = _mm512_reduce_add_ps(a[r][t]);
}

template <int VT, int TB>
AVX512_TARGET void rows_avx512_blocked(const Problem& P, int64_t r0, int64_t r1, int64_t t0) {
  constexpr int RB = TB <= 2 ? 4 : 2;
  int64_t i = r0;
  for (; i + RB <= r1; i += RB) rows_avx512_rb<VT, TB, RB>(P, i, t0);
  if (i < r1) rows_avx512_tb<VT, TB>(P, i, r1, t0);
}

// Rows [i0, i0 + RB) of S (+ U Vᵀ), dense fp32. RB rows side by side: their popcount -> load
// chains are independent (one row's chain alone leaves the core waiting: the single-row unpack
// barely gained from a second thread), and with a low-rank part each 16 columns of Vᵀ are loaded
// once for all RB rows and added as r broadcast FMAs per row, before the one store, so S + U Vᵀ
// costs no second pass over the buffer. `Lr` (the rank, 0 = none) is a run-time value; U is
// (m, r) and Vt (r, n), both fp32 contiguous.
template <int VT, int RB>
AVX512_TARGET void unpack_avx512_rb(const Problem& P, int64_t i0, const float* U, const float* Vt, int64_t Lr) {
  const int64_t n = P.n, full = n / 16, rem = n - 16 * full;
  const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1u);
  RowBlock<RB> R(P, i0);
  const uint8_t* const* b = R.b;
  int64_t* p = R.p;
  float* const* out = R.out;
  for (int64_t k = 0; k <= full; ++k) {
    const bool last = k == full;
    if (last && !rem) break;
    __m512 w[RB];
    for (int r = 0; r < RB; ++r) {
      uint32_t mk = mask16(b[r], k, P.nb);
      if (last) mk &= tail;
      w[r] = _mm512_maskz_expand_ps(static_cast<__mmask16>(mk), load16<VT>(P.values, p[r]));
      p[r] += __builtin_popcount(mk);
    }
    for (int64_t q = 0; q < Lr; ++q) {
      const float* vq = Vt + q * n + 16 * k;
      __m512 v = last ? _mm512_maskz_loadu_ps(tail, vq) : _mm512_loadu_ps(vq);
      for (int r = 0; r < RB; ++r) w[r] = _mm512_fmadd_ps(_mm512_set1_ps(U[(i0 + r) * Lr + q]), v, w[r]);
    }
    for (int r = 0; r < RB; ++r) {
      if (last) _mm512_mask_storeu_ps(out[r] + 16 * k, tail, w[r]);
      else _mm512_storeu_ps(out[r] + 16 * k, w[r]);
    }
  }
}

// ---------------------------------------------------------------- AVX2
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c,popcnt")))

// Per mask byte, the vpermps index of each lane: a set lane takes the next packed value (its rank
// among the set lanes), an unset lane gets INT32_MIN. vpermps reads only the low 3 bits, and the
// sign bit is what vblendvps tests, so one table load yields both the permutation and the zeroing
// (the earlier broadcast / and / compare for the keep mask cost three more vector uops per byte).
struct PermTable {
  alignas(32) int32_t idx[256][8];
  PermTable() {
    for (int b = 0; b < 256; ++b) {
      int r = 0;
      for (int k = 0; k < 8; ++k) idx[b][k] = (b >> k) & 1 ? r++ : INT32_MIN;
    }
  }
};
const PermTable kPerm;

template <int VT>
AVX2_TARGET inline __m256 load8(const void* v, int64_t p) {
  if constexpr (VT == F32) {
    return _mm256_loadu_ps(static_cast<const float*>(v) + p);
  } else if constexpr (VT == BF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(v) + p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(v) + p));
    return _mm256_cvtph_ps(h);
  }
}

AVX2_TARGET inline __m256 expand8(unsigned bits, __m256 packed) {
  __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[bits]));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(packed, idx), _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
}

AVX2_TARGET inline __m256i tail_mask8(int64_t rem) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), lane);
}

AVX2_TARGET inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// KU chunks of 8 columns per step, each with its own accumulators, so TB * KU FMA chains run
// side by side: at one token a single chain is bound by the FMA latency (4 cycles on Zen 3 for 8
// columns), which is no faster than a dense GEMV streaming its 32 bytes. Each step also
// prefetches the values kPrefetchBytes ahead: the value loads' addresses hang on the popcounts of
// the mask, and without the hint a DRAM-bound sweep streamed 10-25 % fewer bytes per second
// than the same loads with the expand removed (a standalone A/B on Zen 3, SmolLM2 shapes; with
// the hint it streams about as fast as those loads alone). The hint depends on the vendor
// (prefetch_values): NTA on AMD (against T0 on Zen 3, 30 of 32 cases of benchmarks/decode_ab.py
// faster, benchmarks/results/runtime/decode-ab-nta-vs-3681819-2026-12-03.json), T0 on Intel
// (there this path with NTA ran at 1.04-1.15x dense, with T0 at 1.26-1.38x). The compiler turns the blendv of
// expand8 into a compare + andnot: the same two uops, one table load either way.

template <int VT, int TB>
AVX2_TARGET void rows_avx2_tb(const Problem& P, int64_t r0, int64_t r1, int64_t t0) {
  constexpr int KU = TB == 1 ? 4 : TB == 2 ? 2 : 1;
  constexpr int64_t item = kValueBytes<VT>, step_bytes = 8 * KU * item;  // most value bytes one step reads
  const char* vbytes = static_cast<const char*>(P.values);
  const int64_t n = P.n, full = n / 8, rem = n - 8 * full;
  const __m256i tail = tail_mask8(rem);
  const float* x = P.x + t0 * n;
  for (int64_t i = r0; i < r1; ++i) {
    const uint8_t* b = P.bm + i * P.bs;
    int64_t p = P.rp[i];
    __m256 a[KU][TB];
    for (int u = 0; u < KU; ++u)
      for (int t = 0; t < TB; ++t) a[u][t] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + KU <= full; k += KU) {
      prefetch_values(vbytes + p * item + kPrefetchBytes);
      if constexpr (step_bytes > 64) prefetch_values(vbytes + p * item + kPrefetchBytes + 64);
      for (int u = 0; u < KU; ++u) {
        unsigned bits = b[k + u];
        __m256 w = expand8(bits, load8<VT>(P.values, p));
        p += __builtin_popcount(bits);
        for (int t = 0; t < TB; ++t) a[u][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * n + 8 * (k + u)), a[u][t]);
      }
    }
    for (; k < full; ++k) {
      unsigned bits = b[k];
      __m256 w = expand8(bits, load8<VT>(P.values, p));
      p += __builtin_popcount(bits);
      for (int t = 0; t < TB; ++t) a[0][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * n + 8 * k), a[0][t]);
    }
    if (rem) {
      unsigned bits = b[full] & ((1u << rem) - 1u);
      __m256 w = expand8(bits, load8<VT>(P.values, p));
      for (int t = 0; t < TB; ++t) a[0][t] = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + t * n + 8 * full, tail), a[0][t]);
    }
    for (int t = 0; t < TB; ++t) {
      __m256 s = a[0][t];
      for (int u = 1; u < KU; ++u) s = _mm256_add_ps(s, a[u][t]);
      P.y[(t0 + t) * P.m + i] = hsum8(s);
    }
  }
}

// The AVX2 twin of unpack_avx512_rb: RB rows side by side, 8 columns at a time, U Vᵀ fused.
template <int VT, int RB>
AVX2_TARGET void unpack_avx2_rb(const Problem& P, int64_t i0, const float* U, const float* Vt, int64_t Lr) {
  const int64_t n = P.n, full = n / 8, rem = n - 8 * full;
  const __m256i tail = tail_mask8(rem);
  RowBlock<RB> R(P, i0);
  const uint8_t* const* b = R.b;
  int64_t* p = R.p;
  float* const* out = R.out;
  for (int64_t k = 0; k <= full; ++k) {
    const bool last = k == full;
    if (last && !rem) break;
    __m256 w[RB];
    for (int r = 0; r < RB; ++r) {
      unsigned bits = last ? (b[r][full] & ((1u << rem) - 1u)) : b[r][k];
      w[r] = expand8(bits, load8<VT>(P.values, p[r]));
      p[r] += __builtin_popcount(bits);
    }
    for (int64_t q = 0; q < Lr; ++q) {
      const float* vq = Vt + q * n + 8 * k;
      __m256 v = last ? _mm256_maskload_ps(vq, tail) : _mm256_loadu_ps(vq);
      for (int r = 0; r < RB; ++r) w[r] = _mm256_fmadd_ps(_mm256_set1_ps(U[(i0 + r) * Lr + q]), v, w[r]);
    }
    for (int r = 0; r < RB; ++r) {
      if (last) _mm256_maskstore_ps(out[r] + 8 * k, tail, w[r]);
      else _mm256_storeu_ps(out[r] + 8 * k, w[r]);
    }
  }
}

// ---------------------------------------------------------------- dispatch
int resolve_isa(int64_t isa) {
  static const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  static const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == AUTO) return has512 ? AVX512 : has2 ? AVX2 : SCALAR;
  TORCH_CHECK((isa != AVX512 && isa != AVX512_ROWWISE) || has512, "capllm kernel: this CPU has no AVX-512");
  TORCH_CHECK((isa != AVX2 && isa != AVX2_ROWWISE) || has2, "capllm kernel: this CPU has no AVX2/FMA/F16C");
  TORCH_CHECK(isa >= SCALAR && isa <= AVX2_ROWWISE, "capllm kernel: unknown isa ", isa);
  return static_cast<int>(isa);
}

template <int VT, int TB>
void rows_tb(const Problem& P, int isa, int64_t r0, int64_t r1, int64_t t0) {
  constexpr int64_t kBlockRowsMinXBytes = 16 * 1024;
  if (isa == AVX512 && P.n * TB * 4 >= kBlockRowsMinXBytes) rows_avx512_blocked<VT, TB>(P, r0, r1, t0);
  else if (isa == AVX512 || isa == AVX512_ROWWISE) rows_avx512_tb<VT, TB>(P, r0, r1, t0);
  else rows_avx2_tb<VT, TB>(P, r0, r1, t0);
}

template <int VT>
void rows_vector(const Problem& P, int isa, int64_t r0, int64_t r1) {
  int64_t t0 = 0;
  while (t0 < P.T) {  // tokens in blocks of up to 4: one decode of each chunk serves the block
    int64_t tb = std::min<int64_t>(4, P.T - t0);
    switch (tb) {
      case 4: rows_tb<VT, 4>(P, isa, r0, r1, t0); break;
      case 3: rows_tb<VT, 3>(P, isa, r0, r1, t0); break;
      case 2: rows_tb<VT, 2>(P, isa, r0, r1, t0); break;
      default: rows_tb<VT, 1>(P, isa, r0, r1, t0); break;
    }
    t0 += tb;
  }
}

int value_type(const at::Tensor& v) {
  if (v.scalar_type() == at::kFloat) return F32;
  if (v.scalar_type() == at::kBFloat16) return BF16;
  if (v.scalar_type() == at::kHalf) return F16;
  TORCH_CHECK(false, "capllm kernel: values must be float32, bfloat16 or float16, got ", v.scalar_type());
}

Problem make_problem(const at::Tensor& values, const at::Tensor& bitmask, const at::Tensor& row_ptr, int64_t n) {
  TORCH_CHECK(values.device().is_cpu() && bitmask.device().is_cpu() && row_ptr.device().is_cpu(), "capllm kernel: CPU tensors only");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "capllm kernel: values must be 1-D contiguous");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.is_contiguous() && bitmask.scalar_type() == at::kByte, "capllm kernel: bitmask must be (m, ceil(n/8)) uint8 contiguous");
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.is_contiguous() && row_ptr.scalar_type() == at::kLong, "capllm kernel: row_ptr must be int64 contiguous");
  const int64_t m = bitmask.size(0), nb = bitmask.size(1);
  TORCH_CHECK(nb == (n + 7) / 8, "capllm kernel: bitmask has ", nb, " bytes per row, n = ", n, " needs ", (n + 7) / 8);
  TORCH_CHECK(row_ptr.numel() == m + 1, "capllm kernel: row_ptr must have m + 1 entries");
  const int64_t nnz = row_ptr.data_ptr<int64_t>()[m];
  TORCH_CHECK(values.numel() >= nnz + 16, "capllm kernel: values need 16 padding elements after the ", nnz, " non-zeros");
  Problem P{};
  P.values = values.data_ptr();
  P.bm = bitmask.data_ptr<uint8_t>();
  P.rp = row_ptr.data_ptr<int64_t>();
  P.m = m;
  P.n = n;
  P.nb = nb;
  P.bs = nb;
  return P;
}

template <typename F>
void for_rows(int64_t m, int64_t n, F&& body) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));  // ~32k entries per task
  at::parallel_for(0, m, grain, body);
}

// The low-rank part and bias of a fused layer, applied to y's rows [r0, r1) in the same task that
// computed them: y[t, i] += bias[i] + U[i, :] . z[t, :], z = x V (T x r).
struct Epilogue {
  const float* U = nullptr;  // (m, r)
  const float* z = nullptr;  // (T, r)
  const float* bias = nullptr;
  int64_t r = 0;
  void apply(const Problem& P, int64_t r0, int64_t r1) const {
    if (!r && !bias) return;
    for (int64_t t = 0; t < P.T; ++t) {
      const float* zt = z ? z + t * r : nullptr;
      float* yt = P.y + t * P.m;
      for (int64_t i = r0; i < r1; ++i) {
        float acc = bias ? bias[i] : 0.f;
        for (int64_t k = 0; k < r; ++k) acc += U[i * r + k] * zt[k];
        yt[i] += acc;
      }
    }
  }
};

at::Tensor float_contiguous(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// y (T, m) = x Sᵀ (+ the epilogue) for fp32 contiguous x, rows divided among torch's threads; one
// task per row range computes its rows and then adds their low-rank part and bias while they are in cache.
at::Tensor spmv_rows(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask, const at::Tensor& row_ptr, int64_t isa_req,
                     const Epilogue& ep) {
  const int64_t n = x.size(1);
  Problem P = make_problem(values, bitmask, row_ptr, n);
  P.T = x.size(0);
  at::Tensor y = at::empty({P.T, P.m}, x.options());
  P.x = x.data_ptr<float>();
  P.y = y.data_ptr<float>();
  const int vt = value_type(values);
  const int isa = resolve_isa(isa_req);
  for_rows(P.m, n * std::max<int64_t>(P.T, 1), [&](int64_t r0, int64_t r1) {
    if (isa == SCALAR) rows_scalar(P, vt, r0, r1);
    else if (vt == F32) rows_vector<F32>(P, isa, r0, r1);
    else if (vt == BF16) rows_vector<BF16>(P, isa, r0, r1);
    else rows_vector<F16>(P, isa, r0, r1);
    ep.apply(P, r0, r1);
  });
  return y;
}

at::Tensor float_tokens(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "capllm kernel: x must be (tokens, n)");
  return float_contiguous(x_in);
}

at::Tensor bitmask_spmv(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& bitmask, const at::Tensor& row_ptr, int64_t isa_req) {
  return spmv_rows(float_tokens(x_in), values, bitmask, row_ptr, isa_req, Epilogue{});
}

// z = x V for x (T, n) and V (n, r), both fp32 contiguous, by plain loops into `z` (T x r, zeroed):
// for the ranks CAP keeps (mostly 1-4) at one token this is a few thousand FMAs, which at::matmul
// spent more time dispatching than computing (one matmul per low-rank layer and token: ~3 ms of a
// ~43 ms SmolLM2 decode step in torch.profiler, 2026-12-03). Per token the sum over j runs in
// order; above kSmallLowRankWork entries the BLAS call is worth it again.
constexpr int64_t kSmallLowRankWork = 1 << 16;

void small_x_times_v(const float* xp, const float* vp, float* zp, int64_t T, int64_t n, int64_t r) {
  for (int64_t t = 0; t < T; ++t) {
    float* zt = zp + t * r;
    const float* xt = xp + t * n;
    for (int64_t j = 0; j < n; ++j) {
      const float xj = xt[j];
      const float* vj = vp + j * r;
      for (int64_t k = 0; k < r; ++k) zt[k] += xj * vj[k];
    }
  }
}

// y = S x + U (V^T x) + bias in one call (the decode step of a low-rank + sparse layer): z = x V
// first (T x r), then each task's rows of S x, then the same rows' r-term dot products U[i,:] . z[t,:]
// and the bias, while those rows are in cache. Saves the framework's three extra ops and two
// extra passes over y per layer and token.
at::Tensor bitmask_spmv_fused(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& bitmask, const at::Tensor& row_ptr,
                              const c10::optional<at::Tensor>& U, const c10::optional<at::Tensor>& V, const c10::optional<at::Tensor>& bias, int64_t isa_req) {
  const at::Tensor x = float_tokens(x_in);
  const int64_t T = x.size(0), n = x.size(1), m = bitmask.size(0);
  Epilogue ep;
  at::Tensor z, Uf, bf;
  std::vector<float> zbuf;
  if (U.has_value() && U->defined() && U->numel() > 0) {
    TORCH_CHECK(V.has_value() && V->defined(), "capllm kernel: U without V");
    TORCH_CHECK(U->dim() == 2 && U->size(0) == m && V->dim() == 2 && V->size(0) == n && V->size(1) == U->size(1), "capllm kernel: U (m, r) and V (n, r) do not fit");
    ep.r = U->size(1);
    if (ep.r * n * T <= kSmallLowRankWork && V->scalar_type() == at::kFloat && V->is_contiguous()) {
      zbuf.assign(T * ep.r, 0.f);  // without the dispatcher + BLAS call of at::matmul
      small_x_times_v(x.data_ptr<float>(), V->data_ptr<float>(), zbuf.data(), T, n, ep.r);
      ep.z = zbuf.data();
    } else {
      z = at::matmul(x, V->to(at::kFloat)).contiguous();
      ep.z = z.data_ptr<float>();
    }
    Uf = float_contiguous(*U);
    ep.U = Uf.data_ptr<float>();
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == m, "capllm kernel: bias must have m entries");
    bf = float_contiguous(*bias);
    ep.bias = bf.data_ptr<float>();
  }
  return spmv_rows(x, values, bitmask, row_ptr, isa_req, ep);
}

// Rows [r0, r1) of S (+ U Vᵀ) by the vector unpacks: four rows at a time, then the rest one by
// one (the *_ROWWISE isas: all one by one, for tests and A/B).
template <int VT>
void unpack_vector(const Problem& P, int isa, int64_t r0, int64_t r1, const float* U, const float* Vt, int64_t Lr) {
  const bool avx512 = isa == AVX512 || isa == AVX512_ROWWISE, blocked = isa == AVX512 || isa == AVX2;
  int64_t i = r0;
  for (; blocked && i + 4 <= r1; i += 4) avx512 ? unpack_avx512_rb<VT, 4>(P, i, U, Vt, Lr) : unpack_avx2_rb<VT, 4>(P, i, U, Vt, Lr);
  for (; i < r1; ++i) avx512 ? unpack_avx512_rb<VT, 1>(P, i, U, Vt, Lr) : unpack_avx2_rb<VT, 1>(P, i, U, Vt, Lr);
}

// Rows [i0, i1) of out += U Vᵀ, plain C++ (the scalar unpack; the vector ones fuse it into the store).
void add_lowrank_rows(const Problem& P, int64_t i0, int64_t i1, const float* U, const float* Vt, int64_t Lr) {
  for (int64_t i = i0; i < i1; ++i) {
    float* out = P.y + i * P.n;
    for (int64_t q = 0; q < Lr; ++q) {
      const float u = U[i * Lr + q];
      const float* v = Vt + q * P.n;
      for (int64_t j = 0; j < P.n; ++j) out[j] += u * v[j];
    }
  }
}

// Rows [r0, r1) of P's unpack (P.y, P.n, P.rp and the mask rows already set by the caller), with
// U Vtᵀ added when U (m, r) and Vt (r, P.n) are given: the vector paths fuse it into the store, the
// scalar path adds it after. Shared by unpack_rows and unpack_cols.
void unpack_range(const Problem& P, const at::Tensor& values, int64_t r0, int64_t r1, int64_t isa_req,
                  const c10::optional<at::Tensor>& U_in, const c10::optional<at::Tensor>& Vt_in) {
  const bool lr = U_in.has_value() && U_in->defined() && U_in->numel() > 0;
  at::Tensor U, Vt;
  int64_t Lr = 0;
  if (lr) {
    TORCH_CHECK(Vt_in.has_value() && Vt_in->defined(), "capllm kernel: U without Vt");
    TORCH_CHECK(U_in->dim() == 2 && U_in->size(0) == P.m && Vt_in->dim() == 2 && Vt_in->size(1) == P.n && Vt_in->size(0) == U_in->size(1),
                "capllm kernel: U (m, r) and Vt (r, width) do not fit");
    U = U_in->to(at::kFloat).contiguous();
    Vt = Vt_in->to(at::kFloat).contiguous();
    Lr = U.size(1);
  }
  const float* up = lr ? U.data_ptr<float>() : nullptr;
  const float* vp = lr ? Vt.data_ptr<float>() : nullptr;
  const int vt = value_type(values);
  const int isa = resolve_isa(isa_req);
  at::parallel_for(r0, r1, std::max<int64_t>(4, 32768 / std::max<int64_t>(P.n, 1)), [&](int64_t a, int64_t b) {  // ~32k entries, >= one 4-row block per task
    if (isa == SCALAR) {
      unpack_scalar(P, vt, a, b);
      if (lr) add_lowrank_rows(P, a, b, up, vp, Lr);
    } else if (vt == F32) unpack_vector<F32>(P, isa, a, b, up, vp, Lr);
    else if (vt == BF16) unpack_vector<BF16>(P, isa, a, b, up, vp, Lr);
    else unpack_vector<F16>(P, isa, a, b, up, vp, Lr);
  });
}

// Rows [r0, r1) of S (+ U Vᵀ when U (m, r) and Vt (r, n) are given), dense fp32, into `out`
// ((r1 - r0) x n, contiguous): the prefill path unpacks a few MB at a time into one reused buffer,
// so no call allocates (or page-faults) a whole dense matrix, and the low-rank part rides along.
at::Tensor bitmask_unpack_rows(const at::Tensor& values, const at::Tensor& bitmask, const at::Tensor& row_ptr, int64_t n, int64_t r0, int64_t r1,
                               at::Tensor out, int64_t isa_req, const c10::optional<at::Tensor>& U_in, const c10::optional<at::Tensor>& Vt_in) {
  Problem P = make_problem(values, bitmask, row_ptr, n);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= P.m, "capllm kernel: rows [", r0, ", ", r1, ") outside 0..", P.m);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.numel() == (r1 - r0) * n, "capllm kernel: out must be a contiguous float32 ((r1 - r0) x n) tensor");
  P.y = out.data_ptr<float>() - r0 * n;  // row i lands at out[(i - r0) * n]
  unpack_range(P, values, r0, r1, isa_req, U_in, Vt_in);
  return out;
}

// Columns [c0, c1) of S (+ U Vtᵀ when U (m, r) and Vt (r, c1 - c0) are given), dense fp32, into `out`
// (m x (c1 - c0), contiguous): the prefill path of a wide matrix (n > m) unpacks a block of columns
// at a time and accumulates x[:, c0:c1] · outᵀ, so x is read once, not once per block of rows.
// c0 is a multiple of 16; col_ptr (m,) holds where each row's values from column c0 on start
// (row_ptr + the set bits before c0). The block is the same unpack as unpack_rows on a Problem whose
// mask rows start c0 / 8 bytes in (row stride bs = the whole row's nb) and are c1 - c0 columns wide.
at::Tensor bitmask_unpack_cols(const at::Tensor& values, const at::Tensor& bitmask, const at::Tensor& row_ptr, const at::Tensor& col_ptr, int64_t n,
                               int64_t c0, int64_t c1, at::Tensor out, int64_t isa_req, const c10::optional<at::Tensor>& U_in, const c10::optional<at::Tensor>& Vt_in) {
  Problem P = make_problem(values, bitmask, row_ptr, n);
  TORCH_CHECK(0 <= c0 && c0 < c1 && c1 <= n && c0 % 16 == 0, "capllm kernel: columns [", c0, ", ", c1, ") must lie in 0..", n, " and start at a multiple of 16");
  TORCH_CHECK(col_ptr.dim() == 1 && col_ptr.is_contiguous() && col_ptr.scalar_type() == at::kLong && col_ptr.numel() == P.m, "capllm kernel: col_ptr must be (m,) int64 contiguous");
  const int64_t w = c1 - c0;
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.numel() == P.m * w, "capllm kernel: out must be a contiguous float32 (m x (c1 - c0)) tensor");
  P.bm += c0 / 8;
  P.bs = P.nb;
  P.nb = (w + 7) / 8;
  P.n = w;
  P.rp = col_ptr.data_ptr<int64_t>();
  P.y = out.data_ptr<float>();
  unpack_range(P, values, 0, P.m, isa_req, U_in, Vt_in);
  return out;
}

at::Tensor bitmask_unpack(const at::Tensor& values, const at::Tensor& bitmask, const at::Tensor& row_ptr, int64_t n, int64_t isa_req) {
  const int64_t m = bitmask.size(0);
  return bitmask_unpack_rows(values, bitmask, row_ptr, n, 0, m, at::empty({m, n}, values.options().dtype(at::kFloat)), isa_req, c10::nullopt, c10::nullopt);
}

int64_t best_isa() { return resolve_isa(AUTO); }

// Evict a tensor's bytes from every cache level (clflush per 64-byte line): the load-time probe
// (format/execution.py) times decode-sized calls on matrices that come from DRAM, as in a model's
// decode step, without holding copies that span the whole (possibly huge, shared) L3.
void flush_cache(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "capllm kernel: flush needs a contiguous CPU tensor");
  const char* p = static_cast<const char*>(t.data_ptr());
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  for (int64_t o = 0; o < bytes; o += 64) _mm_clflush(p + o);
  if (bytes > 0) _mm_clflush(p + bytes - 1);
  _mm_mfence();
}

// How many threads an at::parallel_for of this build runs on (1 if it was compiled without OpenMP,
// whatever torch.get_num_threads() says: the build flags are what make the kernel multi-threaded).
int64_t parallel_threads() {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, 1 << 16, 1, [&](int64_t, int64_t) {
    int64_t t = at::get_thread_num() + 1, cur = most.load();
    while (t > cur && !most.compare_exchange_weak(cur, t)) {
    }
  });
  return most.load();
}

}  // namespace

TORCH_LIBRARY(capllm_bitmask, m) {
  m.def("spmv(Tensor x, Tensor values, Tensor bitmask, Tensor row_ptr, int isa=0) -> Tensor");
  m.def("spmv_fused(Tensor x, Tensor values, Tensor bitmask, Tensor row_ptr, Tensor? U, Tensor? V, Tensor? bias, int isa=0) -> Tensor");
  m.def("unpack(Tensor values, Tensor bitmask, Tensor row_ptr, int n, int isa=0) -> Tensor");
  m.def("unpack_rows(Tensor values, Tensor bitmask, Tensor row_ptr, int n, int r0, int r1, Tensor(a!) out, int isa=0, Tensor? U=None, Tensor? Vt=None) -> Tensor(a!)");
  m.def("unpack_cols(Tensor values, Tensor bitmask, Tensor row_ptr, Tensor col_ptr, int n, int c0, int c1, Tensor(a!) out, int isa=0, Tensor? U=None, Tensor? Vt=None) -> Tensor(a!)");
  m.def("best_isa", &best_isa);
  m.def("parallel_threads", &parallel_threads);
  m.def("flush(Tensor t) -> ()");
}

TORCH_LIBRARY_IMPL(capllm_bitmask, CPU, m) {
  m.impl("spmv", &bitmask_spmv);
  m.impl("spmv_fused", &bitmask_spmv_fused);
  m.impl("unpack", &bitmask_unpack);
  m.impl("unpack_rows", &bitmask_unpack_rows);
  m.impl("unpack_cols", &bitmask_unpack_cols);
  m.impl("flush", &flush_cache);
}
