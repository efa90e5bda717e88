// A tile's gradients from its dz, the last step of the pass's variants with gradients (pass.h): dh = dz W
// (grad_hidden), dW += dz^T h in fp32 (grad_weight_fp32) or into bf16 hi + int8 lo (grad_weight_bf16), db += column
// sums of dz (grad_bias); tile_grads runs those asked for.
#pragma once

#include "gemm.h"
#include "hilo.h"
#include "plan.h"
#include "rows.h"

namespace {

// What the gradient steps read of one tile's dz
struct TileDz {
  at::Tensor dz;       // [cnt, V] as the GEMMs read it: the fp32 z_buf (fp32 inputs) or the bf16 copy (ld16)
  const float* z;      // the fp32 dz (kGradsLogits), or nullptr (compact tile)
  at::BFloat16* dz16;  // the bf16 dz (bf16 inputs), or nullptr
  bool flat;           // some row of the tile has an offset c0 (rows.h, kFlat)
};

// dh_tile [cnt, D] = dz W, plus the bf16 corrections, scattered into the rows of dh
template <typename T>
void grad_hidden(const Call& c, const Plan& p, Workspace& w, const Tile& t, const TileDz& d) {
  const int64_t cnt = t.cnt, dim = c.dim, vocab = c.vocab, ld16 = w.ld16;
  if (d.flat && !w.wsum.defined()) w.wsum = c.weight.sum(0, false, at::kFloat).contiguous();
  const float* ws = w.wsum.defined() ? w.wsum.data_ptr<float>() : nullptr;
  at::Tensor dh_tile = w.dh_buf.narrow(0, 0, cnt);
  if (p.brg) {
#if GRAO_X86
    // threads over groups of chunks of kc vocabulary rows, zipping each chunk of W into pairs (pack_w_pairs) and
    // adding dz[:, chunk] W[chunk] into the group's fp32 partial (the group's first chunk writes it); the partials
    // are summed in group order. An odd V's last row is a rank-1 update (K must be even).
    const BrgemmApi& bapi = *w.bapi;
    const int64_t kc = w.kc, dh_chunks = w.dh_chunks, dh_groups = w.dh_groups;
    float* parts = w.dh_part.data_ptr<float>();
    const uint16_t* wp16 = reinterpret_cast<const uint16_t*>(c.weight.data_ptr<T>());
    const c10::BFloat16* da = reinterpret_cast<const c10::BFloat16*>(d.dz16);
    uint32_t* wt_base = reinterpret_cast<uint32_t*>(w.w_pack.data_ptr<int32_t>());
    const int64_t veven = vocab / 2 * 2;
    parallel_claim(dh_groups, [&](const auto& next) {
      const int tid = at::get_thread_num();
      uint32_t* buf = wt_base + tid * w.wstride;
      for (int64_t grp; (grp = next()) >= 0;) {
        float* part = parts + grp * cnt * dim;
        const int64_t c_lo = grp * dh_chunks / dh_groups, c_hi = (grp + 1) * dh_chunks / dh_groups;
        if (c_lo == c_hi) std::fill(part, part + cnt * dim, 0.f);  // no chunk (V < 2)
        for (int64_t ch = c_lo; ch < c_hi; ++ch) {
          const int64_t k0 = ch * kc, kk = std::min(kc, veven - k0);
          pack_w_pairs(wp16 + k0 * dim, dim, kk, buf);
          const c10::BFloat16* wb = reinterpret_cast<const c10::BFloat16*>(buf);
          for (int64_t m0 = 0; m0 < cnt; m0 += kBrgRows) {
            for (int64_t d0 = 0; d0 < dim; d0 += kLdb) {
              bapi.gemm(std::min(kBrgRows, cnt - m0), std::min(kLdb, dim - d0), kk, ld16, kLdb, dim, ch != c_lo,
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
        for (int64_t k = 0; k < dim; ++k) {
          float acc = 0.f;
          for (int64_t q = 0; q < dh_groups; ++q) acc += parts[(q * cnt + i) * dim + k];
          dst[k] = acc;
        }
        if (veven < vocab) {
          const float r = static_cast<float>(d.dz16[i * ld16 + veven]);
          const T* wl = c.weight.data_ptr<T>() + veven * dim;
          for (int64_t k = 0; k < dim; ++k) dst[k] += r * static_cast<float>(wl[k]);
        }
      }
    });
#endif
  } else {
    gemm_rm(false, false, cnt, dim, vocab, d.dz, c.weight, 0.f, dh_tile, p.direct);
  }
  float* dhp = dh_tile.data_ptr<float>();
  const T* wp = c.weight.data_ptr<T>();
  T* out = c.dh.data_ptr<T>();
  at::parallel_for(0, cnt, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T* dst = out + c.row_ids[t.start + i] * dim;
      float* src = dhp + i * dim;
      if (p.corr) {
        for (int32_t q = 0; q < w.cn[i]; ++q) {  // + (r - bf16(r)) W[k] at the large entries
          const float r = w.cv[i * kCorrCap + q];
          const T* wr = wp + static_cast<int64_t>(w.ck[i * kCorrCap + q]) * dim;
          for (int64_t k = 0; k < dim; ++k) src[k] += r * static_cast<float>(wr[k]);
        }
        if (w.off[i] != 0.f) {  // + c0 sum_k W[k]
          for (int64_t k = 0; k < dim; ++k) src[k] += w.off[i] * ws[k];
        }
      }
      for (int64_t k = 0; k < dim; ++k) dst[k] = static_cast<T>(src[k]);
    }
  });
}

// fp32 dW [V, D] += dz^T h_tile: one GEMM with beta = 1 into dW itself (the BLAS splits it over threads by output
// block: no atomics, no per-thread copies)
inline void grad_weight_fp32(const Call& c, const Plan& p, const Tile& t, const TileDz& d) {
  gemm_rm(true, false, c.vocab, c.dim, t.cnt, d.dz, t.h, 1.f, c.dw, p.direct);
}

// bf16 dW: threads over ~1 MiB vocabulary blocks of dW, each a GEMM into the thread's fp32 block buffer (beta = 0;
// brgemm: kBrgRows rows at a time), its corrections, then a compensated add into dW = bf16 hi (the output) + int8 lo
// (acc_hilo_*)
template <typename T>
void grad_weight_bf16(const Call& c, const Plan& p, Workspace& w, const Tile& t, const TileDz& d) {
  const int64_t cnt = t.cnt, dim = c.dim, vocab = c.vocab, vb = w.vb, ld16 = w.ld16, kp_max = w.kp_max;
  const auto f32 = c.hidden.options().dtype(at::kFloat);
  const int64_t nblk = (vocab + vb - 1) / vb;
  float* cbase = w.cblk.data_ptr<float>();
  uint16_t* hip = reinterpret_cast<uint16_t*>(c.dw.data_ptr<at::BFloat16>());
  int8_t* lop = c.dw_lo.data_ptr<int8_t>();
  const T* hp = t.h.data_ptr<T>();
  const int32_t* ck = w.ck;
  const float* cv = w.cv;
  const int32_t* cn = w.cn;
  const float* off = w.off;
  const float* u = nullptr;  // sum_i c0_i h_i, added to every row of dW
  if (d.flat) {
    float* us = w.usum.data_ptr<float>();
    std::fill(us, us + dim, 0.f);
    for (int64_t i = 0; i < cnt; ++i) {
      if (off[i] == 0.f) continue;
      for (int64_t k = 0; k < dim; ++k) us[k] += off[i] * static_cast<float>(hp[i * dim + k]);
    }
    u = us;
  }
  // brgemm: A = rows of dz^T (pack_dzt, kBrgRows at a time), B = h_tile in pairs (once per tile), K = kp
  const int64_t kp = (cnt + 31) / 32 * 32;
  if (p.brg) {
    pack_h_pairs(reinterpret_cast<const uint16_t*>(hp), cnt, dim, kp,
                 reinterpret_cast<uint32_t*>(w.h_pack.data_ptr<int32_t>()));
  }
  parallel_claim(nblk, [&](const auto& next) {
    const int tid = at::get_thread_num();
    float* cb = cbase + static_cast<int64_t>(tid) * vb * dim;
    // rows [r0, r0 + nr) of dW, their fp32 GEMM result in cb: the corrections, then the hi / lo update
    const auto finish = [&](int64_t r0, int64_t nr) {
      for (int64_t i = 0; i < cnt; ++i) {
        for (int32_t q = 0; q < cn[i]; ++q) {
          const int64_t k = ck[i * kCorrCap + q] - r0;
          if (k < 0 || k >= nr) continue;
          const float r = cv[i * kCorrCap + q];
          float* cr = cb + k * dim;
          const T* hr = hp + i * dim;
          for (int64_t e = 0; e < dim; ++e) cr[e] += r * static_cast<float>(hr[e]);
        }
      }
#if GRAO_X86
      if (p.vec) {
        acc_hilo_avx512(hip + r0 * dim, lop + r0 * dim, cb, u, nr, dim);
        return;
      }
#endif
      acc_hilo_scalar(hip + r0 * dim, lop + r0 * dim, cb, u, nr, dim);
    };
    for (int64_t blk; (blk = next()) >= 0;) {
      const int64_t k0 = blk * vb, kb = std::min(vb, vocab - k0);
      if (p.brg) {
#if GRAO_X86
        // kBrgRows vocabulary rows at a time, each finished while its GEMM result is in cache
        uint16_t* dzt = reinterpret_cast<uint16_t*>(w.dzt_buf.data_ptr<at::BFloat16>()) + tid * kBrgRows * kp_max;
        const c10::BFloat16* hb = reinterpret_cast<const c10::BFloat16*>(w.h_pack.data_ptr<int32_t>());
        for (int64_t m0 = 0; m0 < kb; m0 += kBrgRows) {
          const int64_t r0 = k0 + m0, mb = std::min(kBrgRows, kb - m0);
          pack_dzt(reinterpret_cast<const uint16_t*>(d.dz16), ld16, cnt, r0, mb, kp, dzt);
          for (int64_t d0 = 0; d0 < dim; d0 += kLdb) {
            w.bapi->gemm(mb, std::min(kLdb, dim - d0), kp, kp, kLdb, dim, false,
                         reinterpret_cast<const c10::BFloat16*>(dzt), hb + d0 / kLdb * kp * kLdb, cb + d0, true);
          }
          finish(r0, mb);
        }
#endif
      } else {
        at::Tensor cbt = at::from_blob(cb, {kb, dim}, f32);
        gemm_rm(true, false, kb, dim, cnt, d.dz.narrow(1, k0, kb), t.h, 0.f, cbt, p.direct);  // dz^T h, block
        finish(k0, kb);
      }
    }
    if (p.brg) w.bapi->release(true);
  });
}

// db32 [V] += column sums of the fp32 dz (threads over vocabulary blocks)
inline void grad_bias(const Call& c, const Tile& t, const float* z) {
  float* db = c.db32.data_ptr<float>();
  const int64_t vocab = c.vocab, cnt = t.cnt;
  at::parallel_for(0, vocab, 2048, [&](int64_t lo, int64_t hi) {
    for (int64_t i = 0; i < cnt; ++i) {
      const float* zr = z + i * vocab;
      for (int64_t k = lo; k < hi; ++k) db[k] += zr[k];
    }
  });
}

// The tile's gradients from its dz: z the fp32 dz in z_buf (nullptr: compact tile), dz16 its bf16 copy (bf16 inputs)
template <typename T>
void tile_grads(const Call& c, const Plan& p, Workspace& w, const Tile& t, float* z, at::BFloat16* dz16) {
  TileDz d;
  d.dz = !p.bf16 ? w.z_buf.narrow(0, 0, t.cnt)
                 : at::from_blob(dz16, {t.cnt, c.vocab}, {w.ld16, 1}, c.hidden.options().dtype(at::kBFloat16));
  d.z = z;
  d.dz16 = dz16;
  d.flat = p.corr && std::any_of(w.off, w.off + t.cnt, [](float v) { return v != 0.f; });
  if (c.need_h) grad_hidden<T>(c, p, w, t, d);
  if (c.need_w && !p.bf16) {
    grad_weight_fp32(c, p, t, d);
  } else if (c.need_w) {
    grad_weight_bf16<T>(c, p, w, t, d);
  }
  if (c.need_b && c.has_bias) grad_bias(c, t, d.z);
}

}  // namespace
