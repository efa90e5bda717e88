// What one pass runs and on what: the isa bits named (Isa), the call's inputs and outputs (Call), the variant and the
// choices made for it (Plan), and the one workspace every variant shares (Workspace, allocated once per call).
#pragma once

#include "common.h"
#include "gemm.h"
#include "rows.h"

namespace {

// The `isa` argument of logprob_pass: a bit set that forces fallbacks, for tests and comparisons. The values are
// those grao_kernels' native_pass passes (an int); 0 runs the fastest path this CPU and torch allow.
struct Isa {
  enum : int64_t {
    kScalarRows = 1,     // the scalar row kernel instead of the AVX-512 one (CPUs without AVX-512)
    kAtenBf16Gemm = 2,   // ATen's GEMMs for bf16: neither MKL's bf16 GEMM nor brgemm (torch without MKL's)
    kMklBf16Gemm = 4,    // MKL's bf16 GEMM instead of oneDNN's brgemm (CPUs without AMX)
    kForwardLogits = 8,  // forward only through the [tile x V] logits buffer instead of the online softmax
    kFp32Tile = 16,      // bf16 with gradients through the fp32 logits tile instead of the compact fp16 tile
  };
};
static_assert(Isa::kScalarRows == 1 && Isa::kAtenBf16Gemm == 2 && Isa::kMklBf16Gemm == 4 &&
                  Isa::kForwardLogits == 8 && Isa::kFp32Tile == 16,
              "the isa bits are part of the Python interface (grao_kernels' native_pass)");

// One call's inputs (sizes and raw pointers, read by every step) and its outputs.
struct Call {
  at::Tensor hidden;  // [N, D]
  at::Tensor weight;  // [V, D], contiguous
  at::Tensor rows;    // [active] the tokens to visit
  int64_t n_tok, dim, vocab, active;
  const int64_t* lab;        // [N] labels
  const int64_t* row_ids;    // [active]
  const float* g;            // [N] incoming gradient of the log-probs, or nullptr (forward only)
  const float* b32;          // [V] the bias in fp32, or nullptr
  double temperature;
  float inv_t;               // 1 / temperature
  bool scale;                // bias or temperature != 1: logits are scaled in place, (z + b) / T
  bool want_entropy, need_h, need_w, need_b, has_bias;
  // outputs: logp [N], lse [2, N] (max, log-sum), entropy [N] or [0]; the gradients dh [N, D], dW [V, D] (bf16: plus
  // its int8 residual dw_lo) and the fp32 bias gradient db32 [V], or [0] where not asked
  at::Tensor logp, lse, ent, dh, dw, dw_lo, db32, bias32;
  float* logp_p;
  float* lse_p;
  float* ent_p;
};

// A row's results into the outputs, at its token
inline void store_row(const Call& c, int64_t tok, const RowOut& o) {
  c.logp_p[tok] = o.logp;
  c.lse_p[tok] = o.max;
  c.lse_p[c.n_tok + tok] = o.log_sum;
  if (c.ent_p) c.ent_p[tok] = o.entropy;
}

// The pass's variants, one function each in pass.h
enum class Variant {
  kForwardFolded,  // forward only: online softmax over vocabulary blocks, no [tile x V] buffer
  kForwardLogits,  // forward only through the [tile x V] logits buffer (Isa::kForwardLogits)
  kGradsLogits,    // with gradients through the fp32 [tile x V] logits buffer (fp32; bf16 off the compact path)
  kGradsCompact,   // bf16 with gradients through the compact tile of fp16 exponentials (compact.h)
};

// How this call runs: decided once from the arguments, the isa bits and the CPU.
struct Plan {
  Variant variant;
  bool grads;   // incoming gradients given
  bool bf16;    // bf16 inputs
  bool vec;     // the AVX-512 row kernels
  bool brg;     // bf16 GEMMs through brgemm (AMX; even D: the VNNI pairs run along D in Z = h W^T)
  bool direct;  // bf16 GEMMs off brgemm through MKL's bf16 GEMM rather than ATen
  bool keep32;  // the bias gradient sums the fp32 dz: keep it (and no compact tile)
  bool corr;    // fp32 corrections of the large bf16 dz entries (kCorrFrac)
  bool want_w;  // a weight gradient is computed
  int64_t tm;   // rows per tile
};

inline Plan make_plan(const Call& c, bool bf16, int64_t tile_rows, int64_t isa) {
  Plan p{};
  p.grads = c.g != nullptr;
  p.bf16 = bf16;
  p.keep32 = c.need_b && c.has_bias;
  p.vec = !(isa & Isa::kScalarRows) && cpu_has_avx512();
  p.brg = GRAO_X86 && bf16 && c.dim % 2 == 0 && !(isa & (Isa::kAtenBf16Gemm | Isa::kMklBf16Gemm)) && brgemm_ready();
  p.direct = !(isa & Isa::kAtenBf16Gemm) && mkl_bf16_gemm() != nullptr;
  // bf16 with gradients on the AVX-512 + brgemm path keeps its tile as 16-bit exponentials (fold_store_avx512): half
  // the bytes per logit of the fp32 buffer that tile_rows is sized for, so twice the rows. Not with a bias gradient
  // (it sums the fp32 dz).
  const bool compact = p.grads && bf16 && p.brg && p.vec && !p.keep32 && !(isa & Isa::kFp32Tile);
  p.variant = !p.grads ? ((isa & Isa::kForwardLogits) ? Variant::kForwardLogits : Variant::kForwardFolded)
                       : (compact ? Variant::kGradsCompact : Variant::kGradsLogits);
  p.tm = std::max<int64_t>(1, std::min(compact ? 2 * tile_rows : tile_rows, c.active));
  p.corr = p.grads && bf16;
  p.want_w = p.grads && c.need_w;
  return p;
}

// Every workspace of a call, allocated once (make_workspace), sized by the tile (tm x V), the cache (the dW blocks,
// the fold's blocks) or W, never by N; only those the plan's variant reads are allocated. The large ones are mapped
// zero pages (mapped_empty): heap blocks of this size could pin the heap's top between calls.
struct Workspace {
  int64_t tm;        // rows per tile
  int nthreads;
  // the [tm x V] tile: fp32 logits, then dz in place (kForwardLogits, kGradsLogits); its bf16 dz (leading
  // dimension ld16) is written over the start of its own fp32 row (ld16 = 2V), or into dz16_buf (ld16 = V) when
  // the bias gradient keeps the fp32 dz, or as the compact tile's fp16 exponentials (kGradsCompact)
  at::Tensor z_buf, dz16_buf;
  int64_t ld16;
  at::Tensor h_buf;   // [tm, D] the tile's hidden rows
  at::Tensor dh_buf;  // [tm, D] fp32 dh of the tile
  // bf16 dz's corrections (rows.h, kCorrFrac): per row the corrected entries (index, value, count) and the offset
  at::Tensor corr_k, corr_v, corr_n, offs;
  int32_t* ck;
  float* cv;
  int32_t* cn;
  float* off;
  at::Tensor wsum;  // fp32 column sums of W, for the offsets of flat rows (computed when one first occurs)
  at::Tensor usum;  // [D] sum_i c0_i h_i of a tile
  // bf16 dW per tile in vocabulary blocks of vb rows (~1 MiB fp32, one [vb, D] buffer per thread, L2-resident):
  // the block's GEMM (beta = 0), its corrections, then its hi / lo update
  int64_t vb;
  at::Tensor cblk;
  // brgemm: per-thread packing buffers for a block of W (Z: 64 rows, dh: kc rows), fp32 partials of dh per group of
  // vocabulary chunks, the tile's h in pairs and rows of dz^T (dW)
  const BrgemmApi* bapi;
  int64_t ndb, kc, kp_max, wstride, dh_chunks, dh_groups;
  at::Tensor w_pack, dh_part, h_pack, dzt_buf;
  // the folds (kForwardFolded, kGradsCompact): blocks of fcols vocabulary columns, nfb of them; per thread a block's
  // logits for the tile's rows (zf_buf, ~512 KiB), each block's statistics per row (st_buf: RowStats [tm, nfb]),
  // the label's scaled logit per row (picked_buf) and, compact tile, the rows' largest non-label logit per thread
  // (m2_buf)
  int64_t fcols, nfb;
  at::Tensor zf_buf, st_buf, picked_buf, m2_buf;
};

inline Workspace make_workspace(const Call& c, const Plan& p) {
  Workspace w{};
  const int64_t tm = p.tm, vocab = c.vocab, dim = c.dim;
  const auto f32 = c.hidden.options().dtype(at::kFloat);
  const bool folded = p.variant == Variant::kForwardFolded, compact = p.variant == Variant::kGradsCompact;
  w.tm = tm;
  w.z_buf = !folded && !compact ? mapped_empty({tm, vocab}, at::kFloat) : at::Tensor();
  w.dz16_buf = p.grads && p.bf16 && (p.keep32 || compact) ? mapped_empty({tm, vocab}, at::kBFloat16) : at::Tensor();
  w.ld16 = w.dz16_buf.defined() ? vocab : 2 * vocab;
  w.h_buf = at::empty({tm, dim}, c.hidden.options());
  w.dh_buf = p.grads && c.need_h ? at::empty({tm, dim}, f32) : at::Tensor();
  if (p.corr) {
    w.corr_k = at::empty({tm, kCorrCap}, at::kInt);
    w.corr_v = at::empty({tm, kCorrCap}, at::kFloat);
    w.corr_n = at::zeros({tm}, at::kInt);
    w.offs = at::zeros({tm}, at::kFloat);
    w.usum = at::empty({dim}, at::kFloat);
    w.ck = w.corr_k.data_ptr<int32_t>();
    w.cv = w.corr_v.data_ptr<float>();
    w.cn = w.corr_n.data_ptr<int32_t>();
    w.off = w.offs.data_ptr<float>();
  }
  w.vb = std::min(vocab, std::max<int64_t>(16, (int64_t{1} << 20) / (4 * dim) / 16 * 16));
  w.nthreads = at::get_num_threads();
  w.cblk = p.want_w && p.bf16 ? at::empty({w.nthreads, w.vb, dim}, f32) : at::Tensor();
  w.bapi = &brgemm_api();
  w.ndb = (dim + kLdb - 1) / kLdb;
  w.kc = dh_chunk(dim);
  w.kp_max = (tm + 31) / 32 * 32;  // the dW GEMMs' K: the tile's rows rounded up to 32 (zero rows)
  w.wstride = std::max(dim / 2, w.kc / 2 * w.ndb) * kLdb;
  w.w_pack = p.brg ? mapped_empty({w.nthreads, w.wstride}, at::kInt) : at::Tensor();
  // dh = dz W over brgemm: vocabulary chunks of kc rows in dh_groups fixed groups, each group summed into a partial
  // of its own by whichever thread claims it, the partials then added in group order (the same sums whatever the
  // schedule). Four groups per thread: with two, the last group's thread left the other idle for a while (bf16 fused
  // pass, paired with a bf16 matmul, 41 pairs: 1.03x of the floor with four, 1.10x with two); each group costs a
  // [tile rows x D] fp32 partial (1 MiB at 512 x 512).
  w.dh_chunks = (vocab / 2 * 2 + w.kc - 1) / w.kc;
  w.dh_groups = std::max<int64_t>(1, std::min<int64_t>(w.dh_chunks, 4 * w.nthreads));
  w.dh_part = p.brg && p.grads && c.need_h ? mapped_empty({w.dh_groups, tm, dim}, at::kFloat) : at::Tensor();
  w.h_pack = p.brg && p.want_w ? mapped_empty({w.ndb, w.kp_max / 2 * kLdb}, at::kInt) : at::Tensor();
  w.dzt_buf = p.brg && p.want_w ? mapped_empty({w.nthreads, kBrgRows, w.kp_max}, at::kBFloat16) : at::Tensor();
  // The folds' blocks: ~512 KiB of logits ([tm x fcols] fp32) per thread, so they never leave the cache (the
  // two-pass rows read a [tile x V] buffer back from memory: fp32 forward 1.21x its matmul floor, measured).
  w.fcols = std::min(vocab, std::max<int64_t>(64, (int64_t{1} << 17) / tm / 64 * 64));
  w.nfb = (vocab + w.fcols - 1) / w.fcols;
  static_assert(sizeof(RowStats) == 3 * sizeof(float), "RowStats is three floats");
  if (folded || compact) {
    w.zf_buf = mapped_empty({w.nthreads, tm * w.fcols}, at::kFloat);
    w.st_buf = at::empty({tm, w.nfb, 3}, f32);
    w.picked_buf = at::empty({tm}, f32);
  }
  w.m2_buf = compact ? at::empty({w.nthreads, tm}, f32) : at::Tensor();
  return w;
}

// The tile of rows [start, start + cnt) of the active tokens, their hidden states gathered into h_buf
struct Tile {
  int64_t start, cnt;
  at::Tensor h;  // [cnt, D]
};

inline Tile gather_tile(const Call& c, Workspace& w, int64_t start) {
  const int64_t cnt = std::min(w.tm, c.active - start);
  at::Tensor h = w.h_buf.narrow(0, 0, cnt);
  at::index_select_out(h, c.hidden, 0, c.rows.narrow(0, start, cnt));
  return {start, cnt, h};
}

}  // namespace
