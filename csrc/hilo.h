// The bf16 weight gradient's accumulator: the bf16 output (high part) plus an int8 residual, updated per tile.
#pragma once

#include "common.h"
#include "rows.h"  // to_bf16_avx512

namespace {

// bf16 dW as a two-term sum, hi (the bf16 output itself) + lo (an int8 residual in units of ulp(hi) / 256):
// (hi, lo) <- hi + lo + c + u, the sum s formed in fp32, hi = bf16(s), lo = round((s - hi) / (ulp(hi) / 256)), where
// s - hi is exact and |lo| <= 128 (clamped to 127: a 2^-8 ulp loss on an exact tie). hi + lo carries 16
// significant bits, its rounding (<= 2^-9 ulp(hi) per update, ~2^-17 relative) is the only loss, so after the last
// tile hi is the fp32 sum rounded once to bf16, as eager's bf16 matmul; the accumulator costs 1 byte per weight
// (an fp32 [V, D] one would cost 4, a bf16 residual 2). u [dim] is added to every row (nullptr: none).
inline float lo_unit(float hi) {  // ulp(hi) / 256 = 2^(exponent(hi) - 15); 0 for 0, inf, NaN
  return hi == 0.f || !std::isfinite(hi) ? 0.f : std::ldexp(1.f, std::ilogb(hi) - 15);
}

void acc_hilo_scalar(uint16_t* hi, int8_t* lo, const float* c, const float* u, int64_t rows, int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < dim; ++d) {
      const int64_t k = r * dim + d;
      c10::BFloat16 h;
      h.x = hi[k];
      const float hf = static_cast<float>(h);
      const float sum = (hf + static_cast<float>(lo[k]) * lo_unit(hf)) + c[k] + (u ? u[d] : 0.f);
      c10::BFloat16 nh;
      nh.x = bf16_bits(sum);
      const float nf = static_cast<float>(nh), unit = lo_unit(nf);
      const float q = unit == 0.f ? 0.f : std::nearbyint((sum - nf) / unit);
      hi[k] = nh.x;
      lo[k] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, q)));
    }
  }
}

#if GRAO_X86
// x * 2^(+-(exponent(h) - 15)), i.e. x times or over ulp(h) / 256, exact (VSCALEFPS: no division); 0 where h is 0,
// inf or NaN, as lo_unit
GRAO_AVX512 inline __m512 scale_by_unit(__m512 x, __m512 h, bool divide) {
  const __mmask16 ok = static_cast<__mmask16>(~_mm512_fpclass_ps_mask(h, 0x9F));  // not +-0, +-inf, NaN
  const __m512 e = _mm512_sub_ps(_mm512_getexp_ps(h), _mm512_set1_ps(15.f));
  return _mm512_maskz_scalef_ps(ok, x, divide ? _mm512_sub_ps(_mm512_setzero_ps(), e) : e);
}

GRAO_AVX512 void acc_hilo_avx512(uint16_t* hi, int8_t* lo, const float* c, const float* u, int64_t rows,
                                 int64_t dim) {
  const int64_t full = dim / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (dim - full)) - 1u);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 mk = d < full ? static_cast<__mmask16>(0xffff) : tail;
      const int64_t k = r * dim + d;
      const __m512 h = from_bf16_avx512(_mm256_maskz_loadu_epi16(mk, hi + k));
      const __m512 l = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, lo + k)));
      __m512 sum = _mm512_add_ps(_mm512_add_ps(scale_by_unit(l, h, false), h), _mm512_maskz_loadu_ps(mk, c + k));
      if (u) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mk, u + d));
      const __m256i nh = to_bf16_avx512(sum);
      const __m512 nf = from_bf16_avx512(nh);
      const __m512 q = scale_by_unit(_mm512_sub_ps(sum, nf), nf, true);  // (sum - nf) / unit, exact
      __m512i qi = _mm512_cvt_roundps_epi32(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      qi = _mm512_max_epi32(_mm512_set1_epi32(-127), _mm512_min_epi32(_mm512_set1_epi32(127), qi));
      _mm256_mask_storeu_epi16(hi + k, mk, nh);
      _mm_mask_storeu_epi8(lo + k, mk, _mm512_cvtepi32_epi8(qi));
    }
  }
}
#endif

}  // namespace
