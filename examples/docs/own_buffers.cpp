// README.md: a layer over the caller's own buffers, without a copy.
#include <cstdio>
#include <vector>

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
  // [own_buffers]
  // One buffer per tensor the config has, of tensor_shape(cfg, t).size() floats (row-major,
  // shapes as the reference module's: docs/architecture.md), plus the table.
  auto size = [&](pkm::Tensor t) {
    return static_cast<std::size_t>(pkm::tensor_shape(cfg, t).size());
  };
  std::vector<float> keys(size(pkm::Tensor::keys)), wq(size(pkm::Tensor::query_weight)),
      bq(size(pkm::Tensor::query_bias)), w1(size(pkm::Tensor::swilu_weight)),
      b1(size(pkm::Tensor::swilu_bias)), w2(size(pkm::Tensor::value_proj_weight)),
      b2(size(pkm::Tensor::value_proj_bias));
  std::vector<float> table(static_cast<std::size_t>(cfg.slots() * cfg.v_dim));

  pkm::ParameterBuffers<float> buf;
  buf.keys = keys.data();
  buf.query_weight = wq.data();
  buf.query_bias = bq.data();
  buf.swilu_weight = w1.data();
  buf.swilu_bias = b1.data();
  buf.value_proj_weight = w2.data();
  buf.value_proj_bias = b2.data();
  pkm::MemoryLayer<float> layer(pkm::LayerParameters<float>::view(cfg, buf),
                                pkm::ValueTable<float>::view(table.data(), cfg.slots(), cfg.v_dim));
  // The layer uses the buffers as they are: fill them with your trained values, or
  // initialise them in place as pkm's own layers are.
  pkm::init_parameters(layer.params(), /*seed=*/1);
  pkm::init_values(layer.values(), /*seed=*/1);
  // [/own_buffers]
  pkm::ForwardCache<float> cache;
  const pkm::RowMatrix<float> y =
      layer.forward(pkm::RowMatrix<float>::Random(8, cfg.input_dim), cache);
  std::printf("forward on the caller's buffers: %lld x %lld, keys[0] = %g\n",
              static_cast<long long>(y.rows()), static_cast<long long>(y.cols()), keys[0]);
  return keys[0] != 0.0f ? 0 : 1;
}
