// README.md: three layers sharing one value table, each with its own keys and projections.
#include <cstdio>

#include <pkm/pkm.hpp>

int main() {
  pkm::MemoryConfig cfg;
  cfg.input_dim = 256;
  cfg.output_dim = 256;
  cfg.heads = 2;
  cfg.k_dim = 64;
  cfg.knn = 16;
  cfg.n_keys = 64;
  cfg.v_dim = 256;
  const pkm::Index B = 32;
  // [shared_pool]
  pkm::ValueTable<float> pool(cfg.slots(), cfg.v_dim);  // 2 MiB-aligned, huge pages advised
  pkm::init_values(pool, /*seed=*/7);
  pkm::MemoryLayer<float> l1(cfg, pool.view(), 1), l2(cfg, pool.view(), 2), l3(cfg, pool.view(), 3);

  // Each layer runs on its own input (in a model: the hidden states at its depth).
  pkm::RowMatrix<float> x1 = pkm::RowMatrix<float>::Random(B, cfg.input_dim), x2 = x1 * 0.5f;
  pkm::ForwardCache<float> c1, c2;
  pkm::RowMatrix<float> y1 = l1.forward(x1, c1), y2 = l2.forward(x2, c2);

  // Backward: each layer's dense gradients apart, the table's merged into one gradient.
  pkm::RowMatrix<float> dy1 = y1, dy2 = y2;  // your loss gradients
  pkm::LayerGradients<float> g1(cfg), g2(cfg);
  pkm::RowMatrix<float> dx1(B, cfg.input_dim), dx2(B, cfg.input_dim);
  pkm::SparseRowGrad<float> dpool;  // backward of each layer merges into it
  l1.backward(x1, c1, dy1, g1.params, dpool, dx1);
  l2.backward(x2, c2, dy2, g2.params, dpool, dx2);
  // [/shared_pool]
  std::printf("the pool's gradient covers %lld rows; l3 shares the table: %s\n",
              static_cast<long long>(dpool.size()),
              l3.values().data() == pool.data() ? "yes" : "no");
  return l3.values().data() == pool.data() ? 0 : 1;
}
