// bf16 passes with gradients: the tile's logits folded block by block and kept as fp16 exponentials (the
// compact tile), and the row's dz sweep from them.
#pragma once

#include "rows.h"

namespace {

#if GRAO_X86
// ---- bf16 with gradients: the tile's logits kept as 16-bit exponentials (the "compact" tile) ----
// The fp32 [tile x V] logits buffer costs 4 bytes per logit and two trips through memory (the GEMM writes it, the
// row kernel reads it back). bf16 tiles instead fold each cache-sized block of logits, right after its GEMM and
// while it is in cache, into the row's running softmax statistics (as the forward-only path does) and keep only
// e = exp(z - bm) in fp16 (bm: the block's max, kept per row and block): 2 bytes per logit, so the same buffer
// holds twice the rows, and every per-tile cost (the dW hi / lo update, packing W) is paid half as often. The dz
// sweep then reads e back: dz = alpha exp(bm - m) e (+ g/T at the label), written in place as bf16.
// Accuracy: e lies in (0, 1] and fp16 keeps it to 2^-11 relative (below 2^-14, to 2^-25 absolute: at most
// 64 * 2^-25 of each block's largest probability per block, ~2e-6 of the row in all), a quarter of the bf16
// rounding that every dz then takes, as eager's backward does; s, the log-prob and the entropy come from the fp32
// logits, and the entries that get an fp32 correction (kCorrFrac: the label and the few probable tokens) are
// recomputed exactly (an fp32 dot of the row of h and of W) rather than read from e.

// One block of a row: scales z in place (bias, 1 / T), stores x = fp16(exp(z - bm)) and the block's statistics
// st = {bm, sum of exp(z - bm), sum of exp(z - bm) (z - bm)} (merge_blocks). label: the label's index in the block,
// or -1; when present its scaled logit goes to picked and it is left out of m2, the largest non-label logit
// (grad_split's flat-row test).
GRAO_AVX512 void fold_store_avx512(float* z, int64_t n, const float* bias, float inv_t, bool scale, bool entropy,
                                   int64_t label, uint16_t* x, RowStats& st, float& m2, float& picked) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float nl = scale_max_avx512(z, n, bias, inv_t, scale, label);  // the largest non-label logit
  float bm = nl;
  if (label >= 0) {
    const float lv = z[label];
    picked = lv;
    bm = (lv > nl || lv != lv) ? lv : nl;  // a NaN label logit propagates, as in row_avx512
  }
  m2 = std::max(m2, nl);
  st = RowStats{bm, 0.f, 0.f};
  if (bm == ninf) {  // every logit of the block is -inf (a -inf bias): e = 0, nothing to fold
    std::memset(x, 0, n * sizeof(uint16_t));
    return;
  }
  exp_sum_avx512(z, n, bm, entropy, false, st.s, st.t, x);
}

// fp32 dot of a bf16 row of h and a bf16 row of W (the exact recomputation of a corrected entry's logit)
GRAO_AVX512 float dot_bf16_avx512(const uint16_t* a, const uint16_t* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mk = k + 16 <= n ? static_cast<__mmask16>(0xffff)
                                     : static_cast<__mmask16>((1u << (n - k)) - 1u);
    const __m512 va = from_bf16_avx512(_mm256_maskz_loadu_epi16(mk, a + k));
    const __m512 vb = from_bf16_avx512(_mm256_maskz_loadu_epi16(mk, b + k));
    acc = _mm512_fmadd_ps(va, vb, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

struct CompactRow {
  const RowStats* blocks;  // [ceil(V / cols)] the blocks' statistics (their maxes)
  int64_t cols;         // columns per block
  float m, alpha, c0, thr;
  const uint16_t* h;    // [D] the token's hidden state, w [V, D]: the exact recomputation of corrected entries
  const uint16_t* w;
  int64_t dim;
};

// The dz sweep of one row of a compact tile: x holds e (fp16) and receives bf16(dz - c0) in place; entries above the
// correction threshold (the label's excepted: the caller writes it) are recomputed exactly and recorded (corr_push).
GRAO_AVX512 void dz_compact_avx512(uint16_t* x, const RowJob& j, const CompactRow& c) {
  const int64_t n = j.vocab;
  const __m512 c0 = _mm512_set1_ps(c.c0), thr = _mm512_set1_ps(c.thr);
  for (int64_t v0 = 0, b = 0; v0 < n; v0 += c.cols, ++b) {
    const int64_t nb = std::min(c.cols, n - v0), full = nb / 16 * 16;
    const __mmask16 tail = static_cast<__mmask16>((1u << (nb - full)) - 1u);
    const float bm = c.blocks[b].m;
    const __m512 f = _mm512_set1_ps(bm == -std::numeric_limits<float>::infinity() ? 0.f
                                                                                  : c.alpha * std::exp(bm - c.m));
    uint16_t* xb = x + v0;
    for (int64_t k = 0; k < nb; k += 16) {
      const __mmask16 mk = k < full ? static_cast<__mmask16>(0xffff) : tail;
      const __m512 r = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, xb + k)), f), c0);
      _mm256_mask_storeu_epi16(xb + k, mk, to_bf16_avx512(r));
      __mmask16 big = _mm512_mask_cmp_ps_mask(mk, _mm512_abs_ps(r), thr, _CMP_GT_OQ);
      for (; big; big &= big - 1) {  // rare: at most 2 / kCorrFrac + 1 entries per row
        const int64_t kk = v0 + k + __builtin_ctz(big);
        if (kk == j.label) continue;
        float z = dot_bf16_avx512(c.h, c.w + kk * c.dim, c.dim);
        if (j.scale) z = (z + (j.bias ? j.bias[kk] : 0.f)) * j.inv_t;
        const float rv = c.alpha * std::exp(z - c.m) - c.c0;
        x[kk] = bf16_bits(rv);
        corr_push(j, kk, rv);
      }
    }
  }
}
#endif

}  // namespace
