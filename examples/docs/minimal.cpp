// README.md, "A minimal example": a Memory+ layer, one forward and one backward.
// [minimal]
#include <cstdio>

#include <pkm/pkm.hpp>

int main() {
  pkm::MemoryConfig cfg;
  cfg.input_dim = 1024;
  cfg.output_dim = 1024;  // the model width
  cfg.heads = 4;
  cfg.k_dim = 512;
  cfg.knn = 32;  // 4 heads, 32 slots each
  cfg.n_keys = 256;
  cfg.v_dim = 1024;        // 256^2 slots of 1024 values (256 MiB)
  cfg.memory_plus = true;  // SiLU-gated output ("Memory+")

  pkm::MemoryLayer<float> layer(cfg, /*seed=*/1);  // owns its parameters and table
  pkm::ForwardCache<float> cache;                  // reuse across steps

  const pkm::Index B = 64;                                                    // tokens in the batch
  pkm::RowMatrix<float> x = pkm::RowMatrix<float>::Random(B, cfg.input_dim);  // hidden states
  pkm::RowMatrix<float> y = layer.forward(x, cache);

  pkm::RowMatrix<float> dy = y;           // the loss gradient; here of 0.5 |y|^2
  pkm::LayerGradients<float> grads(cfg);  // dense grads + sparse value grad
  pkm::RowMatrix<float> dx(B, cfg.input_dim);
  layer.backward(x, cache, dy, grads, dx);  // grads += ..., dx = ...
  // grads.values.rows: the touched slots; grads.values.values: their gradient rows
  std::printf("%lld tokens read %lld distinct slots\n", static_cast<long long>(B),
              static_cast<long long>(grads.values.size()));
}
// [/minimal]
