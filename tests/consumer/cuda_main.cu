// pkm::cuda from an installed pkm: the header compiles with nvcc and its host side runs (the
// workspace query needs no GPU).
#include <pkm/cuda/embedding_bag.cuh>

#include <cstdio>

int main() {
  pkm::cuda::ForwardArgs f;
  float dummy = 0;
  std::int64_t idx = 0;
  f.table = {&dummy, pkm::Dtype::f32, 1, 1, 1};
  f.bag = {&idx, 1, 1, 1};
  f.weights = &dummy;
  f.out = &dummy;
  f.out_stride = 1;
  std::size_t bytes = 0;
  const pkm::cuda::Status s = pkm::cuda::embedding_bag_forward(f, nullptr, &bytes, nullptr);
  std::printf("pkm::cuda consumer: status %d, workspace %zu bytes\n", int(s), bytes);
  return s == pkm::cuda::Status::ok && bytes > 0 ? 0 : 1;
}
