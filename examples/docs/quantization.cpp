// docs/quantization.md: serve a trained layer from a quantized table (run in a folder holding
// memory.safetensors; CTest copies tests/data/memplus.checkpoint.safetensors there).
#include <cstdio>

#include <pkm/io/checkpoint.hpp>
#include <pkm/io/quantize.hpp>

int main() {
  const pkm::RowMatrix<float> x = pkm::RowMatrix<float>::Random(64, 16);
  pkm::ForwardCache<float> cache;
  auto trained = pkm::io::load_layer<float>(pkm::io::SafetensorsFile("memory.safetensors"));
  const pkm::RowMatrix<float> y32 = trained.forward(x, cache);
  // [quantize_in_memory]
  // A trained fp32 layer, served from its table quantized to int8 rows (3.9x smaller); the
  // dense parameters stay fp32. The quantized layer runs forward only.
  pkm::MemoryLayer<float, pkm::Quantized> served(
      trained.params(), pkm::quantize(trained.values(), pkm::Dtype::int8_rowwise));
  const pkm::RowMatrix<float> y = served.forward(x, cache);
  // [/quantize_in_memory]
  // [quantize_file]
  // File to file, a block of rows at a time (what the pkm_quantize tool does), then mapped:
  // the table is read from the page cache, never copied.
  pkm::io::quantize_checkpoint("memory.safetensors", "memory-int4.safetensors",
                               pkm::Dtype::int4_rowwise);
  pkm::io::SafetensorsFile file("memory-int4.safetensors");
  auto mapped = pkm::io::load_layer_mapped<float, pkm::Quantized>(file);
  const pkm::RowMatrix<float> y4 = mapped.forward(x, cache);
  // [/quantize_file]
  const double rel8 = (y - y32).norm() / y32.norm(), rel4 = (y4 - y32).norm() / y32.norm();
  std::printf("int8 table: output within %.2g of fp32; int4: %.2g (relative); read kernel %s\n",
              rel8, rel4, pkm::quant_kernel_name(pkm::quant_kernel()));
  return rel8 < 0.01 && rel4 < 0.1 ? 0 : 1;
}
