// y = x @ W^T + bias for a BitStack weight W = sum_j S_j * (u_j v_j^T), straight from the packed
// signs and the low-rank factors, for decode-sized x (a few token rows).
//
// The specification is memtool/ops/reference.py (bitstack_linear); the sign layout is described in
// memtool/formats/bitstack_pack.py (bit t of byte p of a row is column 8p + t, set = -1).
//
// A lookup-table GEMV, as in T-MAC / LUT-GEMM. Row i of block j contributes
//   (S_j (u_j v_j^T) x)_i = sum_k u_jik sum_c S_jic v_jck x_c = sum_k u_jik (S_j z_k)_i,
// with z_k = v_jk * x (n floats). The signs of one byte p pick one of 256 sums of z_k over the
// byte's 8 columns, so for each byte position we tabulate
//   T[p][b][k] = sum over the set bits t of b of z_k[8p + t]   (the negative-sign columns)
// once per token row and block (256 adds per byte and k, built incrementally:
// T[2^t + r] = T[r] + z[8p + t] for r < 2^t), and then each output row costs one table lookup
// per byte instead of 8 sign flips and 8 multiply-adds per rank index:
//   (S_j z_k)_i = total_k - 2 sum_p T[p][signs[j, i, p]][k],   total_k = sum_c z_k[c].
// total_k comes for free as sum_p T[p][255][k].
//
// Table layout [p][b][k], k innermost and padded to a vector width KP (4 floats for rank <= 4,
// else a multiple of 8): the sign byte of (row i, byte p) is the same for every k, so one lookup
// reads all ranks' entries as one contiguous run (one cache line for KP <= 16) and adds them
// with one or a few vector adds; [k][p][b] would instead touch K lines 1 KB apart per lookup.
// Padding costs nothing in instructions (a vector add for 1 rank is one add, as is a scalar one),
// only table bytes, which is why the table is built and used a chunk of bytes at a time
// (kTableBytes = 64 KB, L2-resident: a whole 1536-input rank-7 table is 1.5 MB): for each chunk,
// build its tables, then sweep every output row over it, carrying each row's partial sums in a
// [rows][KP] buffer between chunks. 32, 128 and 256 KB chunks timed no better on the (noisy)
// development machine. Ranks above 32 run in passes of 32.
//
// Costs per token row and block: 256 * ceil(n / 8) vector adds to build (two table entries per
// 8-lane add at KP = 4), one lookup per output row and byte. So the build dominates for narrow
// layers (out < 256) and the lookups for wide ones; both grow linearly with the token rows,
// while the reference pays one reconstruction per call: hence a crossover in rows.
//
// Work is split over (token row, block, slice of output rows) items, each writing its own slice
// of a [token rows][blocks][out] buffer that is summed in a fixed order at the end, so the result
// does not depend on the thread count. Splitting over blocks needs no table rebuilt twice;
// output rows are sliced only when there are too few (row, block) pairs to occupy the threads and
// enough output rows that the per-slice table build (256 adds per byte, vs one lookup per byte
// and output row) stays a small share of the work.
//
// Written with GCC/Clang vector extensions (see gptq_gemm.cpp): AVX2, AVX-512 or NEON code under
// -march=native from one source.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kTableBytes = 64 * 1024;      // one chunk's tables: 16 bytes of x at KP = 4
constexpr int64_t kMaxGroup = 32;                // rank indices per pass
constexpr int64_t kMinAddsPerThread = 1 << 20;   // see run(): ~0.1-0.2 ms of work
constexpr int64_t kMinRowsPerSlice = 1024;       // output rows per slice when slicing
constexpr int64_t kMaxPartialFloats = 1 << 22;   // 16 MB of per-block partial outputs

typedef float vf4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));

template <int W> struct Vec;
template <> struct Vec<4> { using type = vf4; };
template <> struct Vec<8> { using type = vf8; };

template <int W>
inline typename Vec<W>::type load(const float* p) {
  typename Vec<W>::type v;
  std::memcpy(&v, p, sizeof v);  // std::vector gives no 32-byte alignment promise
  return v;
}

template <int W>
inline void store(float* p, typename Vec<W>::type v) { std::memcpy(p, &v, sizeof v); }

struct Problem {
  const float* x;        // [M, n]
  const uint8_t* signs;  // [J, m, P]
  const void* u;         // [J, m, K], float16 or float32
  const void* v;         // [J, n, K], float16 or float32
  bool half_u, half_v;
  float* partial;        // [rows of this batch, J, m]
  int64_t n, m, P, K, J;
};

inline float factor(const void* data, bool half, int64_t at) {
  return half ? static_cast<float>(static_cast<const c10::Half*>(data)[at])
              : static_cast<const float*>(data)[at];
}

struct Scratch {
  std::vector<float> z, table, acc;
};

// Ranks [k0, k0 + kg) of block j for token row r (x row `row`), output rows [i0, i1):
// partial[i] += sum_k u_ik (total_k - 2 s_ik). W lanes per vector, NV vectors: KP = W * NV >= kg.
template <int W, int NV>
void group(const Problem& p, int64_t row, int64_t j, int64_t k0, int64_t kg, int64_t i0,
           int64_t i1, float* out, Scratch& s) {
  using V = typename Vec<W>::type;
  constexpr int64_t KP = W * NV;
  const int64_t n = p.n, P = p.P, K = p.K, rows = i1 - i0;
  const float* x = p.x + row * n;

  // z[c][k] = v[j, c, k0 + k] * x[c]; columns up to 8P and ranks up to KP padded with zeros.
  s.z.assign(8 * P * KP, 0.0f);
  const int64_t v_base = j * n * K + k0;
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t k = 0; k < kg; ++k) {
      s.z[c * KP + k] = factor(p.v, p.half_v, v_base + c * K + k) * x[c];
    }
  }
  s.acc.assign(rows * KP, 0.0f);
  const int64_t chunk = std::max<int64_t>(1, kTableBytes / (256 * KP * 4));
  s.table.resize(std::min(chunk, std::max<int64_t>(P, 1)) * 256 * KP);
  V total[NV] = {};
  const uint8_t* signs = p.signs + (j * p.m + i0) * P;

  for (int64_t p0 = 0; p0 < P; p0 += chunk) {
    const int64_t pc = std::min(chunk, P - p0);
    // Build: T[q][0] = 0, T[q][2^t + r] = T[q][r] + z[8(p0 + q) + t] for r < 2^t.
    for (int64_t q = 0; q < pc; ++q) {
      float* t = s.table.data() + q * 256 * KP;
      std::memset(t, 0, KP * sizeof(float));
      const float* zq = s.z.data() + 8 * (p0 + q) * KP;
      if constexpr (KP == 4) {
        // Two 4-float entries per 8-lane add (rank <= 4 would otherwise build at half width).
        store<4>(t + 4, load<4>(t) + load<4>(zq));
        for (int bit = 1; bit < 8; ++bit) {
          float pair[8];
          std::memcpy(pair, zq + bit * 4, 4 * sizeof(float));
          std::memcpy(pair + 4, zq + bit * 4, 4 * sizeof(float));
          const vf8 zz = load<8>(pair);
          const int64_t half = int64_t{1} << bit;
          for (int64_t r = 0; r < half; r += 2) {
            store<8>(t + (half + r) * 4, load<8>(t + r * 4) + zz);
          }
        }
      } else {
        for (int bit = 0; bit < 8; ++bit) {
          V zv[NV];
          for (int v = 0; v < NV; ++v) zv[v] = load<W>(zq + bit * KP + v * W);
          const int64_t half = int64_t{1} << bit;
          for (int64_t r = 0; r < half; ++r) {
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
              store<W>(t + (half + r) * KP + v * W, load<W>(t + r * KP + v * W) + zv[v]);
            }
          }
        }
      }
      for (int v = 0; v < NV; ++v) total[v] += load<W>(t + 255 * KP + v * W);
    }
    // Lookup: every output row sweeps this chunk; two accumulator sets break the add chain.
    const float* table = s.table.data();
    for (int64_t i = 0; i < rows; ++i) {
      const uint8_t* sg = signs + i * P + p0;
      float* acc = s.acc.data() + i * KP;
      V a0[NV], a1[NV] = {};
      for (int v = 0; v < NV; ++v) a0[v] = load<W>(acc + v * W);
      int64_t q = 0;
      for (; q + 1 < pc; q += 2) {
        const float* e0 = table + (q * 256 + sg[q]) * KP;
        const float* e1 = table + ((q + 1) * 256 + sg[q + 1]) * KP;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          a0[v] += load<W>(e0 + v * W);
          a1[v] += load<W>(e1 + v * W);
        }
      }
      if (q < pc) {
        const float* e0 = table + (q * 256 + sg[q]) * KP;
        for (int v = 0; v < NV; ++v) a0[v] += load<W>(e0 + v * W);
      }
      for (int v = 0; v < NV; ++v) store<W>(acc + v * W, a0[v] + a1[v]);
    }
  }

  float tot[KP];
  for (int v = 0; v < NV; ++v) store<W>(tot + v * W, total[v]);
  const int64_t u_base = (j * p.m + i0) * K + k0;
  for (int64_t i = 0; i < rows; ++i) {
    const float* acc = s.acc.data() + i * KP;
    float sum = 0.0f;
    for (int64_t k = 0; k < kg; ++k) {
      sum += factor(p.u, p.half_u, u_base + i * K + k) * (tot[k] - 2.0f * acc[k]);
    }
    out[i] += sum;
  }
}

void item(const Problem& p, int64_t row, int64_t j, int64_t i0, int64_t i1, Scratch& s) {
  float* out = p.partial + (row * p.J + j) * p.m + i0;
  std::fill(out, out + (i1 - i0), 0.0f);
  for (int64_t k0 = 0; k0 < p.K; k0 += kMaxGroup) {
    const int64_t kg = std::min(kMaxGroup, p.K - k0);
    if (kg <= 4) {
      group<4, 1>(p, row, j, k0, kg, i0, i1, out, s);
    } else if (kg <= 8) {
      group<8, 1>(p, row, j, k0, kg, i0, i1, out, s);
    } else if (kg <= 16) {
      group<8, 2>(p, row, j, k0, kg, i0, i1, out, s);
    } else if (kg <= 24) {
      group<8, 3>(p, row, j, k0, kg, i0, i1, out, s);
    } else {
      group<8, 4>(p, row, j, k0, kg, i0, i1, out, s);
    }
  }
}

// Token rows [0, rows) of p.x into p.partial.
void run(const Problem& p, int64_t rows) {
  const int64_t pairs = rows * p.J;
  const int64_t threads = at::get_num_threads();
  int64_t slices = 1;
  if (pairs < threads) {
    slices = std::min((threads + pairs - 1) / pairs, std::max<int64_t>(1, p.m / kMinRowsPerSlice));
  }
  const int64_t slice_rows = (p.m + slices - 1) / slices;
  // As in gptq_gemm.cpp: each thread gets at least kMinAddsPerThread of work (build plus
  // lookups, in float adds), since joining threads costs microseconds and a preempted thread
  // stalls the call; a small layer's call runs on one thread.
  const int64_t kp = p.K <= 4 ? 4 : (std::min(p.K, kMaxGroup) + 7) / 8 * 8;
  const int64_t passes = (p.K + kMaxGroup - 1) / kMaxGroup;
  const int64_t adds = passes * p.P * kp * (256 + slice_rows);
  const int64_t grain = std::max<int64_t>(1, kMinAddsPerThread / std::max<int64_t>(adds, 1));
  at::parallel_for(0, pairs * slices, grain, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t slice = it % slices, pair = it / slices;
      const int64_t i0 = slice * slice_rows, i1 = std::min(p.m, i0 + slice_rows);
      if (i0 < i1) item(p, pair / p.J, pair % p.J, i0, i1, s);
    }
  });
}

at::Tensor bitstack_gemv(
    const at::Tensor& x,
    const at::Tensor& signs,
    const at::Tensor& u,
    const at::Tensor& v,
    const std::optional<at::Tensor>& bias,
    int64_t in_features) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "bitstack_gemv: x must be a 2-D float32 CPU tensor");
  TORCH_CHECK(in_features >= 0 && x.size(1) == in_features,
              "bitstack_gemv: x must have in_features columns");
  TORCH_CHECK(signs.device().is_cpu() && signs.scalar_type() == at::kByte && signs.dim() == 3,
              "bitstack_gemv: signs must be a uint8 CPU tensor [blocks, out, bytes]");
  const int64_t n = in_features, J = signs.size(0), m = signs.size(1), P = (n + 7) / 8;
  TORCH_CHECK(signs.size(2) == P, "bitstack_gemv: signs must have ceil(in_features / 8) bytes");
  TORCH_CHECK(u.device().is_cpu() && v.device().is_cpu() && u.dim() == 3 && v.dim() == 3,
              "bitstack_gemv: u and v must be 3-D CPU tensors");
  const int64_t K = u.size(2);
  TORCH_CHECK(u.size(0) == J && u.size(1) == m, "bitstack_gemv: u must be [blocks, out, rank]");
  TORCH_CHECK(v.size(0) == J && v.size(1) == n && v.size(2) == K,
              "bitstack_gemv: v must be [blocks, in_features, rank]");
  TORCH_CHECK(u.is_floating_point() && v.is_floating_point(),
              "bitstack_gemv: u and v must be float tensors");

  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, m}, x.options());
  float* yp = y.data_ptr<float>();
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->numel() == m,
                "bitstack_gemv: bias must be a CPU tensor of out elements");
    b = bias->to(at::kFloat).contiguous();
    bp = b.data_ptr<float>();
  }
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t i = 0; i < m; ++i) yp[r * m + i] = bp ? bp[i] : 0.0f;
  }
  if (M == 0 || m == 0 || J == 0 || K == 0) return y;

  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = signs.contiguous();
  // float16 (as checkpoints store them) and float32 are read as they are; others converted.
  auto as_read = [](const at::Tensor& t) {
    return t.scalar_type() == at::kHalf ? t.contiguous() : t.to(at::kFloat).contiguous();
  };
  const at::Tensor uc = as_read(u), vc = as_read(v);

  // Token rows in batches, so the per-block partial outputs stay bounded.
  const int64_t batch = std::max<int64_t>(1, kMaxPartialFloats / (J * m));
  std::vector<float> partial(std::min(batch, M) * J * m);
  for (int64_t r0 = 0; r0 < M; r0 += batch) {
    const int64_t rows = std::min(batch, M - r0);
    const Problem p{xc.data_ptr<float>() + r0 * n, sc.data_ptr<uint8_t>(), uc.data_ptr(),
                    vc.data_ptr(), uc.scalar_type() == at::kHalf, vc.scalar_type() == at::kHalf,
                    partial.data(), n, m, P, K, J};
    run(p, rows);
    // Blocks summed in order: the same result on any number of threads.
    for (int64_t r = 0; r < rows; ++r) {
      float* out = yp + (r0 + r) * m;
      for (int64_t j = 0; j < J; ++j) {
        const float* part = partial.data() + (r * J + j) * m;
        for (int64_t i = 0; i < m; ++i) out[i] += part[i];
      }
    }
  }
  return y;
}

}  // namespace

// gptq_gemm.cpp holds the namespace's TORCH_LIBRARY block; this file adds to it.
TORCH_LIBRARY_FRAGMENT(memtool_cpu, m) {
  m.def(
      "bitstack_gemv(Tensor x, Tensor signs, Tensor u, Tensor v, Tensor? bias, "
      "int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(memtool_cpu, CPU, m) { m.impl("bitstack_gemv", &bitstack_gemv); }
