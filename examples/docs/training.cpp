// docs/training.md: a training step with the two optimizer groups, the fused update, and saving
// and resuming the model, the optimizers and the caller's own tensors.
#include <cstdio>

#include <pkm/io/checkpoint.hpp>
#include <pkm/io/optimizer_state.hpp>
#include <pkm/pkm.hpp>

int main() {
  pkm::MemoryConfig cfg;
  cfg.input_dim = 128;
  cfg.output_dim = 128;
  cfg.heads = 2;
  cfg.k_dim = 64;
  cfg.knn = 8;
  cfg.n_keys = 32;
  cfg.v_dim = 128;
  const pkm::Index B = 32;
  // The caller's own tensors: a norm's weights and their gradient, trained by the same AdamW.
  pkm::RowMatrix<float> norm_w = pkm::RowMatrix<float>::Ones(1, cfg.input_dim);
  pkm::RowMatrix<float> norm_grad = pkm::RowMatrix<float>::Zero(1, cfg.input_dim);
  const pkm::RowMatrix<float> x = pkm::RowMatrix<float>::Random(B, cfg.input_dim);
  const pkm::RowMatrix<float> target = pkm::RowMatrix<float>::Random(B, cfg.output_dim);
  pkm::RowMatrix<float> out(B, cfg.output_dim), dout(B, cfg.output_dim), dx(B, cfg.input_dim);
  pkm::ForwardCache<float> cache;

  // [optimizers]
  pkm::MemoryLayer<float> layer(cfg, /*seed=*/1);
  pkm::LayerGradients<float> grads(cfg);

  pkm::optim::AdamOptions dense_opts;  // lr 1e-3, betas (0.9, 0.999), eps 1e-8
  dense_opts.lr = 1e-3;
  dense_opts.weight_decay = 0.1;  // decoupled, as torch.optim.AdamW
  dense_opts.max_grad_norm = 1.0;
  pkm::optim::AdamW<float> dense(dense_opts);
  dense.add("layers.3.mem.", layer.params(), grads.params);  // every tensor, reference names
  dense.add("layers.3.norm.weight", norm_w, norm_grad, /*weight_decay=*/0.0);  // your own tensors

  pkm::optim::AdamOptions value_opts;
  value_opts.lr = 1e-3;
  value_opts.max_grad_norm = 1.0;
  pkm::optim::LazyAdam<float> values(layer.values(), value_opts);

  // one step
  grads.zero();
  layer.forward(x, out, cache);
  dout = out - target;  // your loss's gradient: here of 0.5 |out - target|^2
  layer.backward(x, cache, dout, grads, dx);
  values.step(layer.values(), grads.values);  // touched rows only
  dense.step();                               // returns the global norm before clipping
  // [/optimizers]

  layer.forward(x, out, cache);
  dout = out - target;
  // [fused]
  grads.params.set_zero();
  layer.backward_fused(x, cache, dout, grads.params, values, dx);  // values updated here
  dense.step();
  // [/fused]

  {
    // [save]
    pkm::io::SafetensorsWriter w;
    pkm::io::add_layer(w, layer, "layers.3.mem.");
    w.add("layers.3.norm.weight", {cfg.input_dim}, norm_w.data());  // your own tensors too
    pkm::io::add_optimizer_state(w, dense, "optim.dense.");
    pkm::io::add_optimizer_state(w, values, "optim.values.");
    w.write("step_1000.safetensors");  // atomically: a temporary file renamed over the target
    // [/save]
  }
  // [resume]
  pkm::io::SafetensorsFile f("step_1000.safetensors");
  pkm::io::LoadOptions lo;
  lo.prefix = "layers.3.mem.";
  pkm::MemoryLayer<float> resumed = pkm::io::load_layer<float>(f, lo);
  pkm::LayerGradients<float> resumed_grads(cfg);
  pkm::RowMatrix<float> resumed_norm_w(1, cfg.input_dim), resumed_norm_grad(1, cfg.input_dim);
  f.read("layers.3.norm.weight", resumed_norm_w.data(),
         static_cast<std::size_t>(resumed_norm_w.size()));

  // The optimizers are built as before, over the resumed tensors, then their state is loaded.
  pkm::optim::AdamW<float> resumed_dense(dense_opts);
  resumed_dense.add("layers.3.mem.", resumed.params(), resumed_grads.params);
  resumed_dense.add("layers.3.norm.weight", resumed_norm_w, resumed_norm_grad,
                    /*weight_decay=*/0.0);
  pkm::optim::LazyAdam<float> resumed_values(resumed.values(), value_opts);
  pkm::io::load_optimizer_state(f, resumed_dense, "optim.dense.");
  pkm::io::load_optimizer_state(f, resumed_values, "optim.values.");
  // [/resume]
  std::printf("resumed at step %lld (dense) and %lld (values)\n",
              static_cast<long long>(resumed_dense.steps()),
              static_cast<long long>(resumed_values.steps()));
  return resumed_dense.steps() == 2 && resumed_values.steps() == 2 && resumed_norm_w == norm_w ? 0
                                                                                               : 1;
}
