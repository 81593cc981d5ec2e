// The CUDA side of the GPU tests, behind a plain C++ interface (host vectors in, host vectors
// out), so the tests themselves compile with the host compiler and use pkm's CPU ops as the
// reference (gpu_tests.cpp). runner.cu, compiled by nvcc, implements it with
// pkm/cuda/embedding_bag.cuh.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <pkm/cuda/args.hpp>

namespace pkm_cuda_test {

/// True when a CUDA device can be used; else why not.
bool device_available(std::string* why);

struct HostTable {
  pkm::Dtype dtype = pkm::Dtype::f32;
  std::int64_t rows = 0, dim = 0, stride = 0;
  std::vector<unsigned char> bytes;  // rows * stride elements
};

struct ForwardCall {
  std::vector<std::int64_t> indices;  // tokens x heads x knn
  std::int64_t tokens = 0, heads = 1, knn = 1;
  std::vector<float> weights;  // or scores, with softmax
  bool softmax = false, check = false;
  std::int64_t out_stride = 0;  // >= dim
};
struct ForwardResult {
  pkm::cuda::Status status = pkm::cuda::Status::ok;
  std::string why;
  std::vector<float> out;      // tokens x out_stride
  std::vector<float> weights;  // softmax output (with softmax)
};
ForwardResult run_forward(const HostTable& table, const ForwardCall& call);

struct BackwardCall {
  std::vector<std::int64_t> indices;
  std::int64_t tokens = 0, heads = 1, knn = 1;
  std::vector<float> weights;  // the forward's (softmax output when fused)
  std::vector<float> dy;       // tokens x dim
  bool softmax_backward = false, check = false, want_dweights = true;
  pkm::cuda::GradOutput output = pkm::cuda::GradOutput::sparse;
  pkm::cuda::Reduction reduction = pkm::cuda::Reduction::deterministic;
  std::vector<float> dense;  // rows x dim, the dense gradient to add into (dense_add)
};
struct BackwardResult {
  pkm::cuda::Status status = pkm::cuda::Status::ok;
  std::string why;
  std::vector<std::int64_t> unique;  // sparse
  std::vector<float> rows;           // sparse: unique.size() x dim
  std::vector<float> dense;          // dense_add: rows x dim after the call
  std::vector<float> dweights;       // tokens x bag
};
BackwardResult run_backward(const HostTable& table, const BackwardCall& call);

}  // namespace pkm_cuda_test
