// docs/precision.md: the layer's products in bf16 (run in a folder holding memory.safetensors;
// CTest copies tests/data/memplus.checkpoint.safetensors there).
#include <cstdio>

#include <pkm/io/checkpoint.hpp>

int main() {
  pkm::io::SafetensorsFile file("memory.safetensors");
  auto fp32 = pkm::io::load_layer<float>(file);
  const pkm::RowMatrix<float> x = pkm::RowMatrix<float>::Random(64, fp32.config().input_dim);
  pkm::ForwardCache<float> cache;
  const pkm::RowMatrix<float> y32 = fp32.forward(x, cache);
  // [bf16_compute]
  // The same checkpoint, its products (query, Memory+ and output projections, forward and
  // backward) computed from bf16-rounded operands with fp32 sums; parameters stay fp32.
  auto layer = pkm::io::load_layer<float>(file);
  layer.params().set_compute(pkm::Dtype::bf16);  // or MemoryConfig::compute = pkm::Dtype::bf16
  const pkm::RowMatrix<float> y = layer.forward(x, cache);
  // [/bf16_compute]
  // [bf16_scores]
  // The key search's half scores from bf16 operands too, as torch.autocast computes them (the
  // top-k stays exact over the scores computed); the default keeps them fp32.
  layer.params().set_score_compute(pkm::Dtype::bf16);  // or MemoryConfig::score_compute
  const pkm::RowMatrix<float> y_scores = layer.forward(x, cache);
  // [/bf16_scores]
  const double rel = (y - y32).norm() / y32.norm();
  const double rel_scores = (y_scores - y32).norm() / y32.norm();
  std::printf("bf16 scores too: output within %.2g of fp32 (relative)\n", rel_scores);
  if (!(rel_scores < 0.1)) return 1;
  // Where the CPU lacks AVX512-BF16 the products stay fp32 (bf16 would be slower there).
  std::printf("products in %s: output within %.2g of fp32 (relative)\n",
              pkm::bf16_products_here() ? pkm::bf16_kernel_name(pkm::bf16_kernel()) : "fp32",
              rel);
  return rel < 0.1 ? 0 : 1;
}
