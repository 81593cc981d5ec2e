#include <pkm/io/checkpoint.hpp>
#include <pkm/pkm.hpp>

#include <iostream>

int main() {
  pkm::MemoryConfig c;
  c.input_dim = 16;
  c.heads = 2;
  c.n_keys = 8;
  c.k_dim = 8;
  c.knn = 4;
  c.v_dim = 16;
  c.output_dim = 16;
  pkm::MemoryLayer<float> layer(c, 1);
  pkm::ForwardCache<float> cache;
  const pkm::RowMatrix<float> x = pkm::RowMatrix<float>::Ones(3, 16);
  const pkm::RowMatrix<float> y = layer.forward(x, cache);
  pkm::io::save_layer("consumer_layer.safetensors", layer);
  const auto back =
      pkm::io::load_layer<float>(pkm::io::SafetensorsFile("consumer_layer.safetensors"));
  if (back.config() != c) return 1;
  std::cout << "pkm " << PKM_VERSION_STRING << " consumer: output " << y.rows() << " x " << y.cols()
            << "\n";
  return y.allFinite() ? 0 : 1;
}
