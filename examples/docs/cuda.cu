// docs/cuda.md: the forward read with the softmax fused in, through pkm/cuda/embedding_bag.cuh.
// CTest builds it for sm_80 and sm_90 and runs it; without a CUDA device it exits 77 (skipped).
#include <pkm/cuda/embedding_bag.cuh>

#include <cstdio>
#include <string>
#include <vector>

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("doc_cuda: skipped, no usable CUDA device\n");
    return 77;
  }
  const std::int64_t rows = 1024, v_dim = 256, row_stride = 256, tokens = 64, heads = 4, knn = 8;
  const std::vector<__nv_bfloat16> values(std::size_t(rows * row_stride), __float2bfloat16(0.5f));
  std::vector<std::int64_t> indices(std::size_t(tokens * heads * knn));
  for (std::size_t i = 0; i < indices.size(); ++i) indices[i] = std::int64_t(i * 37 % rows);
  const std::vector<float> scores(indices.size(), 0.0f);
  void *d_values, *d_indices, *d_scores, *d_weights, *d_read;
  cudaMalloc(&d_values, values.size() * 2);
  cudaMalloc(&d_indices, indices.size() * 8);
  cudaMalloc(&d_scores, scores.size() * 4);
  cudaMalloc(&d_weights, scores.size() * 4);
  cudaMalloc(&d_read, std::size_t(tokens * v_dim) * 4);
  cudaMemcpy(d_values, values.data(), values.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(d_indices, indices.data(), indices.size() * 8, cudaMemcpyHostToDevice);
  cudaMemcpy(d_scores, scores.data(), scores.size() * 4, cudaMemcpyHostToDevice);
  cudaStream_t stream = nullptr;
  void* d_ws = nullptr;
  std::string why;

  // [forward]
  pkm::cuda::ForwardArgs f;
  f.table = {d_values, pkm::Dtype::bf16, rows, v_dim, row_stride};  // fp32, bf16 or fp16
  f.bag = {static_cast<const std::int64_t*>(d_indices), tokens, heads,
           knn};                                    // tokens x (heads knn) slot ids
  f.weights = static_cast<const float*>(d_scores);  // fp32, tokens x (heads knn)
  f.fused_softmax = true;                           // softmax per head inside the kernel...
  f.weights_out = static_cast<float*>(d_weights);   // ...written here for the backward
  f.out = static_cast<float*>(d_read);              // fp32 out, fp32 accumulation
  f.out_stride = v_dim;
  std::size_t bytes = 0;
  pkm::cuda::embedding_bag_forward(f, nullptr, &bytes, stream);  // size query: a null workspace
  cudaMalloc(&d_ws, bytes);                                      // once, reused call after call
  const pkm::cuda::Status s = pkm::cuda::embedding_bag_forward(f, d_ws, &bytes, stream, &why);
  // [/forward]

  std::vector<float> read(std::size_t(tokens * v_dim));
  cudaMemcpy(read.data(), d_read, read.size() * 4, cudaMemcpyDeviceToHost);
  for (void* p : {d_values, d_indices, d_scores, d_weights, d_read, d_ws}) cudaFree(p);
  if (s != pkm::cuda::Status::ok) {
    std::printf("doc_cuda: %s\n", why.c_str());
    return 1;
  }
  // Equal weights (1/knn per head) over rows of 0.5: every output is heads x 0.5.
  for (float v : read) {
    if (v < 1.999f || v > 2.001f) {
      std::printf("doc_cuda: read %g, expected 2\n", double(v));
      return 1;
    }
  }
  std::printf("doc_cuda: forward ok\n");
  return 0;
}
