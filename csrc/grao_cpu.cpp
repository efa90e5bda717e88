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
//     Z   = h_tile @ W^T                    one GEMM, fp32 output (bf16 inputs: oneDNN bf16 x bf16 -> fp32,
//                                           through ATen's cpublas::gemm, so AMX / AVX512_BF16 where present)
//     per row, threads over rows:           bias, 1/temperature, row max, exp-sum (log-sum-exp), the log-prob,
//                                           then in place dz = g * (onehot - softmax) while the row
//                                           (V floats, 125 KiB at V = 32000) is still in L2
//     dh_tile = dz @ W                      GEMM (fp32 accumulation), scattered into dh rows
//     dW     += dz^T @ h_tile               GEMM with beta = 1 into one fp32 [V, D] accumulator: the BLAS
//                                           splits it over threads by output block, so no atomics and no
//                                           per-thread dW copies
//     db     += column sums of dz           threads over vocabulary blocks
// All workspaces (Z, the bf16 copy of dz, h_tile, dh_tile) are allocated once per call.
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
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "grao_cpu: could not map a ", bytes, "-byte workspace");
  return at::from_blob(p, sizes, [bytes](void* q) { munmap(q, bytes); }, at::TensorOptions().dtype(dtype));
}

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
  at::BFloat16* dz16;    // [V] bf16 dz (bf16 inputs) or nullptr
  bool keep32;           // also keep the fp32 dz in z (the bias gradient reads it)
  bool entropy;
};

struct RowOut {
  float max, log_sum, logp, entropy;
};

inline uint16_t bf16_bits(float x) {
  return c10::BFloat16(x).x;  // round to nearest even, as torch's .to(torch.bfloat16)
}

RowOut row_scalar(const RowJob& j) {
  float* z = j.z;
  const int64_t n = j.vocab;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < n; ++k) {
    float v = z[k];
    if (j.scale) {
      v = (v + (j.bias ? j.bias[k] : 0.f)) * j.inv_t;
      z[k] = v;
    }
    m = std::max(m, v);
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
    uint16_t* d16 = reinterpret_cast<uint16_t*>(j.dz16);
    if (!d16 || j.keep32) {
      for (int64_t k = 0; k < n; ++k) z[k] *= alpha;
      z[j.label] = at_label;
      if (d16) for (int64_t k = 0; k < n; ++k) d16[k] = bf16_bits(z[k]);
    } else {
      for (int64_t k = 0; k < n; ++k) d16[k] = bf16_bits(z[k] * alpha);
    }
    if (d16) d16[j.label] = bf16_bits(at_label);
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

GRAO_AVX512 RowOut row_avx512(const RowJob& j) {
  float* z = j.z;
  const int64_t n = j.vocab;
  const int64_t full = n / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - full)) - 1u);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 vt = _mm512_set1_ps(j.inv_t);
  __m512 vm = ninf;
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
  const float m = _mm512_reduce_max_ps(vm);
  const float picked = z[j.label];
  const __m512 vmax = _mm512_set1_ps(m);
  __m512 vs = _mm512_setzero_ps(), vt2 = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mk = k < full ? static_cast<__mmask16>(0xffff) : tail;
    const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, z + k), vmax);
    const __m512 e = _mm512_maskz_mov_ps(mk, exp_avx512(d));
    vs = _mm512_add_ps(vs, e);
    if (j.entropy) vt2 = _mm512_fmadd_ps(e, _mm512_maskz_mov_ps(mk, d), vt2);
    if (j.grads) _mm512_mask_storeu_ps(z + k, mk, e);
  }
  const float s = _mm512_reduce_add_ps(vs);
  RowOut out;
  out.max = m;
  out.log_sum = std::log(s);
  out.logp = (picked - m) - out.log_sum;
  out.entropy = j.entropy ? out.log_sum - _mm512_reduce_add_ps(vt2) / s : 0.f;
  if (j.grads) {
    // one sweep: dz = e * alpha (+ coef at the label), written as fp32 in place and / or as bf16
    const float a = -j.coef / s;
    const float at_label = z[j.label] * a + j.coef;
    const __m512 alpha = _mm512_set1_ps(a);
    uint16_t* d16 = reinterpret_cast<uint16_t*>(j.dz16);
    const bool f32 = !d16 || j.keep32;
    for (int64_t k = 0; k < n; k += 16) {
      const __mmask16 mk = k < full ? static_cast<__mmask16>(0xffff) : tail;
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, z + k), alpha);
      if (f32) _mm512_mask_storeu_ps(z + k, mk, v);
      if (d16) _mm256_mask_storeu_epi16(d16 + k, mk, to_bf16_avx512(v));
    }
    if (f32) z[j.label] = at_label;
    if (d16) d16[j.label] = bf16_bits(at_label);
  }
  return out;
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
// writes fp32 results from bf16 inputs without a bf16 rounding of the products.
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
  // bf16 without MKL's bf16 GEMM: ATen's bf16 product (fp32 accumulation, bf16 result, as eager's matmul), added
  // into the fp32 result.
  at::Tensor prod = at::mm(opa, opb);
  if (beta == 0.f) {
    const_cast<at::Tensor&>(c).copy_(prod);
  } else {
    const_cast<at::Tensor&>(c).add_(prod);
  }
}

// isa: bit 0 forces the scalar row kernel, bit 1 the ATen GEMMs for bf16 (tests of the fallbacks).
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
  at::Tensor dh = grads && need_h ? at::zeros_like(hidden, at::MemoryFormat::Contiguous) : at::empty({0}, f32);
  // fp32 accumulator of dW: the output itself for fp32 weights, cast once at the end for bf16.
  at::Tensor dw32 = !(grads && need_w) ? at::empty({0}, f32)
                    : weight.scalar_type() == at::kFloat ? at::zeros({vocab, dim}, f32)
                                                         : mapped_empty({vocab, dim}, at::kFloat).zero_();
  const bool has_bias = bias.has_value();
  at::Tensor db32 = grads && need_b && has_bias ? at::zeros({vocab}, f32) : at::empty({0}, f32);
  at::Tensor bias32 = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  if (active == 0) {
    return {logp, lse, ent, dh, grads && need_w ? dw32.to(weight.scalar_type()) : dw32,
            grads && need_b && has_bias ? db32.to(bias->scalar_type()) : db32};
  }
  const int64_t tm = std::max<int64_t>(1, std::min(tile_rows, active));
  // Workspaces, once per call.
  at::Tensor z_buf = mapped_empty({tm, vocab}, at::kFloat);
  at::Tensor dz16_buf = grads && bf16 ? mapped_empty({tm, vocab}, at::kBFloat16) : at::Tensor();
  at::Tensor h_buf = at::empty({tm, dim}, hidden.options());
  at::Tensor dh_buf = grads && need_h ? at::empty({tm, dim}, f32) : at::Tensor();

  const int64_t* lab = labels.data_ptr<int64_t>();
  const int64_t* row_ids = rows.data_ptr<int64_t>();
  const float* g = grads ? grad_logp->data_ptr<float>() : nullptr;
  float* logp_p = logp.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  float* ent_p = want_entropy ? ent.data_ptr<float>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / temperature);
  const bool scale = has_bias || temperature != 1.0;
  const float* b32 = has_bias ? bias32.data_ptr<float>() : nullptr;
  const bool vec = !(isa & 1) && cpu_has_avx512();
  const bool direct = !(isa & 2) && mkl_bf16_gemm() != nullptr;
  const bool keep32 = need_b && has_bias;  // the bias gradient sums the fp32 dz

  for (int64_t start = 0; start < active; start += tm) {
    const int64_t cnt = std::min(tm, active - start);
    at::Tensor idx = rows.narrow(0, start, cnt);
    at::Tensor h_tile = h_buf.narrow(0, 0, cnt);
    at::index_select_out(h_tile, hidden, 0, idx);
    at::Tensor z_tile = z_buf.narrow(0, 0, cnt);
    float* z = z_tile.data_ptr<float>();
    gemm_rm(false, true, cnt, vocab, dim, h_tile, weight, 0.f, z_tile, direct);  // Z [cnt, V] = h W^T
    at::BFloat16* dz16 = grads && bf16 ? dz16_buf.data_ptr<at::BFloat16>() : nullptr;
    at::parallel_for(0, cnt, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t tok = row_ids[start + i];
        RowJob job{z + i * vocab, b32, vocab, inv_t, scale, lab[tok], grads,
                   grads ? static_cast<float>(g[tok] / temperature) : 0.f,
                   dz16 ? dz16 + i * vocab : nullptr, keep32, want_entropy};
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
    at::Tensor dz = bf16 ? dz16_buf.narrow(0, 0, cnt) : z_tile;
    if (need_h) {
      at::Tensor dh_tile = dh_buf.narrow(0, 0, cnt);
      gemm_rm(false, false, cnt, dim, vocab, dz, weight, 0.f, dh_tile, direct);  // dh_tile [cnt, D] = dz W
      const float* dhp = dh_tile.data_ptr<float>();
      T* out = dh.data_ptr<T>();
      at::parallel_for(0, cnt, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          T* dst = out + row_ids[start + i] * dim;
          const float* src = dhp + i * dim;
          for (int64_t k = 0; k < dim; ++k) dst[k] = static_cast<T>(src[k]);
        }
      });
    }
    if (need_w) {
      gemm_rm(true, false, vocab, dim, cnt, dz, h_tile, 1.f, dw32, direct);  // dW [V, D] += dz^T h_tile
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
  at::Tensor dw = dw32;
  if (grads && need_w && weight.scalar_type() != at::kFloat) {
    z_buf.reset();  // let the workspace go before the cast allocates the bf16 result
    dz16_buf.reset();
    dw = dw32.to(weight.scalar_type());
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
}
