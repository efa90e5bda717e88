// The pass over token tiles behind grao_cpu.cpp's entry point: pass_impl sets up the call (outputs, Plan,
// Workspace: plan.h) and runs one of four variants, a function each that reads top to bottom as a loop over tiles of
// the steps in tile.h (logits and softmax) and grads.h (dh, dW, db): pass_forward_folded, pass_forward_logits,
// pass_grads_logits, pass_grads_compact.
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
#include "grads.h"
#include "plan.h"
#include "tile.h"

namespace {

// Forward only (the default): no [tile x V] logits. Per tile, threads over blocks of the vocabulary fold each block's
// logits, while they are in cache, into the rows' running softmax statistics (an online softmax), then each row's
// blocks are merged in block order.
template <typename T>
void pass_forward_folded(const Call& c, const Plan& p, Workspace& w) {
  for (int64_t start = 0; start < c.active; start += w.tm) {
    const Tile t = gather_tile(c, w, start);
    fold_tile<T>(c, p, w, t);
    finish_folded_rows(c, w, t);
  }
}

// Forward only through the [tile x V] logits buffer, as the passes with gradients (Isa::kForwardLogits; tests and
// comparisons): per tile the logits GEMM, then the row kernels.
template <typename T>
void pass_forward_logits(const Call& c, const Plan& p, Workspace& w) {
  for (int64_t start = 0; start < c.active; start += w.tm) {
    const Tile t = gather_tile(c, w, start);
    float* z = logits_tile<T>(c, p, w, t);
    softmax_rows(c, p, w, t, z, nullptr);
  }
}

// With gradients through the fp32 [tile x V] logits buffer (fp32; bf16 off the compact tile: without brgemm or the
// AVX-512 kernels, with a bias gradient, or Isa::kFp32Tile): per tile the logits GEMM, the row kernels (dz in
// place; bf16: its bf16 copy over the start of each fp32 row, or into dz16_buf when the bias gradient keeps the
// fp32 dz), then dh, dW and db.
template <typename T>
void pass_grads_logits(const Call& c, const Plan& p, Workspace& w) {
  for (int64_t start = 0; start < c.active; start += w.tm) {
    const Tile t = gather_tile(c, w, start);
    float* z = logits_tile<T>(c, p, w, t);
    at::BFloat16* dz16 = !p.bf16 ? nullptr
                         : w.dz16_buf.defined() ? w.dz16_buf.data_ptr<at::BFloat16>()
                                                : reinterpret_cast<at::BFloat16*>(z);
    softmax_rows(c, p, w, t, z, dz16);
    tile_grads<T>(c, p, w, t, z, dz16);
  }
}

// bf16 with gradients through the compact tile (brgemm, AVX-512, no bias gradient): per tile (twice the rows of the
// fp32 buffer) the logits folded block by block and kept as fp16 exponentials, the dz sweep over them (compact.h),
// then dh and dW from the bf16 dz.
template <typename T>
void pass_grads_compact(const Call& c, const Plan& p, Workspace& w) {
#if GRAO_X86
  for (int64_t start = 0; start < c.active; start += w.tm) {
    const Tile t = gather_tile(c, w, start);
    compact_tile<T>(c, w, t);
    tile_grads<T>(c, p, w, t, nullptr, w.dz16_buf.data_ptr<at::BFloat16>());
  }
#else
  TORCH_CHECK(false, "grao_cpu: the compact tile needs x86-64");  // not reached: make_plan needs brgemm for it
#endif
}

// The pass of logprob_pass (grao_cpu.cpp; arguments checked there): the outputs, then the variant the plan names.
// isa: Isa's bits (plan.h), tests of the fallbacks.
template <typename T>
std::vector<at::Tensor> pass_impl(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& rows,
                                  const c10::optional<at::Tensor>& grad_logp, double temperature,
                                  bool want_entropy, bool need_h, bool need_w, bool need_b, int64_t tile_rows,
                                  int64_t isa) {
  const bool grads = grad_logp.has_value();
  const bool bf16 = std::is_same<T, at::BFloat16>::value;
  Call c{};
  c.hidden = hidden;
  c.weight = weight;
  c.rows = rows;
  c.n_tok = hidden.size(0);
  c.dim = hidden.size(1);
  c.vocab = weight.size(0);
  c.active = rows.numel();
  c.temperature = temperature;
  c.want_entropy = want_entropy;
  c.need_h = need_h;
  c.need_w = need_w;
  c.need_b = need_b;
  c.has_bias = bias.has_value();
  auto f32 = hidden.options().dtype(at::kFloat);
  c.logp = at::zeros({c.n_tok}, f32);
  c.lse = at::zeros({2, c.n_tok}, f32);
  c.ent = want_entropy ? at::zeros({c.n_tok}, f32) : at::empty({0}, f32);
  // The gradients, [N, D] and [V, D], are mapped zero pages too (mapped_empty), never glibc heap blocks: a freed
  // [V, D] gradient (31 MiB at V = 32000, D = 512 bf16) raised glibc's mmap threshold to its size, after which the
  // next call's gradients came from the heap, where fragmentation now and then kept a second one resident (peak
  // +31 MiB in about one bf16 benchmark run in three).
  c.dh = grads && need_h ? mapped_empty(hidden.sizes(), hidden.scalar_type()) : at::empty({0}, f32);
  // dW: fp32 weights accumulate in the output itself (GEMMs with beta = 1); bf16 ones in the output as the high
  // part plus an int8 residual (acc_hilo_*), mapped zero pages.
  const bool want_w = grads && need_w;
  c.dw = !want_w ? at::empty({0}, f32) : mapped_empty({c.vocab, c.dim}, weight.scalar_type());
  c.dw_lo = want_w && bf16 ? mapped_empty({c.vocab, c.dim}, at::kChar) : at::Tensor();
  const bool want_b = grads && need_b && c.has_bias;
  c.db32 = want_b ? at::zeros({c.vocab}, f32) : at::empty({0}, f32);
  c.bias32 = c.has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const auto result = [&]() -> std::vector<at::Tensor> {
    return {c.logp, c.lse, c.ent, c.dh, c.dw, want_b ? c.db32.to(bias->scalar_type()) : c.db32};
  };
  if (c.active == 0) return result();
  c.lab = labels.data_ptr<int64_t>();
  c.row_ids = rows.data_ptr<int64_t>();
  c.g = grads ? grad_logp->data_ptr<float>() : nullptr;
  c.b32 = c.has_bias ? c.bias32.data_ptr<float>() : nullptr;
  c.inv_t = static_cast<float>(1.0 / temperature);
  c.scale = c.has_bias || temperature != 1.0;
  c.logp_p = c.logp.data_ptr<float>();
  c.lse_p = c.lse.data_ptr<float>();
  c.ent_p = want_entropy ? c.ent.data_ptr<float>() : nullptr;

  const Plan p = make_plan(c, bf16, tile_rows, isa);
  Workspace w = make_workspace(c, p);
  switch (p.variant) {
    case Variant::kForwardFolded:
      pass_forward_folded<T>(c, p, w);
      break;
    case Variant::kForwardLogits:
      pass_forward_logits<T>(c, p, w);
      break;
    case Variant::kGradsLogits:
      pass_grads_logits<T>(c, p, w);
      break;
    case Variant::kGradsCompact:
      pass_grads_compact<T>(c, p, w);
      break;
  }
  return result();
}

}  // namespace
