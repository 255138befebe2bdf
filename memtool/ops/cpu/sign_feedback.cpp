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

#include <omp.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

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

// The same loop with each column's magnitude refitted as the residual is updated
// (memtool.compress.bitstack.feedback_refit is the specification): column j's magnitude is
// `u @ v_j` with `v_j = pinv(u) @ |r_j|` rounded to float16 (as stored), fitted to the column
// as the errors of earlier columns left it, not to the column before the block began. v_j sums
// over every output row, so the rows are no longer independent: each thread owns a fixed slice
// of rows, adds its share of v_j into its own slot, and after one barrier every thread sums
// the slots in the same order (double-buffered by column parity, so one barrier per column is
// enough). The sums run in another order than Python's matrix product, so v_j may differ from
// the specification in the last bits (the tests compare with a tolerance).
void sign_feedback_refit_block(torch::Tensor rest, torch::Tensor ut, torch::Tensor pinv,
                               torch::Tensor hinv, torch::Tensor negative, torch::Tensor v,
                               torch::Tensor err) {
  for (const auto& t : {rest, ut, pinv, hinv, v, err}) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.dim() == 2,
                "rest, ut, pinv, hinv, v and err must be contiguous 2-d float32");
  }
  TORCH_CHECK(negative.scalar_type() == torch::kBool && negative.is_contiguous(),
              "negative must be contiguous bool");
  const int64_t columns = rest.size(0), rows = rest.size(1), rank = ut.size(0);
  TORCH_CHECK(err.sizes() == rest.sizes() && negative.sizes() == rest.sizes(),
              "rest, negative and err must have one shape [columns, rows]");
  TORCH_CHECK(ut.size(1) == rows && pinv.size(0) == rank && pinv.size(1) == rows,
              "ut (u transposed) and pinv must be [rank, rows]");
  TORCH_CHECK(v.size(0) == columns && v.size(1) == rank, "v must be [columns, rank]");
  TORCH_CHECK(hinv.size(0) == columns && hinv.size(1) == columns, "hinv must be [columns, columns]");
  float* r = rest.data_ptr<float>();
  const float* u = ut.data_ptr<float>();
  const float* p = pinv.data_ptr<float>();
  const float* h = hinv.data_ptr<float>();
  bool* neg = negative.data_ptr<bool>();
  float* vv = v.data_ptr<float>();
  float* e = err.data_ptr<float>();
  constexpr int64_t kLanes = 16;  // independent partial sums: lets the compiler vectorise
  const int threads = omp_get_max_threads();
  std::vector<float> slots(2 * threads * rank, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t share = (rows + team - 1) / team;
    const int64_t lo = std::min(rows, t * share), hi = std::min(rows, lo + share);
    std::vector<float> vj(rank), lanes(rank * kLanes), magnitude(std::max<int64_t>(hi - lo, 1));
    for (int64_t j = 0; j < columns; ++j) {
      const float* __restrict__ rj = r + j * rows;
      // This thread's share of pinv(u) @ |r_j|, one pass over its rows for every k.
      std::fill(lanes.begin(), lanes.end(), 0.0f);
      int64_t o = lo;
      for (; o + kLanes <= hi; o += kLanes) {
        float a[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) a[l] = std::fabs(rj[o + l]);
        for (int64_t k = 0; k < rank; ++k) {
          const float* __restrict__ pk = p + k * rows + o;
          float* __restrict__ lk = lanes.data() + k * kLanes;
          for (int64_t l = 0; l < kLanes; ++l) lk[l] += pk[l] * a[l];
        }
      }
      for (; o < hi; ++o) {
        for (int64_t k = 0; k < rank; ++k) lanes[k * kLanes] += p[k * rows + o] * std::fabs(rj[o]);
      }
      float* slot = slots.data() + ((j & 1) * team + t) * rank;
      for (int64_t k = 0; k < rank; ++k) {
        float sum = 0.0f;
        for (int64_t l = 0; l < kLanes; ++l) sum += lanes[k * kLanes + l];
        slot[k] = sum;
      }
#pragma omp barrier
      for (int64_t k = 0; k < rank; ++k) {
        float sum = 0.0f;
        for (int s = 0; s < team; ++s) sum += slots[((j & 1) * team + s) * rank + k];
        vj[k] = static_cast<float>(c10::Half(sum));  // the stored factor's precision
      }
      if (t == 0) {
        for (int64_t k = 0; k < rank; ++k) vv[j * rank + k] = vj[k];
      }
      float* __restrict__ mag = magnitude.data();
      std::fill(magnitude.begin(), magnitude.end(), 0.0f);
      for (int64_t k = 0; k < rank; ++k) {
        const float* __restrict__ uk = u + k * rows + lo;
        const float vk = vj[k];
        for (int64_t i = 0; i < hi - lo; ++i) mag[i] += uk[i] * vk;
      }
      const float diagonal = h[j * columns + j];
      float* __restrict__ ej = e + j * rows;
      for (int64_t i = 0; i < hi - lo; ++i) {
        const float ro = rj[lo + i];
        const bool below = ro < 0.0f;
        neg[j * rows + lo + i] = below;
        ej[lo + i] = (ro - (below ? -mag[i] : mag[i])) / diagonal;
      }
      for (int64_t k = j + 1; k < columns; ++k) {
        const float weight = h[j * columns + k];
        float* __restrict__ rk = r + k * rows;
        for (int64_t i = lo; i < hi; ++i) rk[i] -= weight * ej[i];
      }
    }
  }
}

// gptq_gemm.cpp holds the namespace's TORCH_LIBRARY block; this file adds to it.
TORCH_LIBRARY_FRAGMENT(memtool_cpu, m) {
  m.def(
      "sign_feedback_block(Tensor(a!) rest, Tensor magnitude, Tensor hinv, Tensor(b!) negative, "
      "Tensor(c!) err) -> ()");
  m.def(
      "sign_feedback_refit_block(Tensor(a!) rest, Tensor ut, Tensor pinv, Tensor hinv, "
      "Tensor(b!) negative, Tensor(c!) v, Tensor(d!) err) -> ()");
}

TORCH_LIBRARY_IMPL(memtool_cpu, CPU, m) {
  m.impl("sign_feedback_block", &sign_feedback_block);
  m.impl("sign_feedback_refit_block", &sign_feedback_refit_block);
}
