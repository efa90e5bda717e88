// Shared by the native CPU kernel's files (csrc/grao_cpu.cpp includes them all, one translation unit): the
// includes, the AVX-512 target attribute and the CPU check, workspaces mapped from the kernel, bf16 rounding, and
// the threads' schedule.
#pragma once

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

inline uint16_t bf16_bits(float x) {
  return c10::BFloat16(x).x;  // round to nearest even, as torch's .to(torch.bfloat16)
}

inline float bf16_round(float x) { return static_cast<float>(c10::BFloat16(x)); }


#if GRAO_X86
// AVX-512 code is compiled per function with this target attribute and chosen at run time (cpu_has_avx512), so
// the file itself needs no -march flag.
#define GRAO_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

GRAO_AVX512 inline __m512 from_bf16_avx512(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
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

// Work items [0, n) over the threads, claimed one at a time from a shared counter (dynamic scheduling): each thread
// runs body(next) once, next() handing it its next item or -1 when none is left. A static split left one thread
// waiting at the end of each region whenever the other's vCPU ran slower for a while (this shared VM's do): the
// bf16 fused pass measured 1.07x its matmul floor this way and 1.13x with at::parallel_for's static chunks (paired,
// 15 pairs each, N = 4096, D = 512, V = 32000, 2 threads; measured before the callers' sums were made independent
// of the schedule). Callers keep their sums independent of which thread took which item (results are bitwise
// repeatable). In a nested region at::parallel_for runs inline and the one body claims every item.
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

}  // namespace
