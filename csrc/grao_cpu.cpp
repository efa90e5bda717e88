// Native CPU pass of grao_kernels: per-token log-probs of labels from hidden states and the lm_head,
// optionally with the input gradients for known per-token loss gradients, without [tokens x vocab] logits.
//
// Built on first use by grao_kernels/cpu_native.py (torch.utils.cpp_extension.load) and called from the
// linear_logprob and fused_linear_grao torch.library ops; semantics are those of grao_kernels/_chunked.py
// and are tested against grao_kernels.reference (tests/test_native_cpu.py).
//
// Design (the chunk-the-lm_head-and-compute-grads-in-the-forward idea is Liger-Kernel's
// fused_linear_cross_entropy; recomputing logits per tile instead of storing them is ml-cross-entropy's
// "Cut Your Losses"; this is our own code):
//   for each tile of TM active tokens (TM chosen by the caller so that one fp32 [TM x V] buffer stays small):
//     Z   = h_tile @ W^T                    one GEMM, fp32 output (bf16 inputs: bf16 x bf16 -> fp32, through
//                                           oneDNN's brgemm ukernel on AMX CPUs, else MKL's bf16 GEMM)
//     per row, threads over rows:           bias, 1/temperature, row max, exp-sum (log-sum-exp), the log-prob,
//                                           then in place dz = g * (onehot - softmax) while the row
//                                           (V floats, 125 KiB at V = 32000) is still in L2; bf16 inputs: dz
//                                           rounded to bf16 (as eager's backward) over the start of the row's
//                                           own fp32 slot, plus the fp32 corrections of its few large entries
//                                           and, in flat rows, an offset (see kCorrFrac)
//                                           bf16 with gradients on AMX CPUs (the "compact" tile, twice the rows):
//                                           Z and the row statistics block by block in cache, only fp16
//                                           exp(z - block max) kept, then per row the dz sweep (fold_store_avx512)
//     dh_tile = dz @ W                      GEMM (fp32 accumulation), corrections added, scattered into dh rows
//     dW     += dz^T @ h_tile               fp32: GEMM with beta = 1 into dW itself (the BLAS splits it over
//                                           threads by output block: no atomics, no per-thread copies).
//                                           bf16: threads over ~1 MiB vocabulary blocks of dW, each a GEMM into
//                                           the thread's fp32 block buffer (beta = 0; brgemm: 128 rows at a
//                                           time), its corrections, then a compensated add into dW = bf16 hi (the
//                                           output) + int8 lo (acc_hilo)
//     db     += column sums of dz           threads over vocabulary blocks
// All workspaces (Z, h_tile, dh_tile, the corrections, one dW block per thread; the int8 residual of bf16 dW) are
// allocated once per call, sized by the tile, the cache or W, never by N. Each tile's FLOPs are those of the
// three GEMMs (6 x tile x D x V for the fused loss): no logits are recomputed.
//
// Vector code: one AVX-512 row kernel compiled with a function-level target attribute and chosen at run
// time (__builtin_cpu_supports), plus a scalar kernel with the same semantics; the file itself is compiled
// without -march flags, so the extension loads on any x86-64 (or other) CPU. The exp is the classic
// Cody-Waite range reduction x = n ln2 + r with a degree-6 polynomial for exp(r) on |r| <= ln2/2 (the
// scheme of Cephes' expf, S. L. Moshier), scaled by 2^n with VSCALEFPS.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <dlfcn.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GRAO_X86 1
#else
#define GRAO_X86 0
#endif

namespace {

// MKL's bf16 x bf16 -> fp32 GEMM (AMX / AVX512_BF16 kernels), exported by the MKL that torch's x86 builds link
// statically; looked up at run time, so a torch built without it (other BLAS, other CPUs) takes the ATen route.
// Row-major CBLAS constants (CblasRowMajor, CblasNoTrans, CblasTrans).
using bf16_gemm_fn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                              float*, int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

bf16_gemm_fn mkl_bf16_gemm() {
  static const bf16_gemm_fn fn = reinterpret_cast<bf16_gemm_fn>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
  return fn;
}

// A workspace mapped straight from the kernel and unmapped when the tensor dies: its pages are resident only
// while the call uses them, whatever the allocator's mmap threshold (glibc raises it to the size of freed
// mappings, up to 32 MiB, after which such buffers came from the heap and stayed in the RSS between calls).
at::Tensor mapped_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = std::max<size_t>(1, static_cast<size_t>(numel) * c10::elementSize(dtype));
  // From 2 MiB on: aligned to 2 MiB and advised as transparent huge pages (where THP is "madvise" or "always"),
  // so that first touch costs one fault per 2 MiB rather than per 4 KiB page: with 4 KiB pages, mapping the
  // gradients measured 0.05x (N = 4096) to 0.11x (N = 1024) of the fp32 matmul floor slower than reusing heap blocks.
  constexpr size_t kHuge = size_t{2} << 20;
  const bool huge = bytes >= kHuge;
  const size_t total = huge ? bytes + kHuge : bytes;
  void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(base != MAP_FAILED, "grao_cpu: could not map a ", bytes, "-byte workspace");
  char* p = static_cast<char*>(base);
  if (huge) {
    p += (kHuge - reinterpret_cast<uintptr_t>(p) % kHuge) % kHuge;
#ifdef MADV_HUGEPAGE
    madvise(base, total, MADV_HUGEPAGE);  // a hint: without THP the pages stay 4 KiB
#endif
  }
  return at::from_blob(p, sizes, [base, total](void*) { munmap(base, total); }, at::TensorOptions().dtype(dtype));
}

// bf16 dz. The GEMMs read dz rounded to bf16, as eager's backward does; two cheap terms keep that rounding from
// reaching dhidden and dweight where it would show:
// * corrections: the entries with |r| > kCorrFrac * (the row's max |r|), r = dz - c0 (below) -- the label's
//   g/T (1 - p) and the few probable tokens, at most 2 / kCorrFrac + 1 of them (the non-label |r| sum to at most
//   twice the label's) -- also enter both gradients with the part bf16 rounded off, r - bf16(r), as fp32 rank-1
//   updates (O(D) each), so the rounding error is left only on the small entries. Without them a row whose
//   gradient is dominated by one large entry carries that entry's rounding (2^-9 relative) into dhidden
//   (d = 1: up to one ulp with the final rounding) and dweight, where the chunked path's dweight (fp32 dz) is
//   within half an ulp (test_fuzz_native_against_chunked).
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

inline uint16_t bf16_bits(float x) {
  return c10::BFloat16(x).x;  // round to nearest even, as torch's .to(torch.bfloat16)
}

inline float bf16_round(float x) { return static_cast<float>(c10::BFloat16(x)); }

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
  RowOut out;
  out.max = m;
  out.log_sum = std::log(s);
  out.logp = (picked - m) - out.log_sum;
  out.entropy = j.entropy ? out.log_sum - t / s : 0.f;
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
    if (d16) d16[j.label] = bf16_bits(at_label - c0);
    if (corr) {
      corr_label(j, at_label - c0);
      *j.offset = c0;
    }
  }
  return out;
}

#if GRAO_X86
#define GRAO_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

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
// entropy's numerator); with ``store`` e is written over z (the fused row turns it into dz in place). Shared
// by the fused row kernel and the forward-only online softmax (fold_avx512).
GRAO_AVX512 inline void exp_sum_avx512(float* z, int64_t n, float m, bool entropy, bool store, float& sum,
                                       float& dsum) {
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
  RowOut out;
  out.max = m;
  out.log_sum = std::log(s);
  out.logp = (picked - m) - out.log_sum;
  out.entropy = j.entropy ? out.log_sum - t / s : 0.f;
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
    if (d16) d16[j.label] = bf16_bits(at_label - sp.c0);
    if (corr) {
      corr_label(j, at_label - sp.c0);
      *j.offset = sp.c0;
    }
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
GRAO_AVX512 void fold_avx512(float* z, int64_t n, const float* bias, float inv_t, bool scale, bool entropy,
                             RowStats& st) {
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
    vm = _mm512_mask_max_ps(vm, mk, vm, v);
  }
  const float bm = _mm512_reduce_max_ps(vm);
  if (bm == -std::numeric_limits<float>::infinity()) return;  // a block of -inf logits adds nothing
  stats_rescale(st, bm);
  float s, t;
  exp_sum_avx512(z, n, st.m, entropy, false, s, t);
  st.s += s;
  st.t += t;
}
#endif

bool cpu_has_avx512() {
#if GRAO_X86 && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

// Row-major C [m, n] (+)= op(A) op(B) in fp32; A, B fp32 or bf16 (fp32 accumulation in both). fp32 and the
// bf16 fallback go through ATen (MKL / oneDNN); bf16 with MKL's bf16 GEMM present calls it directly, which
// writes fp32 results from bf16 inputs without a bf16 rounding of the products or the result.
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const at::Tensor& a, const at::Tensor& b,
             float beta, const at::Tensor& c, bool direct) {
  // a: [m, k] (or [k, m] when ta), b: [k, n] (or [n, k] when tb), both with unit inner stride; c fp32 [m, n].
  if (a.scalar_type() == at::kBFloat16 && direct) {
    mkl_bf16_gemm()(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, static_cast<int>(m),
                    static_cast<int>(n), static_cast<int>(k), 1.f,
                    reinterpret_cast<const uint16_t*>(a.data_ptr()), static_cast<int>(a.stride(0)),
                    reinterpret_cast<const uint16_t*>(b.data_ptr()), static_cast<int>(b.stride(0)), beta,
                    c.data_ptr<float>(), static_cast<int>(c.stride(0)));
    return;
  }
  const at::Tensor opa = ta ? a.t() : a, opb = tb ? b.t() : b;
  if (a.scalar_type() == at::kFloat) {
    if (beta == 0.f) {
      at::mm_out(const_cast<at::Tensor&>(c), opa, opb);
    } else {
      const_cast<at::Tensor&>(c).addmm_(opa, opb);
    }
    return;
  }
  // bf16 without MKL's bf16 GEMM: fp32 GEMMs on fp32 copies of ~1024-wide slices along the largest of m, n, k
  // (the vocabulary), so the products are exact and accumulated in fp32 as with MKL's bf16 GEMM (ATen's bf16
  // matmul would round its result to bf16), in memory of the slices only.
  const at::Tensor A = opa, B = opb;
  at::Tensor C = c;
  constexpr int64_t kSlice = 1024;
  const auto mm_into = [beta](at::Tensor& out, const at::Tensor& a32, const at::Tensor& b32, bool first) {
    if (first && beta == 0.f) {
      at::mm_out(out, a32, b32);
    } else {
      out.addmm_(a32, b32);
    }
  };
  if (k >= m && k >= n) {  // slices of the reduction: each adds into C
    for (int64_t k0 = 0; k0 < k; k0 += kSlice) {
      const int64_t kb = std::min(kSlice, k - k0);
      mm_into(C, A.narrow(1, k0, kb).to(at::kFloat), B.narrow(0, k0, kb).to(at::kFloat), k0 == 0);
    }
  } else if (n >= m) {  // column slices of C
    const at::Tensor a32 = A.to(at::kFloat);
    for (int64_t n0 = 0; n0 < n; n0 += kSlice) {
      const int64_t nb = std::min(kSlice, n - n0);
      at::Tensor cs = C.narrow(1, n0, nb);
      mm_into(cs, a32, B.narrow(1, n0, nb).to(at::kFloat), true);
    }
  } else {  // row slices of C
    const at::Tensor b32 = B.to(at::kFloat);
    for (int64_t m0 = 0; m0 < m; m0 += kSlice) {
      const int64_t mb = std::min(kSlice, m - m0);
      at::Tensor cs = C.narrow(0, m0, mb);
      mm_into(cs, A.narrow(0, m0, mb).to(at::kFloat), b32, true);
    }
  }
}

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
GRAO_AVX512 inline __m512 from_bf16_avx512(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

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
  const int64_t full = n / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - full)) - 1u);
  const __m512 vt = _mm512_set1_ps(inv_t);
  const float ninf = -std::numeric_limits<float>::infinity();
  __m512 vm = _mm512_set1_ps(ninf);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mk = k < full ? static_cast<__mmask16>(0xffff) : tail;
    __m512 v = _mm512_maskz_loadu_ps(mk, z + k);
    if (scale) {
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + k));
      v = _mm512_mul_ps(v, vt);
      _mm512_mask_storeu_ps(z + k, mk, v);
    }
    const __mmask16 mm = label >= k && label < k + 16 ? static_cast<__mmask16>(mk & ~(1u << (label - k))) : mk;
    vm = _mm512_mask_max_ps(vm, mm, vm, v);
  }
  const float nl = _mm512_reduce_max_ps(vm);
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
  const __m512 vmax = _mm512_set1_ps(bm);
  __m512 vs = _mm512_setzero_ps(), vt2 = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mk = k < full ? static_cast<__mmask16>(0xffff) : tail;
    const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, z + k), vmax);
    const __m512 e = _mm512_maskz_mov_ps(mk, exp_avx512(d));
    vs = _mm512_add_ps(vs, e);
    if (entropy) vt2 = _mm512_fmadd_ps(e, _mm512_maskz_mov_ps(mk, d), vt2);
    _mm256_mask_storeu_epi16(x + k, mk, _mm512_cvtps_ph(e, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  st.s = _mm512_reduce_add_ps(vs);
  if (entropy) st.t = _mm512_reduce_add_ps(vt2);
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

// ---- bf16 GEMMs through oneDNN's brgemm ukernel (AMX) ----
// libtorch_cpu exports at::native::cpublas::brgemm, the oneDNN batch-reduce GEMM micro-kernel that PyTorch's CPU
// flash attention calls once per (query block, key block) (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp,
// which also pairs it with cpublas::pack and ends each thread's work with brgemm_release). Semantics, as declared
// in ATen/native/CPUBlas.h and implemented in ATen/native/CPUBlas.cpp: C[M, N] = A[M, K] B[K, N] (+ C if add_C),
// A bf16 row-major with leading dimension ld_a, C fp32 row-major (ld_c), fp32 accumulation of exact bf16 products;
// with is_vnni, B bf16 in the VNNI layout that cpublas::pack writes: pairs of consecutive K rows interleaved,
// element (k, n) at (k / 2) * 2 ld_b + 2 n + k % 2, ld_b one of 16, 32, 48, 64 (we use 64). Each thread JIT-compiles
// and caches one kernel per (M, N, K, ld_a, ld_b, ld_c, add_C) and holds the AMX tile state until brgemm_release.
// All three bf16 products of a tile run through it, B packed by this file as they need it (no packed copy of W is
// kept: 31 MiB at V = 32000, D = 512; the int8 residual of dW already takes half that).
// Against MKL's cblas_gemm_bf16bf16f32, on a 2-core Sapphire Rapids VM, one thread, N = 4096, D = 512, V = 32000,
// 256-row tiles, the same process alternating: Z = h W^T 250-280 ms per call instead of 475-500 (torch.mm's
// [4096 x 512] x [512 x 32000] bf16 floor: 190-220 ms), dh = dz W 210-240 instead of 230-250, the dW blocks
// 330-370 instead of 470-490 (of which the hi / lo update: ~175 either way).
//
// It is an internal ATen API: looked up by its (Itanium-mangled) name at run time, so a torch that lacks it or
// declares it differently still builds and loads this file and takes the MKL / ATen GEMMs; used only where
// cpublas::could_pack(bf16) holds (oneDNN enabled and AMX, the condition under which torch itself packs for it)
// and a one-time self-test on small integers confirms the B layout assumed here.
struct BrgemmApi {
  using gemm_t = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const c10::BFloat16*,
                          const c10::BFloat16*, float*, bool);
  gemm_t gemm = nullptr;
  void (*release)(bool) = nullptr;
  bool (*could_pack)(c10::ScalarType) = nullptr;
};
constexpr int64_t kLdb = 64;       // B's leading dimension (its column block) in every brgemm call
constexpr int64_t kBrgRows = 128;  // rows of A per call (tile rows for Z, vocabulary rows for dW)

// K of dh = dz W's calls (vocabulary rows): a chunk of W of ~640 KiB (640 rows at D = 512), packed by one thread.
inline int64_t dh_chunk(int64_t dim) { return std::max<int64_t>(32, std::min<int64_t>(8192, 327680 / dim) / 32 * 32); }

const BrgemmApi& brgemm_api() {
  static const BrgemmApi api = [] {
    BrgemmApi a;
    a.gemm = reinterpret_cast<BrgemmApi::gemm_t>(
        dlsym(RTLD_DEFAULT, "_ZN2at6native7cpublas6brgemmEllllllbPKN3c108BFloat16ES5_Pfb"));
    a.release = reinterpret_cast<void (*)(bool)>(dlsym(RTLD_DEFAULT, "_ZN2at6native7cpublas14brgemm_releaseEb"));
    a.could_pack = reinterpret_cast<bool (*)(c10::ScalarType)>(
        dlsym(RTLD_DEFAULT, "_ZN2at6native7cpublas10could_packEN3c1010ScalarTypeE"));
    if (!a.gemm || !a.release || !a.could_pack) a = BrgemmApi{};
    return a;
  }();
  return api;
}

// C[3, 40] = A[3, 34] B[34, 40] on small integers (exact in any summation order), B in the VNNI layout with
// ld_b = 64, once per process: the layout and the call convention are what this file assumes.
bool brgemm_selftest(const BrgemmApi& api) {
  constexpr int64_t M = 3, N = 40, K = 34;
  std::vector<c10::BFloat16> a(M * K), b(K / 2 * 2 * kLdb, c10::BFloat16(0.f));
  std::vector<float> c(M * N, -1.f);
  for (int64_t i = 0; i < M * K; ++i) a[i] = c10::BFloat16(static_cast<float>(i % 7) - 3.f);
  auto bval = [](int64_t k, int64_t n) { return static_cast<float>((k * 5 + n * 3) % 11) - 5.f; };
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b[(k / 2) * 2 * kLdb + 2 * n + k % 2] = c10::BFloat16(bval(k, n));
  try {
    api.gemm(M, N, K, K, kLdb, N, false, a.data(), b.data(), c.data(), true);
    api.release(true);
  } catch (const std::exception&) {
    return false;
  }
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      float ref = 0.f;
      for (int64_t k = 0; k < K; ++k) ref += static_cast<float>(a[i * K + k]) * bval(k, n);
      if (c[i * N + n] != ref) return false;
    }
  }
  return true;
}

// Whether the bf16 GEMMs of this call go through brgemm (isa bits 1 and 2 turn it off for tests). Checked per call:
// could_pack reads torch.backends.mkldnn's flag, which a user may change.
bool brgemm_ready() {
  const BrgemmApi& api = brgemm_api();
  if (!api.gemm || !cpu_has_avx512() || !api.could_pack(at::kBFloat16)) return false;
  static const bool ok = brgemm_selftest(api);
  return ok;
}

inline uint32_t bf16_pair(const uint16_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 16;
}

#if GRAO_X86
// In-register transpose of a 16 x 16 block of 32-bit elements (r[i] = row i in, column i out): the usual
// unpack-32, unpack-64, then two 128-bit-lane shuffle stages.
GRAO_AVX512 inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
    r[4 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xdd);
  }
}

// B of Z = h W^T for the vocabulary rows [v0, v0 + nb), nb <= 64: W^T's [D, nb] block in the VNNI layout, i.e. the
// 32-bit transpose of the rows read as D / 2 bf16 pairs: out[p * 64 + j] = (W[v0 + j, 2p], W[v0 + j, 2p + 1]); zero
// for j >= nb. D even. Packed per block by the thread that uses it, for all the tile's rows: one pass over W per
// tile (~3.5 ms of the ~16 ms of a 256-row tile's Z above) instead of a packed copy of W.
GRAO_AVX512 void pack_wt_block(const uint16_t* w, int64_t dim, int64_t nb, uint32_t* out) {
  const int64_t np = dim / 2, full = np / 16 * 16;
  for (int64_t j0 = 0; j0 < kLdb; j0 += 16) {
    if (j0 + 16 <= nb) {
      for (int64_t p0 = 0; p0 < full; p0 += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(w + (j0 + i) * dim + 2 * p0);
        transpose16x16(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (p0 + i) * kLdb + j0, r[i]);
      }
    }
    const int64_t p_from = j0 + 16 <= nb ? full : 0;
    for (int64_t p = p_from; p < np; ++p) {
      for (int64_t j = j0; j < j0 + 16; ++j) out[p * kLdb + j] = j < nb ? bf16_pair(w + j * dim + 2 * p) : 0u;
    }
  }
}

// A of the dW block: its rows [k0, k0 + kb) of dz^T, dzt[k * kp + i] = dz[i, k0 + k], i < cnt; zero for
// cnt <= i < kp (kp: cnt rounded up to 32). Pairs of dz rows are zipped into 32-bit elements and 16 x 16 blocks of
// those transposed, which is the 16-bit transpose.
GRAO_AVX512 void pack_dzt(const uint16_t* dz, int64_t ld, int64_t cnt, int64_t k0, int64_t kb, int64_t kp,
                          uint16_t* dzt) {
  const int64_t kfull = kb / 16 * 16;
  for (int64_t i0 = 0; i0 < kp; i0 += 32) {
    const bool rows_full = i0 + 32 <= cnt;
    if (rows_full) {
      for (int64_t k = 0; k < kfull; k += 16) {
        __m512i r[16];
        for (int q = 0; q < 16; ++q) {
          const uint16_t* s = dz + (i0 + 2 * q) * ld + k0 + k;
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
          const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + ld)));
          r[q] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
        }
        transpose16x16(r);
        for (int q = 0; q < 16; ++q) _mm512_storeu_si512(dzt + (k + q) * kp + i0, r[q]);
      }
    }
    for (int64_t k = rows_full ? kfull : 0; k < kb; ++k) {
      for (int64_t i = i0; i < i0 + 32; ++i) dzt[k * kp + i] = i < cnt ? dz[i * ld + k0 + k] : uint16_t{0};
    }
  }
}
#endif

#if GRAO_X86
// B of dh = dz W for the vocabulary rows [0, kk) of w (kk even): W's [kk, D] block in the VNNI layout, per column
// block of 64 (out + db * kk / 2 * 64): element (p, j) = (W[2p, 64 db + j], W[2p + 1, 64 db + j]), zero beyond D.
GRAO_AVX512 void pack_w_pairs(const uint16_t* w, int64_t dim, int64_t kk, uint32_t* out) {
  for (int64_t d0 = 0; d0 < dim; d0 += kLdb) {
    uint32_t* o = out + d0 / kLdb * (kk / 2) * kLdb;
    const int64_t nd = std::min(kLdb, dim - d0), full = nd / 16 * 16;
    for (int64_t p = 0; p < kk / 2; ++p) {
      const uint16_t* r0 = w + 2 * p * dim + d0;
      const uint16_t* r1 = r0 + dim;
      for (int64_t j = 0; j < full; j += 16) {
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + j)));
        const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + j)));
        _mm512_storeu_si512(o + p * kLdb + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
      for (int64_t j = full; j < kLdb; ++j) {
        o[p * kLdb + j] = j < nd ? (static_cast<uint32_t>(r0[j]) | static_cast<uint32_t>(r1[j]) << 16) : 0u;
      }
    }
  }
}
#endif

// B of the dW blocks: h_tile [cnt, D] in the VNNI layout, per column block of 64 (out + db * kp / 2 * 64):
// element (p, j) = (h[2p, 64 db + j], h[2p + 1, 64 db + j]); zero beyond cnt rows or D columns. Once per tile.
void pack_h_pairs(const uint16_t* h, int64_t cnt, int64_t dim, int64_t kp, uint32_t* out) {
  for (int64_t d0 = 0; d0 < dim; d0 += kLdb) {
    uint32_t* o = out + d0 / kLdb * (kp / 2) * kLdb;
    for (int64_t p = 0; p < kp / 2; ++p) {
      for (int64_t j = 0; j < kLdb; ++j) {
        const int64_t d = d0 + j;
        const uint32_t a = 2 * p < cnt && d < dim ? h[2 * p * dim + d] : 0u;
        const uint32_t b = 2 * p + 1 < cnt && d < dim ? h[(2 * p + 1) * dim + d] : 0u;
        o[p * kLdb + j] = a | b << 16;
      }
    }
  }
}

// Work items [0, n) over the threads, claimed one at a time from a shared counter (dynamic scheduling): each thread
// runs body(next) once, next() handing it its next item or -1 when none is left. A static split left one thread
// waiting at the end of each region whenever the other's vCPU ran slower for a while (this shared VM's do): the
// bf16 fused pass measured 1.07x its matmul floor this way and 1.13x with at::parallel_for's static chunks (paired,
// 15 pairs each, N = 4096, D = 512, V = 32000, 2 threads). In a nested region at::parallel_for runs inline and the
// one body claims every item.
template <typename Body>
void parallel_claim(int64_t n, const Body& body) {
  std::atomic<int64_t> counter{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    body([&]() -> int64_t {
      const int64_t i = counter.fetch_add(1, std::memory_order_relaxed);
      return i < n ? i : -1;
    });
  });
}

// isa: bit 0 forces the scalar row kernel, bit 1 the ATen GEMMs for bf16, bit 2 MKL's bf16 GEMM instead of brgemm,
// bit 3 the forward through a [tile x V] logits buffer as with gradients, bit 4 the fp32 logits tile for bf16 with
// gradients instead of the compact one (tests of the fallbacks, comparisons).
template <typename T>
std::vector<at::Tensor> pass_impl(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& rows,
                                  const c10::optional<at::Tensor>& grad_logp, double temperature,
                                  bool want_entropy, bool need_h, bool need_w, bool need_b, int64_t tile_rows,
                                  int64_t isa) {
  const int64_t n_tok = hidden.size(0), dim = hidden.size(1), vocab = weight.size(0);
  const int64_t active = rows.numel();
  const bool grads = grad_logp.has_value();
  const bool bf16 = std::is_same<T, at::BFloat16>::value;
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::zeros({n_tok}, f32);
  at::Tensor lse = at::zeros({2, n_tok}, f32);
  at::Tensor ent = want_entropy ? at::zeros({n_tok}, f32) : at::empty({0}, f32);
  // The gradients, [N, D] and [V, D], are mapped zero pages too (mapped_empty), never glibc heap blocks: a freed
  // [V, D] gradient (31 MiB at V = 32000, D = 512 bf16) raised glibc's mmap threshold to its size, after which the
  // next call's gradients came from the heap, where fragmentation now and then kept a second one resident (peak
  // +31 MiB in about one bf16 benchmark run in three).
  at::Tensor dh = grads && need_h ? mapped_empty(hidden.sizes(), hidden.scalar_type()) : at::empty({0}, f32);
  // dW: fp32 weights accumulate in the output itself (GEMMs with beta = 1); bf16 ones in the output as the high
  // part plus an int8 residual (acc_hilo_*), mapped zero pages.
  const bool want_w = grads && need_w;
  at::Tensor dw = !want_w ? at::empty({0}, f32) : mapped_empty({vocab, dim}, weight.scalar_type());
  at::Tensor dw_lo = want_w && bf16 ? mapped_empty({vocab, dim}, at::kChar) : at::Tensor();
  const bool has_bias = bias.has_value();
  at::Tensor db32 = grads && need_b && has_bias ? at::zeros({vocab}, f32) : at::empty({0}, f32);
  at::Tensor bias32 = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  if (active == 0) {
    return {logp, lse, ent, dh, dw, grads && need_b && has_bias ? db32.to(bias->scalar_type()) : db32};
  }
  const bool keep32 = need_b && has_bias;  // the bias gradient sums the fp32 dz
  const bool vec = !(isa & 1) && cpu_has_avx512();
  // bf16 GEMMs through brgemm (AMX; even D, the VNNI pairs run along D in Z = h W^T)
  const bool brg = GRAO_X86 && bf16 && dim % 2 == 0 && !(isa & 6) && brgemm_ready();
  // bf16 with gradients on the AVX-512 + brgemm path keeps its tile as 16-bit exponentials (fold_store_avx512): half
  // the bytes per logit of the fp32 buffer that tile_rows is sized for, so twice the rows. Not with a bias gradient
  // (it sums the fp32 dz); isa bit 4 turns it off (tests, comparisons).
  const bool compact = grads && bf16 && brg && vec && !keep32 && !(isa & 16);
  const int64_t tm = std::max<int64_t>(1, std::min(compact ? 2 * tile_rows : tile_rows, active));
  const bool corr = grads && bf16;         // fp32 corrections of the large dz entries (kCorrFrac)
  // Workspaces, once per call, sized by the tile (tile_rows x V) or by the cache (the dW blocks), never by N.
  // The bf16 dz of row i is written over the start of its own fp32 row of z_buf (leading dimension 2V), unless
  // the bias gradient needs the fp32 dz kept, which takes a separate buffer.
  const bool blocked_fwd = !grads && !(isa & 8);  // forward only: online softmax over vocabulary blocks (below)
  at::Tensor z_buf = !blocked_fwd && !compact ? mapped_empty({tm, vocab}, at::kFloat) : at::Tensor();
  at::Tensor dz16_buf = grads && bf16 && (keep32 || compact) ? mapped_empty({tm, vocab}, at::kBFloat16) : at::Tensor();
  const int64_t ld16 = dz16_buf.defined() ? vocab : 2 * vocab;
  at::Tensor h_buf = at::empty({tm, dim}, hidden.options());
  at::Tensor dh_buf = grads && need_h ? at::empty({tm, dim}, f32) : at::Tensor();
  at::Tensor corr_k = corr ? at::empty({tm, kCorrCap}, at::kInt) : at::Tensor();
  at::Tensor corr_v = corr ? at::empty({tm, kCorrCap}, at::kFloat) : at::Tensor();
  at::Tensor corr_n = corr ? at::zeros({tm}, at::kInt) : at::Tensor();
  at::Tensor offs = corr ? at::zeros({tm}, at::kFloat) : at::Tensor();
  at::Tensor wsum;  // fp32 column sums of W, for the offsets of flat rows (computed when one first occurs)
  at::Tensor usum = corr ? at::empty({dim}, at::kFloat) : at::Tensor();  // sum_i c0_i h_i of a tile
  // bf16 dW per tile in vocabulary blocks of ~1 MiB fp32 ([vb, D], one per thread, L2-resident): the block's GEMM
  // (beta = 0), its corrections, then its hi / lo update.
  const int64_t vb = std::min(vocab, std::max<int64_t>(16, (int64_t{1} << 20) / (4 * dim) / 16 * 16));
  const int nthreads = at::get_num_threads();
  at::Tensor cblk = want_w && bf16 ? at::empty({nthreads, vb, dim}, f32) : at::Tensor();

  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  const float* g = grads ? grad_logp->data_ptr<float>() : nullptr;
  float* logp_p = logp.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  float* ent_p = want_entropy ? ent.data_ptr<float>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / temperature);
  const bool scale = has_bias || temperature != 1.0;
  const float* b32 = has_bias ? bias32.data_ptr<float>() : nullptr;
  const bool direct = !(isa & 2) && mkl_bf16_gemm() != nullptr;
  // brgemm's per-thread packing buffers for a block of W (Z: 64 rows, dh: dh_chunk rows), fp32 partials of dh_tile,
  // and rows of dz^T (dW)
  const BrgemmApi& bapi = brgemm_api();
  const int64_t ndb = (dim + kLdb - 1) / kLdb, kc = dh_chunk(dim);
  const int64_t kp_max = (tm + 31) / 32 * 32;  // the dW GEMMs' K: the tile's rows rounded up to 32 (zero rows)
  const int64_t wstride = std::max(dim / 2, kc / 2 * ndb) * kLdb;
  // (mapped like z_buf, and for the same reason: heap blocks of this size could pin the heap's top between calls)
  at::Tensor w_pack = brg ? mapped_empty({nthreads, wstride}, at::kInt) : at::Tensor();
  // dh = dz W over brgemm: vocabulary chunks of kc rows in dh_groups fixed groups, each group summed into a partial
  // of its own by whichever thread claims it, the partials then added in group order (the same sums whatever the
  // schedule)
  const int64_t dh_chunks = (vocab / 2 * 2 + kc - 1) / kc;
  const int64_t dh_groups = std::max<int64_t>(1, std::min<int64_t>(dh_chunks, 2 * nthreads));
  at::Tensor dh_part = brg && grads && need_h ? mapped_empty({dh_groups, tm, dim}, at::kFloat) : at::Tensor();
  at::Tensor h_pack = brg && want_w ? mapped_empty({ndb, kp_max / 2 * kLdb}, at::kInt) : at::Tensor();
  at::Tensor dzt_buf = brg && want_w ? mapped_empty({nthreads, kBrgRows, kp_max}, at::kBFloat16) : at::Tensor();
  // Forward only: no [tile x V] logits. Threads over blocks of fcols vocabulary columns, each block's logits for the
  // tile's rows computed into the thread's cache-sized buffer (~512 KiB) and folded into the rows' running softmax
  // statistics (fold_*), merged across threads per tile. The logits never leave the cache (the two-pass rows read
  // a [tile x V] buffer back from memory: fp32 forward 1.21x its matmul floor, measured; the fold saves that pass).
  const int64_t fcols = std::min(vocab, std::max<int64_t>(64, (int64_t{1} << 17) / tm / 64 * 64));
  // Each block's statistics per row (st_buf), merged in block order (merge_blocks); a compact tile folds the same
  // blocks (fold_store_avx512) and also keeps the rows' largest non-label logit per thread (m2_buf).
  const bool folds = blocked_fwd || compact;
  const int64_t nfb = (vocab + fcols - 1) / fcols;
  at::Tensor zf_buf = folds ? mapped_empty({nthreads, tm * fcols}, at::kFloat) : at::Tensor();
  at::Tensor st_buf = folds ? at::empty({tm, nfb, 3}, f32) : at::Tensor();  // RowStats per row, block
  at::Tensor picked_buf = folds ? at::empty({tm}, f32) : at::Tensor();            // the label's scaled logit
  at::Tensor m2_buf = compact ? at::empty({nthreads, tm}, f32) : at::Tensor();
  int32_t* ck = corr ? corr_k.data_ptr<int32_t>() : nullptr;
  float* cv = corr ? corr_v.data_ptr<float>() : nullptr;
  int32_t* cn = corr ? corr_n.data_ptr<int32_t>() : nullptr;
  float* off = corr ? offs.data_ptr<float>() : nullptr;

#if GRAO_X86
  // A compact tile (bf16 with gradients; fold_store_avx512): threads over blocks of fcols vocabulary columns, each
  // block's logits for the tile's rows computed into the thread's cache-sized buffer and folded there, only their
  // fp16 exponentials kept (dz16_buf, leading dimension V); then threads over rows: the threads' statistics merged,
  // the log-prob, and the dz sweep in place (dz_compact_avx512).
  const auto compact_tile = [&](const at::Tensor& h_tile, int64_t start, int64_t cnt) {
    const float ninf = -std::numeric_limits<float>::infinity();
    RowStats* stb = reinterpret_cast<RowStats*>(st_buf.data_ptr<float>());
    float* picked = picked_buf.data_ptr<float>();
    float* zf_base = zf_buf.data_ptr<float>();
    float* m2p = m2_buf.data_ptr<float>();
    uint16_t* xp = reinterpret_cast<uint16_t*>(dz16_buf.data_ptr<at::BFloat16>());
    std::fill(m2p, m2p + nthreads * tm, ninf);
    const uint16_t* hp16 = reinterpret_cast<const uint16_t*>(h_tile.data_ptr<T>());
    const c10::BFloat16* ha = reinterpret_cast<const c10::BFloat16*>(hp16);
    const uint16_t* wp16 = reinterpret_cast<const uint16_t*>(weight.data_ptr<T>());
    uint32_t* wt_base = reinterpret_cast<uint32_t*>(w_pack.data_ptr<int32_t>());
    parallel_claim(nfb, [&](const auto& next) {
      const int tid = at::get_thread_num();
      float* zb = zf_base + static_cast<int64_t>(tid) * tm * fcols;
      float* m2t = m2p + static_cast<int64_t>(tid) * tm;
      uint32_t* buf = wt_base + static_cast<int64_t>(tid) * wstride;
      for (int64_t blk; (blk = next()) >= 0;) {
        const int64_t v0 = blk * fcols, nb = std::min(fcols, vocab - v0);
        for (int64_t q0 = 0; q0 < nb; q0 += kLdb) {  // Z block [cnt, nb] (leading dimension nb)
          const int64_t qn = std::min(kLdb, nb - q0);
          pack_wt_block(wp16 + (v0 + q0) * dim, dim, qn, buf);
          for (int64_t m0 = 0; m0 < cnt; m0 += kBrgRows) {
            bapi.gemm(std::min(kBrgRows, cnt - m0), qn, dim, dim, kLdb, nb, false, ha + m0 * dim,
                      reinterpret_cast<const c10::BFloat16*>(buf), zb + m0 * nb + q0, true);
          }
        }
        for (int64_t i = 0; i < cnt; ++i) {
          const int64_t l = lab[row_ids[start + i]] - v0;
          fold_store_avx512(zb + i * nb, nb, b32 ? b32 + v0 : nullptr, inv_t, scale, want_entropy,
                            l >= 0 && l < nb ? l : -1, xp + i * vocab + v0, stb[i * nfb + blk], m2t[i], picked[i]);
        }
      }
      bapi.release(true);
    });
    at::parallel_for(0, cnt, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        float m2 = ninf;
        for (int t = 0; t < nthreads; ++t) m2 = std::max(m2, m2p[t * tm + i]);
        const RowStats row = merge_blocks(stb + i * nfb, nfb);
        const float m = row.m, s = row.s, te = row.t;
        const int64_t tok = row_ids[start + i];
        const float log_sum = std::log(s);
        logp_p[tok] = (picked[i] - m) - log_sum;
        lse_p[tok] = m;
        lse_p[n_tok + tok] = log_sum;
        if (ent_p) ent_p[tok] = log_sum - te / s;
        const float coef = static_cast<float>(g[tok] / temperature);
        const float a = -coef / s;
        const float e_label = std::exp(picked[i] - m);
        const float at_label = e_label * a + coef;
        const GradSplit sp = grad_split(e_label, a, at_label, coef, m2, m, s, vocab);
        cn[i] = 0;
        const RowJob job{nullptr, b32, vocab, inv_t, scale, lab[tok], true, coef, nullptr, false, want_entropy,
                         ck + i * kCorrCap, cv + i * kCorrCap, cn + i, off + i};
        uint16_t* x = xp + i * vocab;
        dz_compact_avx512(x, job, CompactRow{stb + i * nfb, fcols, m, a, sp.c0, sp.thr, hp16 + i * dim, wp16, dim});
        x[job.label] = bf16_bits(at_label - sp.c0);
        corr_label(job, at_label - sp.c0);
        off[i] = sp.c0;
      }
    });
  };
#endif

  for (int64_t start = 0; start < active; start += tm) {
    const int64_t cnt = std::min(tm, active - start);
    at::Tensor idx = rows.narrow(0, start, cnt);
    at::Tensor h_tile = h_buf.narrow(0, 0, cnt);
    at::index_select_out(h_tile, hidden, 0, idx);
    if (blocked_fwd) {
      static_assert(sizeof(RowStats) == 3 * sizeof(float), "RowStats is three floats");
      RowStats* stb = reinterpret_cast<RowStats*>(st_buf.data_ptr<float>());
      float* picked = picked_buf.data_ptr<float>();
      float* zf_base = zf_buf.data_ptr<float>();
      const c10::BFloat16* ha = bf16 ? reinterpret_cast<const c10::BFloat16*>(h_tile.data_ptr<T>()) : nullptr;
      const uint16_t* wp16 = bf16 ? reinterpret_cast<const uint16_t*>(weight.data_ptr<T>()) : nullptr;
      uint32_t* wt_base = brg ? reinterpret_cast<uint32_t*>(w_pack.data_ptr<int32_t>()) : nullptr;
      const at::Tensor wd = weight.detach();  // ATen GEMMs on the worker threads, where grad mode is not inherited
      parallel_claim(nfb, [&](const auto& next) {
        const int tid = at::get_thread_num();
        float* zb = zf_base + static_cast<int64_t>(tid) * tm * fcols;
        for (int64_t blk; (blk = next()) >= 0;) {
          const int64_t v0 = blk * fcols, nb = std::min(fcols, vocab - v0);
          if (brg) {  // Z block [cnt, nb] (leading dimension nb), 64 columns per packed block of W
#if GRAO_X86
            uint32_t* buf = wt_base + static_cast<int64_t>(tid) * wstride;
            for (int64_t q0 = 0; q0 < nb; q0 += kLdb) {
              const int64_t qn = std::min(kLdb, nb - q0);
              pack_wt_block(wp16 + (v0 + q0) * dim, dim, qn, buf);
              for (int64_t m0 = 0; m0 < cnt; m0 += kBrgRows) {
                bapi.gemm(std::min(kBrgRows, cnt - m0), qn, dim, dim, kLdb, nb, false, ha + m0 * dim,
                          reinterpret_cast<const c10::BFloat16*>(buf), zb + m0 * nb + q0, true);
              }
            }
#endif
          } else {
            gemm_rm(false, true, cnt, nb, dim, h_tile, wd.narrow(0, v0, nb), 0.f,
                    at::from_blob(zb, {cnt, nb}, f32), direct);
          }
          for (int64_t i = 0; i < cnt; ++i) {
            float* zr = zb + i * nb;
            RowStats& st = stb[i * nfb + blk];
            st = RowStats{-std::numeric_limits<float>::infinity(), 0.f, 0.f};
#if GRAO_X86
            if (vec) {
              fold_avx512(zr, nb, b32 ? b32 + v0 : nullptr, inv_t, scale, want_entropy, st);
            } else {
              fold_scalar(zr, nb, b32 ? b32 + v0 : nullptr, inv_t, scale, want_entropy, st);
            }
#else
            fold_scalar(zr, nb, b32 ? b32 + v0 : nullptr, inv_t, scale, want_entropy, st);
#endif
            const int64_t l = lab[row_ids[start + i]] - v0;
            if (l >= 0 && l < nb) picked[i] = zr[l];  // scaled in place by the fold
          }
        }
        if (brg) bapi.release(true);
      });
      for (int64_t i = 0; i < cnt; ++i) {
        const RowStats row = merge_blocks(stb + i * nfb, nfb);
        const float m = row.m, s = row.s, te = row.t;
        const int64_t tok = row_ids[start + i];
        const float log_sum = std::log(s);
        logp_p[tok] = (picked[i] - m) - log_sum;
        lse_p[tok] = m;
        lse_p[n_tok + tok] = log_sum;
        if (ent_p) ent_p[tok] = log_sum - te / s;
      }
      continue;
    }
    at::Tensor z_tile = compact ? at::Tensor() : z_buf.narrow(0, 0, cnt);
    float* z = compact ? nullptr : z_tile.data_ptr<float>();
    at::BFloat16* dz16 = !(grads && bf16) ? nullptr
                         : dz16_buf.defined() ? dz16_buf.data_ptr<at::BFloat16>()
                                              : reinterpret_cast<at::BFloat16*>(z);
    if (compact) {
#if GRAO_X86
      compact_tile(h_tile, start, cnt);
#endif
    } else if (brg) {
#if GRAO_X86
      // Z [cnt, V] = h W^T: threads over blocks of 64 vocabulary rows, each packed (pack_wt_block) then used by all
      // the tile's rows, kBrgRows at a time
      const uint16_t* hp16 = reinterpret_cast<const uint16_t*>(h_tile.data_ptr<T>());
      const uint16_t* wp16 = reinterpret_cast<const uint16_t*>(weight.data_ptr<T>());
      const c10::BFloat16* ha = reinterpret_cast<const c10::BFloat16*>(hp16);
      uint32_t* wt_base = reinterpret_cast<uint32_t*>(w_pack.data_ptr<int32_t>());
      parallel_claim((vocab + kLdb - 1) / kLdb, [&](const auto& next) {
        uint32_t* buf = wt_base + static_cast<int64_t>(at::get_thread_num()) * wstride;
        const c10::BFloat16* bb = reinterpret_cast<const c10::BFloat16*>(buf);
        for (int64_t blk; (blk = next()) >= 0;) {
          const int64_t v0 = blk * kLdb, nb = std::min(kLdb, vocab - v0);
          pack_wt_block(wp16 + v0 * dim, dim, nb, buf);
          for (int64_t m0 = 0; m0 < cnt; m0 += kBrgRows) {
            bapi.gemm(std::min(kBrgRows, cnt - m0), nb, dim, dim, kLdb, vocab, false, ha + m0 * dim, bb,
                      z + m0 * vocab + v0, true);
          }
        }
        bapi.release(true);
      });
#endif
    } else {
      gemm_rm(false, true, cnt, vocab, dim, h_tile, weight, 0.f, z_tile, direct);  // Z [cnt, V] = h W^T
    }
    if (!compact) at::parallel_for(0, cnt, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t tok = row_ids[start + i];
        if (corr) {
          cn[i] = 0;
          off[i] = 0.f;
        }
        RowJob job{z + i * vocab, b32, vocab, inv_t, scale, lab[tok], grads,
                   grads ? static_cast<float>(g[tok] / temperature) : 0.f,
                   dz16 ? dz16 + i * ld16 : nullptr, keep32, want_entropy,
                   corr ? ck + i * kCorrCap : nullptr, corr ? cv + i * kCorrCap : nullptr, corr ? cn + i : nullptr,
                   corr ? off + i : nullptr};
#if GRAO_X86
        const RowOut o = vec ? row_avx512(job) : row_scalar(job);
#else
        const RowOut o = row_scalar(job);
#endif
        logp_p[tok] = o.logp;
        lse_p[tok] = o.max;
        lse_p[n_tok + tok] = o.log_sum;
        if (ent_p) ent_p[tok] = o.entropy;
      }
    });
    if (!grads) continue;
    // dz as the GEMMs read it: fp32 in place (fp32 inputs) or its bf16 copy (bf16 inputs, as eager's backward).
    at::Tensor dz = !bf16 ? z_tile
                    : at::from_blob(dz16, {cnt, vocab}, {ld16, 1}, hidden.options().dtype(at::kBFloat16));
    const bool flat = corr && std::any_of(off, off + cnt, [](float c) { return c != 0.f; });
    if (flat && need_h && !wsum.defined()) wsum = weight.sum(0, false, at::kFloat).contiguous();
    const float* ws = wsum.defined() ? wsum.data_ptr<float>() : nullptr;
    if (need_h) {
      at::Tensor dh_tile = dh_buf.narrow(0, 0, cnt);
      if (brg) {
#if GRAO_X86
        // dh_tile [cnt, D] = dz W: threads over groups of chunks of kc vocabulary rows, zipping each chunk of W into
        // pairs (pack_w_pairs) and adding dz[:, chunk] W[chunk] into the group's fp32 partial (zeroed first); the
        // partials are summed in group order. An odd V's last row is a rank-1 update (K must be even).
        float* parts = dh_part.data_ptr<float>();
        std::fill(parts, parts + dh_groups * cnt * dim, 0.f);
        const uint16_t* wp16 = reinterpret_cast<const uint16_t*>(weight.data_ptr<T>());
        const c10::BFloat16* da = reinterpret_cast<const c10::BFloat16*>(dz16);
        uint32_t* wt_base = reinterpret_cast<uint32_t*>(w_pack.data_ptr<int32_t>());
        const int64_t veven = vocab / 2 * 2;
        parallel_claim(dh_groups, [&](const auto& next) {
          const int tid = at::get_thread_num();
          uint32_t* buf = wt_base + tid * wstride;
          for (int64_t grp; (grp = next()) >= 0;) {
            float* part = parts + grp * cnt * dim;
            for (int64_t ch = grp * dh_chunks / dh_groups; ch < (grp + 1) * dh_chunks / dh_groups; ++ch) {
              const int64_t k0 = ch * kc, kk = std::min(kc, veven - k0);
              pack_w_pairs(wp16 + k0 * dim, dim, kk, buf);
              const c10::BFloat16* wb = reinterpret_cast<const c10::BFloat16*>(buf);
              for (int64_t m0 = 0; m0 < cnt; m0 += kBrgRows) {
                for (int64_t d0 = 0; d0 < dim; d0 += kLdb) {
                  bapi.gemm(std::min(kBrgRows, cnt - m0), std::min(kLdb, dim - d0), kk, ld16, kLdb, dim, true,
                            da + m0 * ld16 + k0, wb + d0 / kLdb * kk * kLdb, part + m0 * dim + d0, true);
                }
              }
            }
          }
          bapi.release(true);
        });
        float* dhp0 = dh_tile.data_ptr<float>();
        at::parallel_for(0, cnt, 16, [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) {
            float* dst = dhp0 + i * dim;
            for (int64_t d = 0; d < dim; ++d) {
              float acc = 0.f;
              for (int64_t q = 0; q < dh_groups; ++q) acc += parts[(q * cnt + i) * dim + d];
              dst[d] = acc;
            }
            if (veven < vocab) {
              const float r = static_cast<float>(dz16[i * ld16 + veven]);
              const T* wl = weight.data_ptr<T>() + veven * dim;
              for (int64_t d = 0; d < dim; ++d) dst[d] += r * static_cast<float>(wl[d]);
            }
          }
        });
#endif
      } else {
        gemm_rm(false, false, cnt, dim, vocab, dz, weight, 0.f, dh_tile, direct);  // dh_tile [cnt, D] = dz W
      }
      float* dhp = dh_tile.data_ptr<float>();
      const T* wp = weight.data_ptr<T>();
      T* out = dh.data_ptr<T>();
      at::parallel_for(0, cnt, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          T* dst = out + row_ids[start + i] * dim;
          float* src = dhp + i * dim;
          if (corr) {
            for (int32_t q = 0; q < cn[i]; ++q) {  // + (r - bf16(r)) W[k] at the large entries
              const float r = cv[i * kCorrCap + q];
              const T* wr = wp + static_cast<int64_t>(ck[i * kCorrCap + q]) * dim;
              for (int64_t k = 0; k < dim; ++k) src[k] += r * static_cast<float>(wr[k]);
            }
            if (off[i] != 0.f) {  // + c0 sum_k W[k]
              for (int64_t k = 0; k < dim; ++k) src[k] += off[i] * ws[k];
            }
          }
          for (int64_t k = 0; k < dim; ++k) dst[k] = static_cast<T>(src[k]);
        }
      });
    }
    if (need_w && !bf16) {
      gemm_rm(true, false, vocab, dim, cnt, dz, h_tile, 1.f, dw, direct);  // dW [V, D] += dz^T h_tile
    } else if (need_w) {
      const int64_t nblk = (vocab + vb - 1) / vb;
      float* cbase = cblk.data_ptr<float>();
      uint16_t* hip = reinterpret_cast<uint16_t*>(dw.data_ptr<at::BFloat16>());
      int8_t* lop = dw_lo.data_ptr<int8_t>();
      const T* hp = h_tile.data_ptr<T>();
      const float* u = nullptr;  // sum_i c0_i h_i, added to every row of dW
      if (flat) {
        float* us = usum.data_ptr<float>();
        std::fill(us, us + dim, 0.f);
        for (int64_t i = 0; i < cnt; ++i) {
          if (off[i] == 0.f) continue;
          for (int64_t d = 0; d < dim; ++d) us[d] += off[i] * static_cast<float>(hp[i * dim + d]);
        }
        u = us;
      }
      // brgemm: A = rows of dz^T (pack_dzt, kBrgRows at a time), B = h_tile in pairs (once per tile), K = kp
      const int64_t kp = (cnt + 31) / 32 * 32;
      if (brg) {
        pack_h_pairs(reinterpret_cast<const uint16_t*>(hp), cnt, dim, kp,
                     reinterpret_cast<uint32_t*>(h_pack.data_ptr<int32_t>()));
      }
      parallel_claim(nblk, [&](const auto& next) {
        const int tid = at::get_thread_num();
        float* c = cbase + static_cast<int64_t>(tid) * vb * dim;
        // rows [r0, r0 + nr) of dW, their fp32 GEMM result in c: the corrections, then the hi / lo update
        const auto finish = [&](int64_t r0, int64_t nr) {
          for (int64_t i = 0; i < cnt; ++i) {
            for (int32_t q = 0; q < cn[i]; ++q) {
              const int64_t k = ck[i * kCorrCap + q] - r0;
              if (k < 0 || k >= nr) continue;
              const float r = cv[i * kCorrCap + q];
              float* cr = c + k * dim;
              const T* hr = hp + i * dim;
              for (int64_t d = 0; d < dim; ++d) cr[d] += r * static_cast<float>(hr[d]);
            }
          }
#if GRAO_X86
          if (vec) {
            acc_hilo_avx512(hip + r0 * dim, lop + r0 * dim, c, u, nr, dim);
            return;
          }
#endif
          acc_hilo_scalar(hip + r0 * dim, lop + r0 * dim, c, u, nr, dim);
        };
        for (int64_t blk; (blk = next()) >= 0;) {
          const int64_t k0 = blk * vb, kb = std::min(vb, vocab - k0);
          if (brg) {
#if GRAO_X86
            // kBrgRows vocabulary rows at a time, each finished while its GEMM result is in cache
            uint16_t* dzt = reinterpret_cast<uint16_t*>(dzt_buf.data_ptr<at::BFloat16>()) + tid * kBrgRows * kp_max;
            const c10::BFloat16* hb = reinterpret_cast<const c10::BFloat16*>(h_pack.data_ptr<int32_t>());
            for (int64_t m0 = 0; m0 < kb; m0 += kBrgRows) {
              const int64_t r0 = k0 + m0, mb = std::min(kBrgRows, kb - m0);
              pack_dzt(reinterpret_cast<const uint16_t*>(dz16), ld16, cnt, r0, mb, kp, dzt);
              for (int64_t d0 = 0; d0 < dim; d0 += kLdb) {
                bapi.gemm(mb, std::min(kLdb, dim - d0), kp, kp, kLdb, dim, false,
                          reinterpret_cast<const c10::BFloat16*>(dzt), hb + d0 / kLdb * kp * kLdb, c + d0, true);
              }
              finish(r0, mb);
            }
#endif
          } else {
            at::Tensor cb = at::from_blob(c, {kb, dim}, f32);
            gemm_rm(true, false, kb, dim, cnt, dz.narrow(1, k0, kb), h_tile, 0.f, cb, direct);  // dz^T h, block
            finish(k0, kb);
          }
        }
        if (brg) bapi.release(true);
      });
    }
    if (need_b && has_bias) {
      float* db = db32.data_ptr<float>();
      at::parallel_for(0, vocab, 2048, [&](int64_t lo, int64_t hi) {
        for (int64_t i = 0; i < cnt; ++i) {
          const float* zr = z + i * vocab;
          for (int64_t k = lo; k < hi; ++k) db[k] += zr[k];
        }
      });
    }
  }
  at::Tensor db = grads && need_b && has_bias ? db32.to(bias->scalar_type()) : db32;
  return {logp, lse, ent, dh, dw, db};
}

std::vector<at::Tensor> logprob_pass(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& rows,
                                     const c10::optional<at::Tensor>& grad_logp, double temperature,
                                     bool want_entropy, bool need_h, bool need_w, bool need_b, int64_t tile_rows,
                                     int64_t isa) {
  TORCH_CHECK(hidden.device().is_cpu() && hidden.dim() == 2, "grao_cpu: hidden must be a 2-D CPU tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == hidden.size(1),
              "grao_cpu: weight must be a contiguous [V, D] tensor");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "grao_cpu: weight and hidden dtypes differ");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == hidden.size(0),
              "grao_cpu: labels must be contiguous int64 [N]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "grao_cpu: rows must be contiguous int64");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == weight.size(0)), "grao_cpu: bias must be [V]");
  TORCH_CHECK(!grad_logp.has_value() || (grad_logp->scalar_type() == at::kFloat && grad_logp->is_contiguous() &&
                                         grad_logp->numel() == hidden.size(0)),
              "grao_cpu: grad_logp must be contiguous fp32 [N]");
  TORCH_CHECK(temperature > 0, "grao_cpu: temperature must be > 0");
  switch (hidden.scalar_type()) {
    case at::kFloat:
      return pass_impl<float>(hidden, weight, labels, bias, rows, grad_logp, temperature, want_entropy, need_h,
                              need_w, need_b, tile_rows, isa);
    case at::kBFloat16:
      return pass_impl<at::BFloat16>(hidden, weight, labels, bias, rows, grad_logp, temperature, want_entropy,
                                     need_h, need_w, need_b, tile_rows, isa);
    default:
      TORCH_CHECK(false, "grao_cpu: dtype must be float32 or bfloat16, got ", hidden.scalar_type());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("logprob_pass", &logprob_pass,
        "(hidden [N,D], weight [V,D], labels [N] int64, bias [V]|None, rows [M] int64 (tokens to visit), "
        "grad_logp [N] fp32|None, temperature, want_entropy, need_h, need_w, need_b, tile_rows, isa) -> "
        "[logp [N], lse [2,N], entropy [N]|[0], dhidden [N,D]|[0], dweight [V,D]|[0], dbias [V]|[0]]");
  m.def("has_avx512", &cpu_has_avx512, "whether the AVX-512 row kernel runs on this CPU");
  m.def("has_brgemm", &brgemm_ready, "whether bf16 calls use oneDNN's brgemm (AMX) for Z = h W^T and dW");
}
