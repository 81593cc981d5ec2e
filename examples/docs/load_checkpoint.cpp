// README.md: running a layer trained in PyTorch (run in a folder holding memory.safetensors;
// CTest copies tests/data/memplus.checkpoint.safetensors there).
// [load]
#include <cstdio>

#include <pkm/io/checkpoint.hpp>

int main() {
  pkm::io::SafetensorsFile file("memory.safetensors");
  auto layer = pkm::io::load_layer<float>(file);  // knn etc. from __metadata__ or LoadOptions
  std::printf(
      "%lld slots of %lld values, knn %lld\n", static_cast<long long>(layer.config().slots()),
      static_cast<long long>(layer.config().v_dim), static_cast<long long>(layer.config().knn));
}
// [/load]
