// Native CPU pass of grao_kernels: per-token log-probs of labels from hidden states and the lm_head,
// optionally with the input gradients for known per-token loss gradients, without [tokens x vocab] logits.
//
// Built on first use by grao_kernels/cpu/native.py (torch.utils.cpp_extension.load) and called from the
// linear_logprob and fused_linear_grao torch.library ops; semantics are those of grao_kernels/cpu/chunked.py
// and are tested against grao_kernels.reference (tests/test_native_cpu.py).
//
// Files (one translation unit: this file includes the others): this one, the entry point (argument checks,
// dispatch on dtype) and the Python binding; pass.h the pass over token tiles (pass_impl, one function per
// variant) and its design; plan.h the isa bits, the plan and the workspace of a call; tile.h a tile's logits and
// softmax; grads.h a tile's dh, dW and db; rows.h the row kernels and the online softmax; compact.h the compact
// bf16 tile's row kernels; gemm.h the GEMMs (ATen, MKL's bf16 GEMM, oneDNN's brgemm) and their operands' packing;
// hilo.h the bf16 dW accumulator; common.h what they share.

#include "pass.h"

namespace {

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
