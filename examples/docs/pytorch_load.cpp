// docs/pytorch.md, "2. Load it in C++" (run in a folder holding memory.safetensors; CTest
// copies tests/data/memplus.checkpoint.safetensors there: n_keys 8, knn 4 in its metadata).
#include <pkm/io/checkpoint.hpp>

int main() {
  // [load_options]
  pkm::io::SafetensorsFile file("memory.safetensors");  // mapped, every header field checked
  pkm::io::LoadOptions opt;                             // anything set here wins over metadata
  opt.knn = 2;                                          // e.g. read fewer slots than trained with

  auto layer = pkm::io::load_layer<float>(file, opt);             // table converted to float
  auto small = pkm::io::load_layer<float, pkm::bf16>(file, opt);  // table stored as BF16
  auto mapped = pkm::io::load_layer_mapped<float>(file, opt);     // table read in place, no copy

  pkm::io::save_layer("resaved.safetensors", layer);  // same names + mem_knn/qk_norm/qk_norm_scale
  // [/load_options]
  return layer.config().knn == 2 && small.config() == mapped.config() ? 0 : 1;
}
