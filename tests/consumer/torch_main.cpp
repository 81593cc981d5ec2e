// pkm::torch from an installed pkm: a libtorch module computed by pkm, forward and backward.
#include <pkm/torch/module.hpp>

#include <iostream>

int main() {
  pkm::torch_ops::MemoryModuleOptions o;
  o.input_dim = 16;
  o.output_dim = 16;
  o.n_keys = 8;
  o.heads = 2;
  o.knn = 4;
  o.k_dim = 8;
  pkm::torch_ops::MemoryModule memory(o);
  const torch::Tensor x = torch::randn({5, 16});
  const torch::Tensor y = memory->forward(x);
  y.sum().backward();
  std::cout << "pkm::torch consumer: output " << y.size(0) << " x " << y.size(1) << "\n";
  return memory->keys.grad().defined() && y.isfinite().all().item<bool>() ? 0 : 1;
}
