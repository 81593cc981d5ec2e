// torch_memory: pkm's memory layer inside a libtorch C++ model. A small regression model —
// Linear -> pkm::torch_ops::MemoryModule (Memory+, the reference parameter names) -> Linear —
// trained with torch::optim::Adam on the dense parameters while pkm's row-wise Adagrad updates
// the value table inside backward (the fused mode). Prints the loss as it falls.
//
//   build/examples/torch_memory [STEPS]
#include <pkm/torch/module.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>

int main(int argc, char** argv) {
  const std::string arg = argc > 1 ? argv[1] : "200";
  if (arg == "-h" || arg == "--help") {
    std::printf(
        "usage: torch_memory [STEPS]   (default 200)\nTrains a libtorch model with a pkm memory "
        "layer.\n");
    return 0;
  }
  const long steps = std::strtol(arg.c_str(), nullptr, 10);
  if (steps < 1) {
    std::fprintf(stderr, "torch_memory: STEPS must be a positive integer\n");
    return 2;
  }
  torch::manual_seed(0);
  // [module]
  pkm::torch_ops::MemoryModuleOptions o;
  o.input_dim = 64;
  o.output_dim = 64;
  o.n_keys = 32;  // 1024 slots
  o.heads = 4;
  o.knn = 8;
  o.k_dim = 32;
  pkm::torch_ops::MemoryModule memory(o);
  torch::nn::Linear in(16, 64), out(64, 1);
  // The dense parameters with Adam; the table (its own learning rate) with pkm inside backward.
  std::vector<torch::Tensor> dense{memory->keys};
  for (auto& p : memory->named_parameters()) {
    if (p.key() != "values.weight" && p.key() != "keys") dense.push_back(p.value());
  }
  for (auto& p : in->parameters()) dense.push_back(p);
  for (auto& p : out->parameters()) dense.push_back(p);
  torch::optim::Adam adam(dense, torch::optim::AdamOptions(1e-3));
  auto value_opt = memory->make_value_optimizer("adagrad", /*lr=*/0.05);
  memory->values->weight.set_requires_grad(false);
  // [/module]

  // A fixed random target function of 16 inputs.
  const torch::Tensor x = torch::randn({512, 16});
  const torch::Tensor y =
      torch::sin(3 * x.slice(1, 0, 1)) * torch::cos(2 * x.slice(1, 1, 2)) + x.slice(1, 2, 3).pow(2);
  double first = 0, last = 0;
  for (long step = 0; step < steps; ++step) {
    // [step]
    adam.zero_grad();
    const torch::Tensor h = torch::relu(in(x));
    const torch::Tensor pred = out(h + memory->forward(h, value_opt));
    const torch::Tensor loss = torch::mse_loss(pred, y);
    loss.backward();  // pkm's backward: dense gradients for Adam, the table updated in place
    adam.step();
    // [/step]
    last = loss.item<double>();
    if (step == 0) first = last;
    if (step % 50 == 0 || step + 1 == steps) std::printf("step %4ld  loss %.4f\n", step, last);
  }
  std::printf("loss %.4f -> %.4f after %ld steps (%lld pkm table updates)\n", first, last, steps,
              static_cast<long long>(value_opt->steps()));
  return last < first ? 0 : 1;
}
