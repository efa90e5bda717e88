// A tile's logits and their softmax, the steps the pass's variants (pass.h) are made of: the logits GEMM into the
// [tile x V] buffer and the row kernels over it (softmax_rows), the forward-only online softmax over vocabulary blocks
// (fold_tile, finish_folded_rows), and the compact bf16 tile (compact_tile).
#pragma once

#include "compact.h"
#include "gemm.h"
#include "plan.h"
#include "rows.h"

namespace {

// Z [cnt, V] = h_tile W^T into z_buf, fp32 (bf16 inputs: no bf16 rounding of the logits). Returns z.
template <typename T>
float* logits_tile(const Call& c, const Plan& p, Workspace& w, const Tile& t) {
  const int64_t cnt = t.cnt, vocab = c.vocab, dim = c.dim;
  at::Tensor z_tile = w.z_buf.narrow(0, 0, cnt);
  float* z = z_tile.data_ptr<float>();
  if (p.brg) {
#if GRAO_X86
    // threads over blocks of 64 vocabulary rows, each packed (pack_wt_block) then used by all the tile's rows,
    // kBrgRows at a time
    const BrgemmApi& bapi = *w.bapi;
    const uint16_t* wp16 = reinterpret_cast<const uint16_t*>(c.weight.data_ptr<T>());
    const c10::BFloat16* ha = reinterpret_cast<const c10::BFloat16*>(t.h.data_ptr<T>());
    uint32_t* wt_base = reinterpret_cast<uint32_t*>(w.w_pack.data_ptr<int32_t>());
    parallel_claim((vocab + kLdb - 1) / kLdb, [&](const auto& next) {
      uint32_t* buf = wt_base + static_cast<int64_t>(at::get_thread_num()) * w.wstride;
      for (int64_t blk; (blk = next()) >= 0;) {
        const int64_t v0 = blk * kLdb;
        brgemm_logits(bapi, ha, cnt, dim, wp16 + v0 * dim, std::min(kLdb, vocab - v0), buf, z + v0, vocab);
      }
      bapi.release(true);
    });
#endif
  } else {
    gemm_rm(false, true, cnt, vocab, dim, t.h, c.weight, 0.f, z_tile, p.direct);
  }
  return z;
}

// Threads over the tile's rows of z, each row while it is in L2 (row_avx512 / row_scalar): bias and 1 / T, max,
// exp-sum, the log-prob and the entropy into the outputs; with gradients dz in place (and, dz16 set, its bf16 copy
// with the corrections of its large entries).
inline void softmax_rows(const Call& c, const Plan& p, Workspace& w, const Tile& t, float* z, at::BFloat16* dz16) {
  at::parallel_for(0, t.cnt, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t tok = c.row_ids[t.start + i];
      if (p.corr) {
        w.cn[i] = 0;
        w.off[i] = 0.f;
      }
      RowJob job{z + i * c.vocab, c.b32, c.vocab, c.inv_t, c.scale, c.lab[tok], p.grads,
                 p.grads ? static_cast<float>(c.g[tok] / c.temperature) : 0.f,
                 dz16 ? dz16 + i * w.ld16 : nullptr, p.keep32, c.want_entropy,
                 p.corr ? w.ck + i * kCorrCap : nullptr, p.corr ? w.cv + i * kCorrCap : nullptr,
                 p.corr ? w.cn + i : nullptr, p.corr ? w.off + i : nullptr};
#if GRAO_X86
      const RowOut o = p.vec ? row_avx512(job) : row_scalar(job);
#else
      const RowOut o = row_scalar(job);
#endif
      store_row(c, tok, o);
    }
  });
}

// A folded row: its blocks' statistics merged in block order, its results written out for token tok
inline RowStats finish_row(const Call& c, const Workspace& w, const RowStats* blocks, float picked, int64_t tok) {
  const RowStats row = merge_blocks(blocks, w.nfb);
  store_row(c, tok, row_result(row.m, row.s, row.t, picked, c.want_entropy));
  return row;
}

// Forward only, no [tile x V] logits: threads over blocks of fcols vocabulary columns, each block's logits for the
// tile's rows computed into the thread's cache-sized buffer (zf_buf) and folded there into each row's statistics for
// that block (fold_avx512 / fold_scalar), the label's scaled logit picked on the way.
template <typename T>
void fold_tile(const Call& c, const Plan& p, Workspace& w, const Tile& t) {
  const int64_t cnt = t.cnt, vocab = c.vocab, dim = c.dim, fcols = w.fcols, nfb = w.nfb;
  const auto f32 = c.hidden.options().dtype(at::kFloat);
  RowStats* stb = reinterpret_cast<RowStats*>(w.st_buf.data_ptr<float>());
  float* picked = w.picked_buf.data_ptr<float>();
  float* zf_base = w.zf_buf.data_ptr<float>();
  const c10::BFloat16* ha = p.bf16 ? reinterpret_cast<const c10::BFloat16*>(t.h.data_ptr<T>()) : nullptr;
  const uint16_t* wp16 = p.bf16 ? reinterpret_cast<const uint16_t*>(c.weight.data_ptr<T>()) : nullptr;
  uint32_t* wt_base = p.brg ? reinterpret_cast<uint32_t*>(w.w_pack.data_ptr<int32_t>()) : nullptr;
  const at::Tensor wd = c.weight.detach();  // ATen GEMMs on the worker threads, where grad mode is not inherited
  parallel_claim(nfb, [&](const auto& next) {
    const int tid = at::get_thread_num();
    float* zb = zf_base + static_cast<int64_t>(tid) * w.tm * fcols;
    for (int64_t blk; (blk = next()) >= 0;) {
      const int64_t v0 = blk * fcols, nb = std::min(fcols, vocab - v0);
      if (p.brg) {  // Z block [cnt, nb] (leading dimension nb), 64 columns per packed block of W
#if GRAO_X86
        brgemm_logits(*w.bapi, ha, cnt, dim, wp16 + v0 * dim, nb, wt_base + static_cast<int64_t>(tid) * w.wstride, zb,
                      nb);
#endif
      } else {
        gemm_rm(false, true, cnt, nb, dim, t.h, wd.narrow(0, v0, nb), 0.f, at::from_blob(zb, {cnt, nb}, f32),
                p.direct);
      }
      for (int64_t i = 0; i < cnt; ++i) {
        float* zr = zb + i * nb;
        RowStats& st = stb[i * nfb + blk];
        st = RowStats{-std::numeric_limits<float>::infinity(), 0.f, 0.f};
        const float* bias = c.b32 ? c.b32 + v0 : nullptr;
#if GRAO_X86
        if (p.vec) {
          fold_avx512(zr, nb, bias, c.inv_t, c.scale, c.want_entropy, st);
        } else {
          fold_scalar(zr, nb, bias, c.inv_t, c.scale, c.want_entropy, st);
        }
#else
        fold_scalar(zr, nb, bias, c.inv_t, c.scale, c.want_entropy, st);
#endif
        const int64_t l = c.lab[c.row_ids[t.start + i]] - v0;
        if (l >= 0 && l < nb) picked[i] = zr[l];  // scaled in place by the fold
      }
    }
    if (p.brg) w.bapi->release(true);
  });
}

// The folded tile's rows, their blocks merged in block order, into the outputs
inline void finish_folded_rows(const Call& c, const Workspace& w, const Tile& t) {
  const RowStats* stb = reinterpret_cast<const RowStats*>(w.st_buf.data_ptr<float>());
  const float* picked = w.picked_buf.data_ptr<float>();
  for (int64_t i = 0; i < t.cnt; ++i) finish_row(c, w, stb + i * w.nfb, picked[i], c.row_ids[t.start + i]);
}

#if GRAO_X86
// A compact tile (bf16 with gradients; fold_store_avx512): threads over blocks of fcols vocabulary columns, each
// block's logits for the tile's rows computed into the thread's cache-sized buffer and folded there, only their fp16
// exponentials kept (dz16_buf, leading dimension V); then threads over rows: the threads' statistics merged, the
// log-prob, and the dz sweep in place (dz_compact_avx512), which leaves bf16(dz - c0) in dz16_buf and the row's
// corrections.
template <typename T>
void compact_tile(const Call& c, Workspace& w, const Tile& t) {
  const int64_t cnt = t.cnt, start = t.start, vocab = c.vocab, dim = c.dim, tm = w.tm, fcols = w.fcols,
                nfb = w.nfb;
  const int nthreads = w.nthreads;
  const BrgemmApi& bapi = *w.bapi;
  const float ninf = -std::numeric_limits<float>::infinity();
  RowStats* stb = reinterpret_cast<RowStats*>(w.st_buf.data_ptr<float>());
  float* picked = w.picked_buf.data_ptr<float>();
  float* zf_base = w.zf_buf.data_ptr<float>();
  float* m2p = w.m2_buf.data_ptr<float>();
  uint16_t* xp = reinterpret_cast<uint16_t*>(w.dz16_buf.data_ptr<at::BFloat16>());
  std::fill(m2p, m2p + nthreads * tm, ninf);
  const uint16_t* hp16 = reinterpret_cast<const uint16_t*>(t.h.data_ptr<T>());
  const c10::BFloat16* ha = reinterpret_cast<const c10::BFloat16*>(hp16);
  const uint16_t* wp16 = reinterpret_cast<const uint16_t*>(c.weight.data_ptr<T>());
  uint32_t* wt_base = reinterpret_cast<uint32_t*>(w.w_pack.data_ptr<int32_t>());
  const float* b32 = c.b32;
  parallel_claim(nfb, [&](const auto& next) {
    const int tid = at::get_thread_num();
    float* zb = zf_base + static_cast<int64_t>(tid) * tm * fcols;
    float* m2t = m2p + static_cast<int64_t>(tid) * tm;
    uint32_t* buf = wt_base + static_cast<int64_t>(tid) * w.wstride;
    for (int64_t blk; (blk = next()) >= 0;) {
      const int64_t v0 = blk * fcols, nb = std::min(fcols, vocab - v0);
      brgemm_logits(bapi, ha, cnt, dim, wp16 + v0 * dim, nb, buf, zb, nb);  // Z block [cnt, nb]
      for (int64_t i = 0; i < cnt; ++i) {
        const int64_t l = c.lab[c.row_ids[start + i]] - v0;
        fold_store_avx512(zb + i * nb, nb, b32 ? b32 + v0 : nullptr, c.inv_t, c.scale, c.want_entropy,
                          l >= 0 && l < nb ? l : -1, xp + i * vocab + v0, stb[i * nfb + blk], m2t[i], picked[i]);
      }
    }
    bapi.release(true);
  });
  int32_t* ck = w.ck;
  float* cv = w.cv;
  int32_t* cn = w.cn;
  float* off = w.off;
  parallel_claim(cnt, [&](const auto& next) {  // rows one at a time: each row's results are its own
    for (int64_t i; (i = next()) >= 0;) {
      float m2 = ninf;
      for (int q = 0; q < nthreads; ++q) m2 = std::max(m2, m2p[q * tm + i]);
      const int64_t tok = c.row_ids[start + i];
      const RowStats row = finish_row(c, w, stb + i * nfb, picked[i], tok);
      const float m = row.m, s = row.s;
      const float coef = static_cast<float>(c.g[tok] / c.temperature);
      const float a = -coef / s;
      const float e_label = std::exp(picked[i] - m);
      const float at_label = e_label * a + coef;
      const GradSplit sp = grad_split(e_label, a, at_label, coef, m2, m, s, vocab);
      cn[i] = 0;
      const RowJob job{nullptr, b32, vocab, c.inv_t, c.scale, c.lab[tok], true, coef, nullptr, false,
                       c.want_entropy, ck + i * kCorrCap, cv + i * kCorrCap, cn + i, off + i};
      uint16_t* x = xp + i * vocab;
      dz_compact_avx512(x, job, CompactRow{stb + i * nfb, fcols, m, a, sp.c0, sp.thr, hp16 + i * dim, wp16, dim});
      label_entry(job, x, at_label, sp.c0, true);
    }
  });
}
#endif

}  // namespace
