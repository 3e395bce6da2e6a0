// A bfloat16 linear layer and a decode step's attention for CPUs with AVX-512 BF16 (see bf16_kernel.py).
//
// The weight is blocked once, at load, as [N / 16][K / 2][16][2]: for each block of 16 outputs, one
// 64-byte vector per pair of inputs, the layout _mm512_dpbf16_ps multiplies by a broadcast pair of
// input values. The product streams each block's vectors once from memory, front to back, and keeps
// every row's sums in registers (float32): a tile is up to 4 rows by 4 blocks (64 outputs), or 8
// rows by 2 blocks for 5 rows and more. The tiles of outputs are spread over ATen's intra-op threads
// (at::parallel_for: the same OpenMP team as every other operator of the step).
//
// The attention of a decode step (one query token per row) takes each row and query head in turn:
// its scores against the row's cached keys (vdpbf16ps, float32 sums), scaled and masked, a float32
// softmax, and the values weighted by it in float32, read in place from the cache's strided views.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;  // outputs per block: one vector of float32 sums

// the first ``n`` of 16 lanes (all 16 for n >= 16)
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << std::min<int64_t>(16, n)) - 1u); }

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

// AMX (Intel's tile unit, Sapphire Rapids and later): the blocked weight is already what a B tile
// holds, 16 pairs of inputs by 16 outputs (64 bytes a row, contiguous), so from kAmxMinRows rows
// tdpbf16ps sums a tile of up to 16 rows by 4 blocks, or, above 16 rows, 32 rows by 2 blocks (each
// weight tile read once for both tiles of rows), instead of vdpbf16ps, whose issue rate limits the
// product above a few rows (on a 2-core Xeon, 768 x 2048 at 8 rows: 0.6x oneDNN's AMX product by
// vdpbf16ps, 1.2x by the tiles). The kernel asks Linux for the tile state once (arch_prctl); where
// the CPU or Linux says no, or the inputs are not a multiple of 32, vdpbf16ps as before.
constexpr int64_t kAmxMinRows = 2;

bool amx_ready() {
  static const bool ready = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
    if (!tile || !bf16) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// the tile configuration of a product of ``top`` rows (C tiles 0-1, A tile 4) and ``bottom`` rows
// (C tiles 2-3, A tile 5; for 16 rows or fewer, the same rows again), B tiles 6-7 16 pairs of inputs
__attribute__((noinline)) void amx_configure(int top, int bottom) {
  TileConfig cfg;
  for (int t = 0; t < 8; t++) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = static_cast<uint8_t>(t == 0 || t == 1 || t == 4 ? top : t < 6 ? bottom : 16);
  }
  // the configuration's stores must reach memory before ldtilecfg reads it (GCC does not see the
  // read: without this it dropped them, and a palette of 0 leaves the tiles unconfigured: SIGILL)
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// C tiles 0-3 (float32 sums of 16 outputs a row) to zero, and out to sums [4][rows][16]
inline void amx_zero_sums() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

inline void amx_store_sums(float* sums) {
  _tile_stored(0, sums, 64);
  _tile_stored(1, sums + 16 * kBlock, 64);
  _tile_stored(2, sums + 2 * 16 * kBlock, 64);
  _tile_stored(3, sums + 3 * 16 * kBlock, 64);
}

// sums [4][mt][16]: rows x[0:mt] (A tile 4) against blocks w[0:nt] (nt <= 4; C tiles 0-3), k32
// steps of 32 inputs
inline void amx_rows_by_4(const uint16_t* x, int64_t ldx, const uint16_t* w, int nt, int64_t k32, int64_t block_stride, float* sums) {
  amx_zero_sums();
  for (int64_t k = 0; k < k32; k++) {
    const uint16_t* wk = w + k * 16 * 2 * kBlock;
    _tile_loadd(4, x + k * 32, ldx * 2);
    _tile_loadd(6, wk, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (nt > 1) {
      _tile_loadd(7, wk + block_stride, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (nt > 2) {
      _tile_loadd(6, wk + 2 * block_stride, 64);
      _tile_dpbf16ps(2, 4, 6);
    }
    if (nt > 3) {
      _tile_loadd(7, wk + 3 * block_stride, 64);
      _tile_dpbf16ps(3, 4, 7);
    }
  }
  amx_store_sums(sums);
}

// sums [4][16][16]: rows x[0:16] and x[16:32] (A tiles 4, 5; the second may have fewer rows) against
// blocks w[0:nt] (nt <= 2; C tiles 0-1 and 2-3): each B tile loaded once for two tiles of rows
inline void amx_32_rows_by_2(const uint16_t* x, int64_t ldx, const uint16_t* w, int nt, int64_t k32, int64_t block_stride, float* sums) {
  amx_zero_sums();
  for (int64_t k = 0; k < k32; k++) {
    const uint16_t* wk = w + k * 16 * 2 * kBlock;
    _tile_loadd(4, x + k * 32, ldx * 2);
    _tile_loadd(5, x + 16 * ldx + k * 32, ldx * 2);
    _tile_loadd(6, wk, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if (nt > 1) {
      _tile_loadd(7, wk + block_stride, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  amx_store_sums(sums);
}

// output row m, block n0.., from float32 sums: bias added, rounded to bfloat16, the tail masked
inline void store_row(const __m512 sums, const float* B, uint16_t* out, int64_t n0, int64_t N) {
  const __mmask16 mask = first_lanes(N - n0);
  __m512 s = sums;
  if (B != nullptr) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(mask, B + n0));
  _mm256_mask_storeu_epi16(out + n0, mask, (__m256i)_mm512_cvtneps_pbh(s));
}

void amx_linear(const uint16_t* X, int64_t M, int64_t ldx, const uint16_t* W, int64_t blocks, int64_t block_stride,
                const float* B, uint16_t* O, int64_t N) {
  // more than 16 rows: 32 at a time by 2 blocks (each weight tile read once for both), the last
  // 16 or fewer by 4 blocks; whole 32s of rows block by block (a block's weights, K x 16, stay in
  // the core's caches for every row)
  const int64_t k32 = ldx / 32, whole = M / 32 * 32;
  at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t first, int64_t last) {
    alignas(64) float sums[4 * 16 * kBlock];
    const int64_t first_block = first * 2, last_block = std::min<int64_t>(blocks, last * 2);
    int top = 0, bottom = 0;  // the configuration loaded (none yet)
    const auto configure = [&](int t, int b) {
      if (t != top || b != bottom) amx_configure(t, b);
      top = t, bottom = b;
    };
    // C tile ``tile`` of sums (its first ``rows`` rows) out as rows row0.. of block ``block``
    const auto store_tile = [&](int tile, int rows, int64_t row0, int64_t block) {
      for (int m = 0; m < rows; m++)
        store_row(_mm512_load_ps(sums + (tile * 16 + m) * kBlock), B, O + (row0 + m) * N, block * kBlock, N);
    };
    // rows m0 to m0 + 16 + second against blocks block0 to block0 + nt (nt <= 2)
    const auto pair = [&](int64_t m0, int second, int64_t block0, int nt) {
      amx_32_rows_by_2(X + m0 * ldx, ldx, W + block0 * block_stride, nt, k32, block_stride, sums);
      for (int half = 0; half < 2; half++)
        for (int t = 0; t < nt; t++) store_tile(half * 2 + t, half == 0 ? 16 : second, m0 + half * 16, block0 + t);
    };
    if (whole > 0) {
      configure(16, 16);
      for (int64_t block0 = first_block; block0 < last_block; block0 += 2)
        for (int64_t m0 = 0; m0 < whole; m0 += 32) pair(m0, 16, block0, static_cast<int>(std::min<int64_t>(2, last_block - block0)));
    }
    int64_t m0 = whole;
    if (M - m0 > 16) {  // 17 to 31 rows left
      const int second = static_cast<int>(M - m0 - 16);
      configure(16, second);
      for (int64_t block0 = first_block; block0 < last_block; block0 += 2)
        pair(m0, second, block0, static_cast<int>(std::min<int64_t>(2, last_block - block0)));
      m0 = M;
    }
    if (m0 < M) {  // 16 rows or fewer left
      const int mt = static_cast<int>(M - m0);
      configure(mt, mt);
      for (int64_t block0 = first_block; block0 < last_block; block0 += 4) {
        const int nt = static_cast<int>(std::min<int64_t>(4, last_block - block0));
        amx_rows_by_4(X + m0 * ldx, ldx, W + block0 * block_stride, nt, k32, block_stride, sums);
        for (int t = 0; t < nt; t++) store_tile(t, mt, m0, block0 + t);
      }
    }
    if (top != 0) _tile_release();
  });
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
  if (M >= kAmxMinRows && ldx % 32 == 0 && amx_ready()) {
    amx_linear(X, M, ldx, W, blocks, block_stride, B, O, N);
    return out.view(sizes);
  }
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
            store_row(_mm512_loadu_ps(sums + (m * nt + t) * kBlock), B, O + (m0 + m) * N, (block0 + t) * kBlock, N);
          }
        }
      }
    }
  });
  return out.view(sizes);
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 mask) {
  // 16 bfloat16 values (those in ``mask``) as float32: the upper halves of 32-bit lanes
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

inline float dot_bf16(const uint16_t* a, const uint16_t* b, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= dim; d += 32) {
    const __m512bh av = (__m512bh)_mm512_loadu_si512((const void*)(a + d));
    const __m512bh bv = (__m512bh)_mm512_loadu_si512((const void*)(b + d));
    acc = _mm512_dpbf16_ps(acc, av, bv);
  }
  for (; d < dim; d += 16) {
    const __mmask16 mask = first_lanes(dim - d);
    acc = _mm512_fmadd_ps(load_bf16(a + d, mask), load_bf16(b + d, mask), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// exp(x), float32, 16 lanes (Cephes' expf: 2^n * a degree-7 polynomial of the rest); below -87 it is 0
inline __m512 exp16(__m512 x) {
  const __m512 low = _mm512_set1_ps(-87.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, low, _CMP_GE_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), low);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

// scores[j] = exp(scores[j] - top) for j < length; returns their sum
inline float exp_minus(float* scores, int64_t length, float top) {
  const __m512 t = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < length; j += 16) {
    const __mmask16 lanes = first_lanes(length - j);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, scores + j), t));
    _mm512_mask_storeu_ps(scores + j, lanes, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(lanes, e));
  }
  return _mm512_reduce_add_ps(sum);
}

// query [rows, heads, 1, dim]; key and value [rows, kv_heads, length, dim] (any strides but the last);
// mask: none, or bool [rows or 1, length] (true: attend). Returns [rows, 1, heads, dim].
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 && value.scalar_type() == at::kBFloat16,
              "hfserve_bf16::decode_attention takes bfloat16");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4 && query.size(2) == 1, "one query token per row");
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(3);
  const int64_t kv_heads = key.size(1), length = key.size(2);
  TORCH_CHECK(key.size(0) == rows && value.size(0) == rows && value.size(1) == kv_heads && value.size(2) == length,
              "keys and values do not match the query's rows");
  TORCH_CHECK(key.size(3) == dim && value.size(3) == dim && kv_heads > 0 && heads % kv_heads == 0, "head sizes do not match");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1, "the head dimension must be contiguous");
  const uint8_t* M = nullptr;
  int64_t mask_rows = 0;
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(1) == length &&
                    (mask->size(0) == rows || mask->size(0) == 1),
                "the mask must be bool [rows or 1, positions]");
    m = mask->contiguous();
    M = reinterpret_cast<const uint8_t*>(m.data_ptr());
    mask_rows = m.size(0);
  }
  at::Tensor out = at::empty({rows, 1, heads, dim}, query.options());
  if (rows == 0 || heads == 0) return out;
  const int64_t group = heads / kv_heads;
  const auto* Q = reinterpret_cast<const uint16_t*>(query.data_ptr());
  const auto* K = reinterpret_cast<const uint16_t*>(key.data_ptr());
  const auto* V = reinterpret_cast<const uint16_t*>(value.data_ptr());
  auto* O = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const int64_t ks0 = key.stride(0), ks1 = key.stride(1), ks2 = key.stride(2);
  const int64_t vs0 = value.stride(0), vs1 = value.stride(1), vs2 = value.stride(2);
  const float lowest = std::numeric_limits<float>::lowest();  // what transformers' masks fill with
  const float s = static_cast<float>(scale);
  const int64_t chunks = (dim + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, length * dim));
  at::parallel_for(0, rows * heads, grain, [&](int64_t first, int64_t last) {
    std::vector<float> scores(static_cast<size_t>(std::max<int64_t>(length, 1)));
    std::vector<__m512> acc(static_cast<size_t>(chunks));
    for (int64_t task = first; task < last; task++) {
      const int64_t r = task / heads, h = task % heads, kh = h / group;
      const uint16_t* q = Q + r * qs0 + h * qs1;
      const uint16_t* k = K + r * ks0 + kh * ks1;
      const uint16_t* v = V + r * vs0 + kh * vs1;
      const uint8_t* allowed = M == nullptr ? nullptr : M + (mask_rows == 1 ? 0 : r) * length;
      float top = lowest;
      for (int64_t j = 0; j < length; j++) {
        const float x = (allowed == nullptr || allowed[j]) ? dot_bf16(q, k + j * ks2, dim) * s : lowest;
        scores[j] = x;
        top = std::max(top, x);
      }
      const float total = exp_minus(scores.data(), length, top);
      for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
      for (int64_t j = 0; j < length; j++) {
        if (scores[j] == 0.f) continue;  // a masked position (or one whose weight underflowed)
        const __m512 p = _mm512_set1_ps(scores[j]);
        const uint16_t* vj = v + j * vs2;
        for (int64_t c = 0; c < chunks; c++) {
          const __mmask16 lanes = first_lanes(dim - 16 * c);
          acc[c] = _mm512_fmadd_ps(p, load_bf16(vj + 16 * c, lanes), acc[c]);
        }
      }
      const __m512 inv = _mm512_set1_ps(total > 0.f ? 1.f / total : 0.f);
      uint16_t* o = O + (r * heads + h) * dim;
      for (int64_t c = 0; c < chunks; c++) {
        const __mmask16 lanes = first_lanes(dim - 16 * c);
        _mm256_mask_storeu_epi16(o + 16 * c, lanes, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[c], inv)));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(hfserve_bf16, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias, int out_features) -> Tensor");
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
  m.def("amx() -> bool");
}

TORCH_LIBRARY_IMPL(hfserve_bf16, CPU, m) {
  m.impl("linear", &linear);
  m.impl("decode_attention", &decode_attention);
}

TORCH_LIBRARY_IMPL(hfserve_bf16, CatchAll, m) { m.impl("amx", &amx_ready); }
