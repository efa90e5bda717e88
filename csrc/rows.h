// The per-row softmax work of the native CPU kernel: the row kernels (max, exp-sum, log-prob, entropy and dz in
// place, scalar and AVX-512), the bf16 dz's corrections, and the forward-only online softmax over blocks.
#pragma once

#include "common.h"

namespace {

// bf16 dz. The GEMMs read dz rounded to bf16, as eager's backward does; two cheap terms keep that rounding from
// reaching dhidden and dweight where it would show:
// * corrections: the entries with |r| > kCorrFrac * (the row's max |r|), r = dz - c0 (below) -- the label's
//   g/T (1 - p) and the few probable tokens, at most 2 / kCorrFrac + 1 of them (the non-label |r| sum to at most
//   twice the label's) -- also enter both gradients with the part bf16 rounded off, r - bf16(r), as fp32 rank-1
//   updates (O(D) each), so the rounding error is left only on the small entries. Without them a row whose
//   gradient is dominated by one large entry carries that entry's rounding (2^-9 relative) into dhidden
//   (d = 1: up to one ulp with the final rounding) and dweight, where the chunked path's dweight (fp32 dz) is
//   within half an ulp (tests/test_native_cpu.py::test_fuzz_native_against_reference).
// * offset: in a flat row (no non-label probability above kFlat x their mean: those logits within ~0.06) the
//   non-label dz are nearly equal and so are their rounding errors, which then add up instead of averaging out
//   (dhidden = g/T (W_label - sum_k p_k W_k) can be far smaller than either term). There the GEMMs read
//   r = dz - c0 with c0 = bf16(their mean), and c0 sum_k W_k (dhidden) and sum_i c0_i h_i (each dweight row) are
//   added in fp32; c0 = 0 in every other row.
constexpr float kCorrFrac = 1.f / 256.f;
constexpr int kCorrCap = 2 * 256 + 2;  // 2 / kCorrFrac + the label + 1 (rounding of the bound)
constexpr float kFlat = 1.0625f;

struct RowJob {
  float* z;              // [V] fp32 logits of the row (before bias / temperature); overwritten with dz if grads
                         // (with exp(z - max) only, when dz16 is set and keep32 is not)
  const float* bias;     // [V] fp32 or nullptr
  int64_t vocab;
  float inv_t;           // 1 / temperature
  bool scale;            // bias != nullptr || inv_t != 1
  int64_t label;
  bool grads;            // write dz into z
  float coef;            // grad_logp / temperature
  at::BFloat16* dz16;    // [V] bf16 dz (bf16 inputs) or nullptr; may be z itself (written behind the reads)
  bool keep32;           // also keep the fp32 dz in z (the bias gradient reads it)
  bool entropy;
  int32_t* corr_k;       // [kCorrCap] with dz16: vocabulary index of each corrected entry
  float* corr_v;         // [kCorrCap] r - bf16(r) there
  int32_t* corr_n;       // how many
  float* offset;         // with dz16: c0 of the row (0 unless flat); dz16 holds bf16(dz - c0)
};
struct RowOut {
  float max, log_sum, logp, entropy;
};

// A row's results from its max m, s = sum exp(z - m), t = sum exp(z - m) (z - m) and the label's scaled logit.
inline RowOut row_result(float m, float s, float t, float picked, bool entropy) {
  const float log_sum = std::log(s);
  return {m, log_sum, (picked - m) - log_sum, entropy ? log_sum - t / s : 0.f};
}

struct GradSplit {
  float c0, thr;  // the row's offset and correction threshold
};

// e_label = exp(z_label - m), alpha = -coef / s, at_label = dz at the label, m2 the largest non-label logit.
inline GradSplit grad_split(float e_label, float alpha, float at_label, float coef, float m2, float m, float s,
                            int64_t vocab) {
  const float e2 = m2 > -std::numeric_limits<float>::infinity() ? std::exp(m2 - m) : 0.f;
  float c0 = 0.f;
  if (vocab > 1) {
    const float mean = (s - e_label) / static_cast<float>(vocab - 1);  // of the non-label exp(z - m)
    if (e2 <= kFlat * mean) c0 = bf16_round(alpha * mean);
  }
  // an upper bound of max_k |dz_k - c0|: non-label dz and c0 share their sign
  const float big = std::max(std::fabs(at_label - c0), std::max(std::fabs(coef) * e2 / s, std::fabs(c0)));
  return {c0, kCorrFrac * big};
}

// Records entry k (dz value v) for the fp32 correction; the last slot is kept for the label.
inline void corr_push(const RowJob& j, int64_t k, float v) {
  const float r = v - bf16_round(v);
  const int32_t c = *j.corr_n;
  if (r != 0.f && c < kCorrCap - 1) {
    j.corr_k[c] = static_cast<int32_t>(k);
    j.corr_v[c] = r;
    *j.corr_n = c + 1;
  }
}

// The label's entry replaces the one the sweep may have recorded there (with the softmax term alone).
inline void corr_label(const RowJob& j, float at_label) {
  int32_t c = *j.corr_n;
  for (int32_t q = 0; q < c; ++q) {
    if (j.corr_k[q] == j.label) {
      j.corr_k[q] = j.corr_k[c - 1];
      j.corr_v[q] = j.corr_v[c - 1];
      --c;
      break;
    }
  }
  const float r = at_label - bf16_round(at_label);
  if (r != 0.f) {
    j.corr_k[c] = static_cast<int32_t>(j.label);
    j.corr_v[c] = r;
    ++c;
  }
  *j.corr_n = c;
}

// After a row's sweep, its label's entry: the bf16 dz there (d16, when kept) = bf16(at_label - c0) and, with
// corrections, the label's correction and the row's offset c0.
inline void label_entry(const RowJob& j, uint16_t* d16, float at_label, float c0, bool corr) {
  if (d16) d16[j.label] = bf16_bits(at_label - c0);
  if (corr) {
    corr_label(j, at_label - c0);
    *j.offset = c0;
  }
}

RowOut row_scalar(const RowJob& j) {
  float* z = j.z;
  const int64_t n = j.vocab;
  const bool corr = j.grads && j.corr_n != nullptr;
  float m = -std::numeric_limits<float>::infinity(), m2 = m;
  for (int64_t k = 0; k < n; ++k) {
    float v = z[k];
    if (j.scale) {
      v = (v + (j.bias ? j.bias[k] : 0.f)) * j.inv_t;
      z[k] = v;
    }
    m = std::max(m, v);
    if (corr && k != j.label) m2 = std::max(m2, v);
  }
  const float picked = z[j.label];
  float s = 0.f, t = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    const float d = z[k] - m;
    const float e = std::exp(d);
    s += e;
    if (j.entropy) t += e * d;
    if (j.grads) z[k] = e;
  }
  const RowOut out = row_result(m, s, t, picked, j.entropy);
  if (j.grads) {
    const float alpha = -j.coef / s;
    const float at_label = z[j.label] * alpha + j.coef;
    const GradSplit sp = corr ? grad_split(z[j.label], alpha, at_label, j.coef, m2, m, s, n) : GradSplit{0.f, 0.f};
    const float c0 = sp.c0, thr = sp.thr;
    uint16_t* d16 = reinterpret_cast<uint16_t*>(j.dz16);
    if (!d16 || j.keep32) {
      for (int64_t k = 0; k < n; ++k) z[k] *= alpha;
      z[j.label] = at_label;
      if (d16) {
        for (int64_t k = 0; k < n; ++k) {
          const float r = z[k] - c0;
          d16[k] = bf16_bits(r);
          if (corr && std::fabs(r) > thr) corr_push(j, k, r);
        }
      }
    } else {
      // d16 may be z itself: blocks through local copies (memcpy), each written behind what was read
      constexpr int64_t B = 64;
      float in[B];
      uint16_t res[B];
      for (int64_t k0 = 0; k0 < n; k0 += B) {
        const int64_t cnt = std::min(B, n - k0);
        std::memcpy(in, z + k0, cnt * sizeof(float));
        for (int64_t q = 0; q < cnt; ++q) {
          const float r = in[q] * alpha - c0;
          res[q] = bf16_bits(r);
          if (corr && std::fabs(r) > thr) corr_push(j, k0 + q, r);
        }
        std::memcpy(d16 + k0, res, cnt * sizeof(uint16_t));
      }
    }
    label_entry(j, d16, at_label, c0, corr);
  }
  return out;
}

#if GRAO_X86

GRAO_AVX512 inline __m512 exp_avx512(__m512 x) {
  // exp(x) for x <= 0 (x - rowmax); below -104 the result is 0 (as expf's underflow), NaN propagates.
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);  // max_ps returns its second operand when one is NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split hi + lo (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

GRAO_AVX512 inline __m256i to_bf16_avx512(__m512 v) {
  // round to nearest even: (u + 0x7fff + ((u >> 16) & 1)) >> 16, NaN kept a (quiet) NaN
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

// One pass over a row's (scaled) logits z[0, n): sum of e = exp(z - m) and, when asked, of e * (z - m) (the
// entropy's numerator); with ``store`` e is written over z (the fused row turns it into dz in place), with ``half``
// e goes there in fp16 (the compact tile). Shared by the fused row kernel, the forward-only online softmax
// (fold_avx512) and the compact tile's fold (fold_store_avx512).
GRAO_AVX512 inline void exp_sum_avx512(float* z, int64_t n, float m, bool entropy, bool store, float& sum,
                                       float& dsum, uint16_t* half = nullptr) {
  const int64_t full = n / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - full)) - 1u);
  const __m512 vmax = _mm512_set1_ps(m);
  __m512 vs = _mm512_setzero_ps(), vt2 = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mk = k < full ? static_cast<__mmask16>(0xffff) : tail;
    const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, z + k), vmax);
    const __m512 e = _mm512_maskz_mov_ps(mk, exp_avx512(d));
    vs = _mm512_add_ps(vs, e);
    if (entropy) vt2 = _mm512_fmadd_ps(e, _mm512_maskz_mov_ps(mk, d), vt2);
    if (store) _mm512_mask_storeu_ps(z + k, mk, e);
    if (half) _mm256_mask_storeu_epi16(half + k, mk, _mm512_cvtps_ph(e, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  sum = _mm512_reduce_add_ps(vs);
  dsum = entropy ? _mm512_reduce_add_ps(vt2) : 0.f;
}

GRAO_AVX512 RowOut row_avx512(const RowJob& j) {
  float* z = j.z;
  const int64_t n = j.vocab;
  const int64_t full = n / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - full)) - 1u);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 vt = _mm512_set1_ps(j.inv_t);
  __m512 vm = ninf;
  // corrections need the largest non-label logit too: the label is taken out of the max pass (-inf there) and
  // added after it
  const bool corr = j.grads && j.corr_n != nullptr;
  const float raw_label = z[j.label];
  if (corr) z[j.label] = -std::numeric_limits<float>::infinity();
  if (j.scale) {
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 mk = k < full ? static_cast<__mmask16>(0xffff) : tail;
      __m512 v = _mm512_maskz_loadu_ps(mk, z + k);
      if (j.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, j.bias + k));
      v = _mm512_mul_ps(v, vt);
      _mm512_mask_storeu_ps(z + k, mk, v);
      vm = _mm512_mask_max_ps(vm, mk, vm, v);
    }
  } else {
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 mk = k < full ? static_cast<__mmask16>(0xffff) : tail;
      vm = _mm512_mask_max_ps(vm, mk, vm, _mm512_maskz_loadu_ps(mk, z + k));
    }
  }
  float m = _mm512_reduce_max_ps(vm), m2 = m;
  if (corr) {
    const float lv = j.scale ? (raw_label + (j.bias ? j.bias[j.label] : 0.f)) * j.inv_t : raw_label;
    z[j.label] = lv;
    m = (lv > m2 || lv != lv) ? lv : m2;  // a NaN label logit propagates, as through the max pass
  }
  const float picked = z[j.label];
  float s, t;
  exp_sum_avx512(z, n, m, j.entropy, j.grads, s, t);
  const RowOut out = row_result(m, s, t, picked, j.entropy);
  if (j.grads) {
    // one sweep: dz = e * alpha (+ coef at the label), written as fp32 in place and / or as bf16
    const float a = -j.coef / s;
    const float at_label = z[j.label] * a + j.coef;
    const __m512 alpha = _mm512_set1_ps(a);
    uint16_t* d16 = reinterpret_cast<uint16_t*>(j.dz16);
    const bool f32 = !d16 || j.keep32;
    // d16 may be z itself: the bf16 store of block k lands on bytes [2k, 2k + 32), all read by then
    const GradSplit sp = corr ? grad_split(z[j.label], a, at_label, j.coef, m2, m, s, n) : GradSplit{0.f, 0.f};
    const __m512 thr = _mm512_set1_ps(sp.thr), c0 = _mm512_set1_ps(sp.c0);
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 mk = k < full ? static_cast<__mmask16>(0xffff) : tail;
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, z + k), alpha);
      if (f32) _mm512_mask_storeu_ps(z + k, mk, v);
      const __m512 r = _mm512_sub_ps(v, c0);
      if (d16) _mm256_mask_storeu_epi16(d16 + k, mk, to_bf16_avx512(r));
      if (corr) {
        __mmask16 big = _mm512_mask_cmp_ps_mask(mk, _mm512_abs_ps(r), thr, _CMP_GT_OQ);
        if (big) {  // rare: at most 2 / kCorrFrac + 1 entries per row
          alignas(64) float vals[16];
          _mm512_store_ps(vals, r);
          for (; big; big &= big - 1) {
            const int q = __builtin_ctz(big);
            corr_push(j, k + q, vals[q]);
          }
        }
      }
    }
    if (f32) z[j.label] = at_label;
    label_entry(j, d16, at_label, sp.c0, corr);
  }
  return out;
}
#endif

// Forward only (no gradients): the softmax statistics of a row folded in one block of its logits at a time, an
// online softmax (M. Milakov, N. Gimelshein, "Online normalizer calculation for softmax", 2018): the running max m,
// s = sum exp(z - m) and, for the entropy, t = sum exp(z - m) (z - m), rescaled when a block raises the max. z is
// the block's raw logits, scaled in place by (z + bias) / T when `scale`.
struct RowStats {
  float m, s, t;
};

inline void stats_rescale(RowStats& st, float bm) {
  if (!(bm > st.m)) return;  // also keeps m when bm is NaN: its exp(z - m) below are NaN and carry it into s
  if (st.m == -std::numeric_limits<float>::infinity()) {
    st.s = st.t = 0.f;
  } else {
    const float f = std::exp(st.m - bm);
    st.t = f * (st.t + (st.m - bm) * st.s);
    st.s *= f;
  }
  st.m = bm;
}

// A row's statistics from those of its blocks (each folded from m = -inf), merged in block order: the same sums
// whichever thread folded which block. A block of -inf logits (m = -inf) adds nothing; a NaN max carries NaN into s.
inline RowStats merge_blocks(const RowStats* b, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < n; ++k) m = std::max(m, b[k].m);
  float s = 0.f, t = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    if (b[k].m == -std::numeric_limits<float>::infinity()) continue;
    const float f = std::exp(b[k].m - m);
    s += b[k].s * f;
    t += f * (b[k].t + (b[k].m - m) * b[k].s);
  }
  return {m, s, t};
}

void fold_scalar(float* z, int64_t n, const float* bias, float inv_t, bool scale, bool entropy, RowStats& st) {
  float bm = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < n; ++k) {
    if (scale) z[k] = (z[k] + (bias ? bias[k] : 0.f)) * inv_t;
    bm = std::max(bm, z[k]);
  }
  if (bm == -std::numeric_limits<float>::infinity()) return;  // a block of -inf logits adds nothing
  stats_rescale(st, bm);
  float s = 0.f, t = 0.f;
  for (int64_t k = 0; k < n; ++k) {
    const float d = z[k] - st.m;
    const float e = std::exp(d);
    s += e;
    if (entropy) t += e * d;
  }
  st.s += s;
  st.t += t;
}

#if GRAO_X86
// A block of logits z[0, n) scaled in place by (z + bias) / T when `scale`, and its max, leaving out entry `skip`
// (-1: none).
GRAO_AVX512 inline float scale_max_avx512(float* z, int64_t n, const float* bias, float inv_t, bool scale,
                                          int64_t skip) {
  const int64_t full = n / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - full)) - 1u);
  const __m512 vt = _mm512_set1_ps(inv_t);
  __m512 vm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mk = k < full ? static_cast<__mmask16>(0xffff) : tail;
    __m512 v = _mm512_maskz_loadu_ps(mk, z + k);
    if (scale) {
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + k));
      v = _mm512_mul_ps(v, vt);
      _mm512_mask_storeu_ps(z + k, mk, v);
    }
    const __mmask16 mm = skip >= k && skip < k + 16 ? static_cast<__mmask16>(mk & ~(1u << (skip - k))) : mk;
    vm = _mm512_mask_max_ps(vm, mm, vm, v);
  }
  return _mm512_reduce_max_ps(vm);
}

GRAO_AVX512 void fold_avx512(float* z, int64_t n, const float* bias, float inv_t, bool scale, bool entropy,
                             RowStats& st) {
  const float bm = scale_max_avx512(z, n, bias, inv_t, scale, -1);
  if (bm == -std::numeric_limits<float>::infinity()) return;  // a block of -inf logits adds nothing
  stats_rescale(st, bm);
  float s, t;
  exp_sum_avx512(z, n, st.m, entropy, false, s, t);
  st.s += s;
  st.t += t;
}
#endif

}  // namespace
