// The native CPU kernel's GEMMs: fp32 and the fallbacks through ATen or MKL's bf16 GEMM (gemm_rm), bf16 through
// oneDNN's brgemm ukernel (AMX) with the packing of its operands.
#pragma once

#include "common.h"

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

// Z [cnt, nb] = h W[0, nb)^T into z (leading dimension ldz), h [cnt, D] bf16 and w the first of nb rows of W: 64
// vocabulary rows at a time, each packed into buf (pack_wt_block) and then used by all cnt rows, kBrgRows at a time.
inline void brgemm_logits(const BrgemmApi& api, const c10::BFloat16* h, int64_t cnt, int64_t dim, const uint16_t* w,
                          int64_t nb, uint32_t* buf, float* z, int64_t ldz) {
  for (int64_t q0 = 0; q0 < nb; q0 += kLdb) {
    const int64_t qn = std::min(kLdb, nb - q0);
    pack_wt_block(w + q0 * dim, dim, qn, buf);
    for (int64_t m0 = 0; m0 < cnt; m0 += kBrgRows) {
      api.gemm(std::min(kBrgRows, cnt - m0), qn, dim, dim, kLdb, ldz, false, h + m0 * dim,
               reinterpret_cast<const c10::BFloat16*>(buf), z + m0 * ldz + q0, true);
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
#if GRAO_X86
  if (cnt == kp && cpu_has_avx512()) {  // no padding rows: the same layout as W's pairs (a full tile)
    pack_w_pairs(h, dim, kp, out);
    return;
  }
#endif
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

}  // namespace
