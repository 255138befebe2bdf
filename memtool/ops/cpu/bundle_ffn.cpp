// One token's FFN over a run of flash-store neuron bundles (memtool.serve.flash.ffn): the
// specification is FlashFFN._compute's torch code, which this replaces for one token on CPU.
//
// Bundling stores everything neuron i needs side by side (ReLU: fc1 row i, its bias, fc2 column
// i; SwiGLU: gate row i, up row i, down column i), so the FFN is one streaming pass: for each
// kept bundle, a = act(x . first_i [+ b]) (SwiGLU: silu(x . gate_i) * (x . up_i)), then
// out += a * down_i. The torch path needed a strided fp16 matmul and a strided fp16 mv per
// staging load, plus a dozen small ops, over every bundle of the load, gap bundles included
// (masked afterwards): ~1 ms per load, ~40% of a token on the OPT-1.3B shape. Here only the
// kept bundles are touched, each row converted to float32 once into an L1-resident buffer.
//
// Bundles are split over an OpenMP team with a static schedule; each thread sums into its own
// [hidden] buffer and the buffers are added in thread order, so for a given thread count the
// result does not depend on timing. Sums are float32 (the torch path rounds h to the model's
// dtype first): results agree to rounding, not bit for bit.

#include <omp.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;  // independent partial sums, so the dot product vectorises

void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

void to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t word = static_cast<uint32_t>(bits[i]) << 16;
    std::memcpy(dst + i, &word, sizeof(float));
  }
}

float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float lanes[kLanes] = {0.0f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

template <typename T>
void run(const float* x, const T* base, int64_t stride, const bool* keep, int64_t n, int64_t hidden,
         int64_t kind, int64_t first, int64_t second, int64_t down, int64_t first_bias,
         int64_t second_bias, double threshold, float* out) {
  const int threads = omp_get_max_threads();
  std::vector<float> partial(static_cast<size_t>(threads) * hidden, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* __restrict__ acc = partial.data() + static_cast<int64_t>(omp_get_thread_num()) * hidden;
    std::vector<float> row(hidden);
    float one = 0.0f;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      if (!keep[i]) continue;
      const T* bundle = base + i * stride;
      to_float(bundle + first, row.data(), hidden);
      float h = dot(x, row.data(), hidden);
      if (first_bias >= 0) {
        to_float(bundle + first_bias, &one, 1);
        h += one;
      }
      float a;
      if (kind == 0) {  // ReLU
        a = h > 0.0f ? h : 0.0f;
      } else {  // SwiGLU: silu(gate) * up, with CATS's threshold on |silu(gate)| when given
        const float act = h / (1.0f + std::exp(-h));
        if (threshold >= 0.0 && !(std::fabs(act) > threshold)) continue;
        to_float(bundle + second, row.data(), hidden);
        float up = dot(x, row.data(), hidden);
        if (second_bias >= 0) {
          to_float(bundle + second_bias, &one, 1);
          up += one;
        }
        a = act * up;
      }
      if (a == 0.0f) continue;
      to_float(bundle + down, row.data(), hidden);
      const float* __restrict__ r = row.data();
      for (int64_t d = 0; d < hidden; ++d) acc[d] += a * r[d];
    }
  }
  for (int t = 0; t < threads; ++t) {
    const float* p = partial.data() + static_cast<int64_t>(t) * hidden;
    for (int64_t d = 0; d < hidden; ++d) out[d] += p[d];
  }
}

}  // namespace

torch::Tensor bundle_ffn(torch::Tensor x, torch::Tensor bundles, torch::Tensor keep, int64_t kind,
                         int64_t first, int64_t second, int64_t down, int64_t first_bias,
                         int64_t second_bias, double threshold) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 1,
              "x must be one contiguous float32 token");
  TORCH_CHECK(bundles.dim() == 2 && bundles.stride(1) == 1, "bundles must be [n, stride] rows");
  TORCH_CHECK(keep.scalar_type() == torch::kBool && keep.is_contiguous() &&
                  keep.numel() == bundles.size(0),
              "keep must be one contiguous bool per bundle");
  TORCH_CHECK(kind == 0 || kind == 1, "kind must be 0 (ReLU) or 1 (SwiGLU)");
  const int64_t hidden = x.size(0), n = bundles.size(0), stride = bundles.stride(0);
  const int64_t width = bundles.size(1);
  for (const int64_t part : {first, down}) {
    TORCH_CHECK(part >= 0 && part + hidden <= width, "a part lies outside the bundle");
  }
  TORCH_CHECK(kind == 0 || (second >= 0 && second + hidden <= width), "up lies outside the bundle");
  for (const int64_t bias : {first_bias, second_bias}) {
    TORCH_CHECK(bias < width, "a bias lies outside the bundle");
  }
  auto out = torch::zeros({hidden}, torch::kFloat);
  const float* xp = x.data_ptr<float>();
  const bool* kp = keep.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const auto type = bundles.scalar_type();
  if (type == torch::kFloat) {
    run(xp, bundles.data_ptr<float>(), stride, kp, n, hidden, kind, first, second, down, first_bias,
        second_bias, threshold, op);
  } else if (type == torch::kHalf) {
    run(xp, bundles.data_ptr<c10::Half>(), stride, kp, n, hidden, kind, first, second, down,
        first_bias, second_bias, threshold, op);
  } else if (type == torch::kBFloat16) {
    run(xp, bundles.data_ptr<c10::BFloat16>(), stride, kp, n, hidden, kind, first, second, down,
        first_bias, second_bias, threshold, op);
  } else {
    TORCH_CHECK(false, "bundles must be float32, float16 or bfloat16");
  }
  return out;
}

// gptq_gemm.cpp holds the namespace's TORCH_LIBRARY block; this file adds to it.
TORCH_LIBRARY_FRAGMENT(memtool_cpu, m) {
  m.def(
      "bundle_ffn(Tensor x, Tensor bundles, Tensor keep, int kind, int first, int second, "
      "int down, int first_bias, int second_bias, float threshold) -> Tensor");
}

TORCH_LIBRARY_IMPL(memtool_cpu, CPU, m) { m.impl("bundle_ffn", &bundle_ffn); }
