// toy_network: a small model written the way an Eigen user writes one — column-major
// Eigen::MatrixXf weights and activations — with a pkm Memory+ layer as its middle block,
// trained end to end with pkm's optimizers: AdamW for every dense weight (the model's own and
// the layer's), lazy Adam for the value table, fused with the backward.
//
//   h = x W_in;  y = h + memory(h);  prediction = y W_out;  loss = |prediction - target|^2 / 2B
//
// Prints the loss as it falls and exits 0 when the last loss is below half the first.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include <Eigen/Dense>
#include <pkm/pkm.hpp>

int main() {
  using Mat = Eigen::MatrixXf;  // Eigen's default layout: column-major
  const int d = 64, B = 256, steps = 60;

  pkm::MemoryConfig cfg;
  cfg.input_dim = d;
  cfg.output_dim = d;
  cfg.heads = 2;
  cfg.k_dim = 32;
  cfg.knn = 8;
  cfg.n_keys = 32;
  cfg.v_dim = d;
  pkm::MemoryLayer<float> memory(cfg, /*seed=*/1);
  pkm::LayerGradients<float> memory_grads(cfg);
  pkm::ForwardCache<float> cache;

  std::srand(3);
  Mat w_in = Mat::Random(d, d) / std::sqrt(float(d)),
      w_out = Mat::Random(d, d) / std::sqrt(float(d));
  Mat dw_in = Mat::Zero(d, d), dw_out = Mat::Zero(d, d);
  const Mat x = Mat::Random(B, d);
  const Mat target = (x * Mat::Random(d, d)).array().tanh().matrix();  // a fixed function to learn

  pkm::optim::AdamOptions dense_opts;
  dense_opts.lr = 3e-3;
  pkm::optim::AdamW<float> dense(dense_opts);
  dense.add("w_in", w_in, dw_in);  // column-major matrices register as they are
  dense.add("w_out", w_out, dw_out);
  dense.add("memory.", memory.params(), memory_grads.params);
  pkm::optim::AdamOptions value_opts;
  value_opts.lr = 3e-2;
  pkm::optim::LazyAdam<float> values(memory.values(), value_opts);

  Mat h(B, d), m(B, d), y(B, d), prediction(B, d), dy(B, d), dh(B, d);
  float first = 0, last = 0;
  for (int step = 0; step < steps; ++step) {
    h.noalias() = x * w_in;
    memory.forward(h, m, cache);  // column-major in and out
    y = h + m;
    prediction.noalias() = y * w_out;
    const Mat dpred = (prediction - target) / float(B);
    const float loss = 0.5f * (prediction - target).squaredNorm() / float(B);
    if (step == 0) first = loss;
    last = loss;
    if (step % 10 == 0 || step == steps - 1) std::printf("step %2d  loss %.5f\n", step, loss);

    dense.zero_grad();
    dw_out.noalias() = y.transpose() * dpred;
    dy.noalias() = dpred * w_out.transpose();
    memory.backward_fused(h, cache, dy, memory_grads.params, values, dh);  // dh = d memory / dh
    dh += dy;                                                              // the residual path
    dw_in.noalias() = x.transpose() * dh;
    dense.step();
  }
  std::printf("loss %.5f -> %.5f (%s)\n", first, last,
              last < 0.5f * first ? "learned" : "NOT learned");
  return last < 0.5f * first ? 0 : 1;
}
