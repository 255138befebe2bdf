// One block of BitStack's sign feedback (memtool.compress.bitstack.feedback_signs), whose
// Python loop is the specification: for each input column j of the block in turn, take the
// sign of the residual as updated so far, and spread the error it leaves over the block's
// later columns through the inverse Hessian's upper Cholesky factor (GPTQ's inner loop with
// signs in place of rounding). In Python that loop is ~4 tensor calls per column on vectors
// of a few hundred floats, dominated by call overhead: 16 blocks x every column x every linear
// tripled BitStack's decomposition time.
//
// Every output row is independent of the others, so the OpenMP team splits the rows and each
// thread runs the whole column loop on its own slice: no synchronisation.

#include <torch/extension.h>

void sign_feedback_block(torch::Tensor rest, torch::Tensor magnitude, torch::Tensor hinv,
                         torch::Tensor negative, torch::Tensor err) {
  for (const auto& t : {rest, magnitude, hinv, err}) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.dim() == 2,
                "rest, magnitude, hinv and err must be contiguous 2-d float32");
  }
  TORCH_CHECK(negative.scalar_type() == torch::kBool && negative.is_contiguous(),
              "negative must be contiguous bool");
  const int64_t columns = rest.size(0), rows = rest.size(1);
  TORCH_CHECK(magnitude.sizes() == rest.sizes() && err.sizes() == rest.sizes() &&
                  negative.sizes() == rest.sizes(),
              "rest, magnitude, negative and err must have one shape [columns, rows]");
  TORCH_CHECK(hinv.size(0) == columns && hinv.size(1) == columns, "hinv must be [columns, columns]");
  float* r = rest.data_ptr<float>();
  const float* m = magnitude.data_ptr<float>();
  const float* h = hinv.data_ptr<float>();
  bool* neg = negative.data_ptr<bool>();
  float* e = err.data_ptr<float>();
  constexpr int64_t kChunk = 64;  // output rows per task: a cache line's worth of each column
#pragma omp parallel for schedule(static)
  for (int64_t lo = 0; lo < rows; lo += kChunk) {
    const int64_t hi = std::min(lo + kChunk, rows);
    for (int64_t j = 0; j < columns; ++j) {
      const float diagonal = h[j * columns + j];
      const float* __restrict__ rj = r + j * rows;
      float* __restrict__ ej = e + j * rows;
      for (int64_t o = lo; o < hi; ++o) {
        const bool below = rj[o] < 0.0f;
        neg[j * rows + o] = below;
        const float mo = m[j * rows + o];
        ej[o] = (rj[o] - (below ? -mo : mo)) / diagonal;
      }
      for (int64_t k = j + 1; k < columns; ++k) {
        const float weight = h[j * columns + k];
        float* __restrict__ rk = r + k * rows;
        for (int64_t o = lo; o < hi; ++o) rk[o] -= weight * ej[o];
      }
    }
  }
}

// gptq_gemm.cpp holds the namespace's TORCH_LIBRARY block; this file adds to it.
TORCH_LIBRARY_FRAGMENT(memtool_cpu, m) {
  m.def(
      "sign_feedback_block(Tensor(a!) rest, Tensor magnitude, Tensor hinv, Tensor(b!) negative, "
      "Tensor(c!) err) -> ()");
}

TORCH_LIBRARY_IMPL(memtool_cpu, CPU, m) { m.impl("sign_feedback_block", &sign_feedback_block); }
