// The pass over token tiles, pass_impl, behind grao_cpu.cpp's entry point: per tile the logits GEMM, the softmax
// rows (or the compact bf16 tile, or the forward-only fold), then dh, dW and db.
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
#pragma once

#include "common.h"
#include "compact.h"
#include "gemm.h"
#include "hilo.h"
#include "rows.h"

namespace {

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
  // schedule). Four groups per thread: with two, the last group's thread left the other idle for a while (bf16 fused
  // pass, paired with a bf16 matmul, 41 pairs: 1.03x of the floor with four, 1.10x with two); each group costs a
  // [tile rows x D] fp32 partial (1 MiB at 512 x 512).
  const int64_t dh_chunks = (vocab / 2 * 2 + kc - 1) / kc;
  const int64_t dh_groups = std::max<int64_t>(1, std::min<int64_t>(dh_chunks, 4 * nthreads));
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

  const auto store_row = [&](int64_t tok, const RowOut& o) {  // a row's results into the outputs, at its token
    logp_p[tok] = o.logp;
    lse_p[tok] = o.max;
    lse_p[n_tok + tok] = o.log_sum;
    if (ent_p) ent_p[tok] = o.entropy;
  };
  // A folded row (forward only, compact tile): its blocks' statistics merged, its results written out for token tok
  const auto finish_row = [&](const RowStats* blocks, float picked, int64_t tok) {
    const RowStats row = merge_blocks(blocks, nfb);
    store_row(tok, row_result(row.m, row.s, row.t, picked, want_entropy));
    return row;
  };
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
        brgemm_logits(bapi, ha, cnt, dim, wp16 + v0 * dim, nb, buf, zb, nb);  // Z block [cnt, nb]
        for (int64_t i = 0; i < cnt; ++i) {
          const int64_t l = lab[row_ids[start + i]] - v0;
          fold_store_avx512(zb + i * nb, nb, b32 ? b32 + v0 : nullptr, inv_t, scale, want_entropy,
                            l >= 0 && l < nb ? l : -1, xp + i * vocab + v0, stb[i * nfb + blk], m2t[i], picked[i]);
        }
      }
      bapi.release(true);
    });
    parallel_claim(cnt, [&](const auto& next) {  // rows one at a time: each row's results are its own
      for (int64_t i; (i = next()) >= 0;) {
        float m2 = ninf;
        for (int t = 0; t < nthreads; ++t) m2 = std::max(m2, m2p[t * tm + i]);
        const int64_t tok = row_ids[start + i];
        const RowStats row = finish_row(stb + i * nfb, picked[i], tok);
        const float m = row.m, s = row.s;
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
        label_entry(job, x, at_label, sp.c0, true);
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
            brgemm_logits(bapi, ha, cnt, dim, wp16 + v0 * dim, nb, wt_base + static_cast<int64_t>(tid) * wstride, zb,
                          nb);
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
      for (int64_t i = 0; i < cnt; ++i) finish_row(stb + i * nfb, picked[i], row_ids[start + i]);
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
      const uint16_t* wp16 = reinterpret_cast<const uint16_t*>(weight.data_ptr<T>());
      const c10::BFloat16* ha = reinterpret_cast<const c10::BFloat16*>(h_tile.data_ptr<T>());
      uint32_t* wt_base = reinterpret_cast<uint32_t*>(w_pack.data_ptr<int32_t>());
      parallel_claim((vocab + kLdb - 1) / kLdb, [&](const auto& next) {
        uint32_t* buf = wt_base + static_cast<int64_t>(at::get_thread_num()) * wstride;
        for (int64_t blk; (blk = next()) >= 0;) {
          const int64_t v0 = blk * kLdb;
          brgemm_logits(bapi, ha, cnt, dim, wp16 + v0 * dim, std::min(kLdb, vocab - v0), buf, z + v0, vocab);
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
        store_row(tok, o);
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
        // pairs (pack_w_pairs) and adding dz[:, chunk] W[chunk] into the group's fp32 partial (the group's first chunk
        // writes it); the partials are summed in group order. An odd V's last row is a rank-1 update (K must be even).
        float* parts = dh_part.data_ptr<float>();
        const uint16_t* wp16 = reinterpret_cast<const uint16_t*>(weight.data_ptr<T>());
        const c10::BFloat16* da = reinterpret_cast<const c10::BFloat16*>(dz16);
        uint32_t* wt_base = reinterpret_cast<uint32_t*>(w_pack.data_ptr<int32_t>());
        const int64_t veven = vocab / 2 * 2;
        parallel_claim(dh_groups, [&](const auto& next) {
          const int tid = at::get_thread_num();
          uint32_t* buf = wt_base + tid * wstride;
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

}  // namespace
