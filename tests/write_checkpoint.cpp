// write_checkpoint OUT.safetensors [bf16]: saves a seeded, gated, qk-norm layer with
// pkm::io::save_layer, for the check that PyTorch loads what pkm writes.
#include <pkm/io/checkpoint.hpp>

#include <string>

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  pkm::MemoryConfig c;
  c.input_dim = 16;
  c.heads = 4;
  c.n_keys = 8;
  c.k_dim = 8;
  c.knn = 4;
  c.v_dim = 12;
  c.output_dim = 16;
  c.gating = true;
  c.qk_norm = true;
  c.qk_norm_scale = 2.0;
  if (argc > 2 && std::string(argv[2]) == "bf16") {
    pkm::io::save_layer(argv[1], pkm::MemoryLayer<float, pkm::bf16>(c, 6));
  } else {
    pkm::io::save_layer(argv[1], pkm::MemoryLayer<float>(c, 5));
  }
  return 0;
}
