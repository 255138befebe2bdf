// Batched positional reads for the flash store's neuron reader (memtool.serve.flash.io).
//
// One call reads every span of a staging load in parallel on an OpenMP team, with the GIL
// released by torch's op dispatch: the Python reader spent more time handing reads to its
// thread pool (a future per read) than the reads took to issue. Each span is read whole,
// retrying short reads and EINTR; the result per span is the bytes read (fewer at end of file)
// or -errno, and the caller turns either into its error.

#include <torch/extension.h>

#include <cerrno>
#include <unistd.h>

torch::Tensor pread_spans(int64_t fd, torch::Tensor buffer, torch::Tensor file_offsets,
                          torch::Tensor lengths, torch::Tensor buffer_offsets, int64_t threads) {
  TORCH_CHECK(buffer.scalar_type() == torch::kUInt8 && buffer.is_contiguous(),
              "buffer must be contiguous uint8");
  for (const auto& t : {file_offsets, lengths, buffer_offsets}) {
    TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.dim() == 1,
                "offsets and lengths must be contiguous 1-d int64");
  }
  const int64_t n = file_offsets.size(0);
  TORCH_CHECK(lengths.size(0) == n && buffer_offsets.size(0) == n, "one length per span");
  const int64_t* off = file_offsets.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  const int64_t* dst = buffer_offsets.data_ptr<int64_t>();
  const int64_t capacity = buffer.numel();
  for (int64_t i = 0; i < n; ++i) {  // never write outside the buffer
    TORCH_CHECK(len[i] >= 0 && dst[i] >= 0 && dst[i] + len[i] <= capacity && off[i] >= 0,
                "span ", i, " lies outside the buffer or the file");
  }
  uint8_t* base = buffer.data_ptr<uint8_t>();
  auto got = torch::empty({n}, torch::kLong);
  int64_t* out = got.data_ptr<int64_t>();
  const int team = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
#pragma omp parallel for num_threads(team) schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) {
    int64_t done = 0;
    while (done < len[i]) {
      const ssize_t r = pread(static_cast<int>(fd), base + dst[i] + done,
                              static_cast<size_t>(len[i] - done), off[i] + done);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        done = -errno;
        break;
      }
      if (r == 0) break;  // end of file
      done += r;
    }
    out[i] = done;
  }
  return got;
}

// gptq_gemm.cpp holds the namespace's TORCH_LIBRARY block; this file adds to it.
TORCH_LIBRARY_FRAGMENT(memtool_cpu, m) {
  m.def(
      "pread_spans(int fd, Tensor buffer, Tensor file_offsets, Tensor lengths, "
      "Tensor buffer_offsets, int threads) -> Tensor");
}

TORCH_LIBRARY_IMPL(memtool_cpu, CPU, m) { m.impl("pread_spans", &pread_spans); }
