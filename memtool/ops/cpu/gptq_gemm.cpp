// y = x @ W + bias for a GPTQ-packed W, straight from the packed words (decode-sized M).
//
// The specification is memtool/ops/reference.py (gptq_linear); the layout is described in
// memtool/formats/gptq_pack.py. Only "static" groups are handled here: g_idx[i] == i / group_size
// with group_size a multiple of 32; the Python side checks that and sends anything else to the
// reference.
//
// Shape of the work: 32 input features of one output column are `bits` consecutive int32 words
// down a column of qweight (one little-endian bit stream), and qweight rows are contiguous over
// the output dimension. So a tile of 8*V adjacent columns is V vectors per packed row: we unpack
// code k of each vector once, convert it to float, and FMA it into every row of x. Per panel (a
// group, or a slice of a long group) we accumulate sum_k x_k q_k only, and fold in the group's
// scale and zero point once at the panel's end:
//   y += scale * (sum_k x_k q_k - zero * sum_k x_k),
// which keeps the inner loop to shift, mask, convert and M FMAs per 8 weights.
//
// Written with GCC/Clang vector extensions instead of intrinsics: the same source becomes AVX2,
// AVX-512 or NEON code under -march=native, with no per-ISA branch to keep correct.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

constexpr int kLanes = 8;        // floats per vector
constexpr int kBlock = 32;       // input features per packed block (bits words per column)
constexpr int kStrip = 32;       // output columns per unit of parallel work
constexpr int kMaxRows = 8;      // rows of x per pass; larger M runs in passes of 8
constexpr int64_t kMinMacsPerThread = 1 << 20;  // see run()

typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));

inline vu load_words(const int32_t* p) {
  vu v;
  std::memcpy(&v, p, sizeof v);  // qweight rows carry no alignment promise
  return v;
}

inline vf load_floats(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_floats(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// Code I (0..31) of a block whose `BITS` words for 8 columns start at `words`, `stride` ints
// apart. Shifts are compile-time constants; a code that straddles two words (3 bits) is
// stitched from both.
template <int BITS, int I>
inline vf code(const int32_t* words, int64_t stride) {
  constexpr int bit = I * BITS, word = bit / 32, shift = bit % 32;
  constexpr uint32_t mask = (1u << BITS) - 1;
  vu v = load_words(words + word * stride) >> shift;
  if constexpr (shift + BITS > 32) {
    v |= load_words(words + (word + 1) * stride) << (32 - shift);
  }
  return __builtin_convertvector((vi)(v & mask), vf);
}

// Scalar twin of `code` for one value of a packed qzeros row.
template <int BITS>
inline uint32_t stream_value(const int32_t* row, int64_t index) {
  const int64_t bit = index * BITS, word = bit / 32;
  const int shift = static_cast<int>(bit % 32);
  uint32_t v = static_cast<uint32_t>(row[word]) >> shift;
  if (shift + BITS > 32) v |= static_cast<uint32_t>(row[word + 1]) << (32 - shift);
  return v & ((1u << BITS) - 1);
}

struct Problem {
  const float* x;         // [M, K]
  const int32_t* qweight; // [K * bits / 32, N]
  const int32_t* qzeros;  // [G, N * bits / 32]
  const void* scales;     // [G, N], float16 (as checkpoints store them) or float32
  bool half_scales;
  const float* xsum;      // [M, n_panels]: sum of x over each panel
  float* y;               // [M, N], holds the bias on entry
  int64_t K, N, group_size, panel_size, n_panels;
};

// One tile: M rows of x, 8*V columns from `col`, one panel of input features. U accumulator
// sets break the FMA dependency chain when M*V alone gives too few independent chains (M = 1).
template <int BITS, int M, int V, int U>
void tile(const Problem& p, int64_t row0, int64_t col, int64_t panel) {
  const int64_t k_begin = panel * p.panel_size;
  const int64_t k_end = std::min(p.K, k_begin + p.panel_size);
  const int64_t g = k_begin / p.group_size;
  vf acc[U][M][V] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlock) {
    const int32_t* words = p.qweight + (k0 / kBlock) * BITS * p.N + col;
    const float* x = p.x + row0 * p.K + k0;
    [&]<int... I>(std::integer_sequence<int, I...>) {
      (
          [&] {
#pragma GCC unroll 8
            for (int v = 0; v < V; ++v) {
              const vf q = code<BITS, I>(words + v * kLanes, p.N);
#pragma GCC unroll 8
              for (int m = 0; m < M; ++m) acc[I % U][m][v] += x[m * p.K + I] * q;
            }
          }(),
          ...);
    }(std::make_integer_sequence<int, kBlock>{});
  }
  // Panel end: fold in its group's scale and zero point (stored as zero - 1).
  const int32_t* zrow = p.qzeros + g * (p.N * BITS / 32);
  for (int v = 0; v < V; ++v) {
    const int64_t c = col + v * kLanes;
    vf zero, scale;
    for (int lane = 0; lane < kLanes; ++lane) {
      zero[lane] = static_cast<float>(stream_value<BITS>(zrow, c + lane) + 1);
      const int64_t at = g * p.N + c + lane;
      scale[lane] = p.half_scales ? static_cast<float>(static_cast<const at::Half*>(p.scales)[at])
                                  : static_cast<const float*>(p.scales)[at];
    }
    for (int m = 0; m < M; ++m) {
      vf sum = acc[0][m][v];
      for (int u = 1; u < U; ++u) sum += acc[u][m][v];
      float* y = p.y + (row0 + m) * p.N + c;
      const float xs = p.xsum[(row0 + m) * p.n_panels + panel];
      store_floats(y, load_floats(y) + scale * (sum - zero * xs));
    }
  }
}

// Rows [row0, row0 + M) over one 32-column strip and one panel, in tiles as wide as registers
// allow: M*V*U accumulators stay at or under 8 of the 16 AVX2 registers.
template <int BITS, int M>
void strip(const Problem& p, int64_t row0, int64_t col, int64_t panel) {
  constexpr int V = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  constexpr int U = M == 1 ? 2 : 1;
  for (int64_t c = col; c < col + kStrip; c += V * kLanes) tile<BITS, M, V, U>(p, row0, c, panel);
}

template <int BITS>
void strip_rows(const Problem& p, int64_t row0, int64_t rows, int64_t col, int64_t panel) {
  switch (rows) {
    case 1: return strip<BITS, 1>(p, row0, col, panel);
    case 2: return strip<BITS, 2>(p, row0, col, panel);
    case 3: return strip<BITS, 3>(p, row0, col, panel);
    case 4: return strip<BITS, 4>(p, row0, col, panel);
    case 5: return strip<BITS, 5>(p, row0, col, panel);
    case 6: return strip<BITS, 6>(p, row0, col, panel);
    case 7: return strip<BITS, 7>(p, row0, col, panel);
    default: return strip<BITS, 8>(p, row0, col, panel);
  }
}

template <int BITS>
void run(const Problem& p, int64_t M) {
  // Each thread owns a range of output columns. Panel by panel, it sweeps its columns strip
  // after strip, so each packed row is read as one forward stream the hardware prefetcher
  // follows; walking one strip down all of K instead (a jump of N*4 bytes per row) left the
  // kernel waiting on DRAM at about 1 GB/s once weights no longer fit in cache. A panel's
  // words for one strip (a few KB) stay in L1 while every pass of 8 rows goes over them.
  //
  // Each thread gets at least kMinMacsPerThread multiply-adds (~0.1 ms of work): joining
  // threads costs microseconds, and a thread the OS has preempted stalls the whole call until it
  // runs again (seen here: 2-thread decoding 5x slower than 1-thread on a busy 2-core machine).
  // So a small model's matvecs run on one thread, as torch's own small ops do (its grain size),
  // and a 7B model's (4096 x 4096 = 16M per token) on all of them.
  const int64_t macs_per_strip = M * p.K * kStrip;
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerThread / macs_per_strip);
  at::parallel_for(0, p.N / kStrip, grain, [&](int64_t begin, int64_t end) {
    for (int64_t panel = 0; panel < p.n_panels; ++panel) {
      for (int64_t s = begin; s < end; ++s) {
        for (int64_t row0 = 0; row0 < M; row0 += kMaxRows) {
          const int64_t rows = std::min<int64_t>(kMaxRows, M - row0);
          strip_rows<BITS>(p, row0, rows, s * kStrip, panel);
        }
      }
    }
  });
}

// Panel length: the group size, or for long groups (per-channel) the largest multiple of 32
// up to 256 that divides it, so a panel's rows stay few enough to stream side by side.
int64_t panel_size_for(int64_t group_size) {
  for (int64_t size = 256; size > kBlock; size -= kBlock) {
    if (group_size % size == 0) return size;
  }
  return kBlock;
}

at::Tensor gptq_gemm(
    const at::Tensor& x,
    const at::Tensor& qweight,
    const at::Tensor& qzeros,
    const at::Tensor& scales,
    const std::optional<at::Tensor>& bias,
    int64_t bits,
    int64_t group_size) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "gptq_gemm: x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qzeros.scalar_type() == at::kInt,
              "gptq_gemm: qweight and qzeros must be int32");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8,
              "gptq_gemm: bits must be 2, 3, 4 or 8");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(1);
  TORCH_CHECK(K % kBlock == 0 && N % kStrip == 0, "gptq_gemm: K and N must be multiples of 32");
  TORCH_CHECK(group_size > 0 && group_size % kBlock == 0,
              "gptq_gemm: group_size must be a positive multiple of 32");
  TORCH_CHECK(qweight.size(0) == K * bits / 32, "gptq_gemm: qweight rows do not match K");
  const int64_t n_groups = (K + group_size - 1) / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) >= n_groups && scales.size(1) == N,
              "gptq_gemm: scales must be [>= ceil(K / group_size), N]");
  TORCH_CHECK(qzeros.size(0) == scales.size(0) && qzeros.size(1) == N * bits / 32,
              "gptq_gemm: qzeros must be [n_groups, N * bits / 32]");

  const at::Tensor xc = x.contiguous();
  const at::Tensor qw = qweight.contiguous();
  const at::Tensor qz = qzeros.contiguous();
  // Other float dtypes are rare: convert those, read float16 and float32 as they are.
  const at::Tensor sc = scales.scalar_type() == at::kHalf ? scales.contiguous()
                                                          : scales.to(at::kFloat).contiguous();
  // Groups are cut into panels (see run): the zero-point term is linear, so
  // scale * (sum x q - zero * sum x) can be applied panel by panel.
  const int64_t panel_size = panel_size_for(group_size);
  const int64_t n_panels = (K + panel_size - 1) / panel_size;
  std::vector<float> xsum(M * n_panels, 0.0f);
  const float* xp = xc.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) xsum[m * n_panels + k / panel_size] += xp[m * K + k];
  }
  at::Tensor y;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "gptq_gemm: bias must have N elements");
    // A fresh buffer: `contiguous()` of the broadcast bias would alias the bias at M = 1.
    y = at::empty({M, N}, x.options());
    y.copy_(bias->reshape({1, N}).expand({M, N}));
  } else {
    y = at::zeros({M, N}, x.options());
  }
  if (M == 0) return y;

  const Problem p{xc.data_ptr<float>(), qw.data_ptr<int32_t>(), qz.data_ptr<int32_t>(),
                  sc.data_ptr(), sc.scalar_type() == at::kHalf, xsum.data(), y.data_ptr<float>(),
                  K, N, group_size, panel_size, n_panels};
  switch (bits) {
    case 2: run<2>(p, M); break;
    case 3: run<3>(p, M); break;
    case 4: run<4>(p, M); break;
    default: run<8>(p, M); break;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(memtool_cpu, m) {
  m.def(
      "gptq_gemm(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor? bias, "
      "int bits, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(memtool_cpu, CPU, m) { m.impl("gptq_gemm", &gptq_gemm); }
