// A bfloat16 linear layer for a decode step's few rows on CPUs with AVX-512 BF16 (see bf16_kernel.py).
//
// The weight is blocked once, at load, as [N / 16][K / 2][16][2]: for each block of 16 outputs, one
// 64-byte vector per pair of inputs, the layout _mm512_dpbf16_ps multiplies by a broadcast pair of
// input values. The product streams each block's vectors once from memory, front to back, and keeps
// every row's sums in registers (float32): a tile is up to 4 rows by 4 blocks (64 outputs), or 8
// rows by 2 blocks for 5 rows and more. The tiles of outputs are spread over ATen's intra-op threads
// (at::parallel_for: the same OpenMP team as every other operator of the step).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kBlock = 16;  // outputs per block: one vector of float32 sums

template <int MT, int NT>
inline void tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t pairs, int64_t block_stride, float* sums) {
  __m512 acc[MT][NT];
  for (int m = 0; m < MT; m++)
    for (int t = 0; t < NT; t++) acc[m][t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; p++) {
    __m512bh wv[NT];
    for (int t = 0; t < NT; t++) wv[t] = (__m512bh)_mm512_loadu_si512((const void*)(w + t * block_stride + p * 2 * kBlock));
    for (int m = 0; m < MT; m++) {
      int32_t pair;
      std::memcpy(&pair, x + m * ldx + 2 * p, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int t = 0; t < NT; t++) acc[m][t] = _mm512_dpbf16_ps(acc[m][t], xv, wv[t]);
    }
  }
  for (int m = 0; m < MT; m++)
    for (int t = 0; t < NT; t++) _mm512_storeu_ps(sums + (m * NT + t) * kBlock, acc[m][t]);
}

using TileFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, float*);

template <int NT, int... MS>
TileFn pick(int rows, std::integer_sequence<int, MS...>) {
  TileFn fn = nullptr;
  ((rows == MS + 1 ? (fn = &tile<MS + 1, NT>, 0) : 0), ...);
  return fn;
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "hfserve_bf16::linear takes bfloat16");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == kBlock && weight.size(3) == 2 && weight.is_contiguous(), "weight not blocked by pack()");
  const int64_t blocks = weight.size(0), pairs = weight.size(1);
  const int64_t K = input.size(-1);
  TORCH_CHECK(K == 2 * pairs || K == 2 * pairs - 1, "input features ", K, " do not match the weight's ", 2 * pairs);
  TORCH_CHECK(out_features > (blocks - 1) * kBlock && out_features <= blocks * kBlock, "out_features does not match the weight");
  at::Tensor x = input.reshape({-1, K}).contiguous();
  if (K != 2 * pairs) x = at::constant_pad_nd(x, {0, 1});
  const int64_t M = x.size(0), N = out_features;
  auto sizes = input.sizes().vec();
  sizes.back() = N;
  at::Tensor out = at::empty({M, N}, input.options());
  if (M == 0) return out.view(sizes);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " values for ", N, " outputs");
    b = bias->to(at::kFloat).contiguous();
  }
  const float* B = b.defined() ? b.data_ptr<float>() : nullptr;
  const auto* X = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* W = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  auto* O = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t ldx = 2 * pairs, block_stride = pairs * 2 * kBlock;
  const int NT = M > 4 ? 2 : 4, MT = M > 4 ? 8 : 4;
  const int64_t tiles = (blocks + NT - 1) / NT;
  at::parallel_for(0, tiles, 1, [&](int64_t first, int64_t last) {
    alignas(64) float sums[8 * 4 * kBlock];
    for (int64_t t0 = first; t0 < last; t0++) {
      const int64_t block0 = t0 * NT;
      const int nt = static_cast<int>(std::min<int64_t>(NT, blocks - block0));
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int mt = static_cast<int>(std::min<int64_t>(MT, M - m0));
        TileFn fn = nullptr;
        switch (nt) {
          case 4: fn = pick<4>(mt, std::make_integer_sequence<int, 4>{}); break;
          case 3: fn = pick<3>(mt, std::make_integer_sequence<int, 4>{}); break;
          case 2: fn = pick<2>(mt, std::make_integer_sequence<int, 8>{}); break;
          default: fn = pick<1>(mt, std::make_integer_sequence<int, 8>{}); break;
        }
        fn(X + m0 * ldx, ldx, W + block0 * block_stride, pairs, block_stride, sums);
        for (int m = 0; m < mt; m++) {
          for (int t = 0; t < nt; t++) {
            const int64_t n0 = (block0 + t) * kBlock;
            __m512 s = _mm512_loadu_ps(sums + (m * nt + t) * kBlock);
            const int64_t valid = std::min<int64_t>(kBlock, N - n0);
            const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
            if (B != nullptr) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(mask, B + n0));
            const __m256i r = (__m256i)_mm512_cvtneps_pbh(s);
            _mm256_mask_storeu_epi16(O + (m0 + m) * N + n0, mask, r);
          }
        }
      }
    }
  });
  return out.view(sizes);
}

}  // namespace

TORCH_LIBRARY(hfserve_bf16, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(hfserve_bf16, CPU, m) {
  m.impl("linear", &linear);
}
