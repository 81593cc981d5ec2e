// libFuzzer target for everything pkm reads from a file: the safetensors parser, tensor reads
// with conversion, the checkpoint loader (config inference, load_layer with a float or a
// quantized table, one forward) and the optimizer-state loaders. Any exception other than the documented std::invalid_argument /
// std::out_of_range / std::runtime_error (and std::bad_alloc) escapes and counts as a crash, as
// do sanitizer reports. Built by PKM_FUZZ=ON with clang; scripts/fuzz.sh runs it.
#include <cstddef>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <vector>

#include <pkm/io/checkpoint.hpp>
#include <pkm/io/optimizer_state.hpp>
#include <pkm/pkm.hpp>

namespace {

constexpr std::int64_t kMaxElements = std::int64_t{1} << 20;  // keep each input cheap

template <class F>
void documented_errors_only(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
  } catch (const std::out_of_range&) {
  } catch (const std::runtime_error&) {
  } catch (const std::bad_alloc&) {
  }
}

void run(const pkm::io::SafetensorsFile& f) {
  for (const auto& t : f.tensors()) {
    if (t.numel() > kMaxElements) continue;
    documented_errors_only([&] {
      if (pkm::io::is_float(t.dtype)) {
        (void)f.read<float>(t.name);
        (void)f.read<pkm::bf16>(t.name);
      } else {
        (void)f.read<std::int64_t>(t.name);
      }
    });
  }
  documented_errors_only([&] {
    pkm::io::LoadOptions opt;
    const pkm::MemoryConfig c = pkm::io::infer_config(f, opt);
    if (c.slots() * c.v_dim > kMaxElements || c.input_dim * c.heads * c.k_dim > kMaxElements)
      return;
    const auto layer = pkm::io::load_layer<float>(f, opt);
    pkm::RowMatrix<float> x = pkm::RowMatrix<float>::Constant(2, c.input_dim, 0.5f);
    pkm::ForwardCache<float> cache;
    const auto out = layer.forward(x, cache);
    pkm::LayerGradients<float> grads(c);
    layer.backward(x, cache, out, grads);
  });
  documented_errors_only([&] {  // a quantized table (pkm_values_format in the metadata)
    pkm::io::LoadOptions opt;
    const pkm::MemoryConfig c = pkm::io::infer_config(f, opt);
    if (c.slots() * c.v_dim > kMaxElements || c.input_dim * c.heads * c.k_dim > kMaxElements)
      return;
    const auto layer = pkm::io::load_layer<float, pkm::Quantized>(f, opt);
    pkm::RowMatrix<float> x = pkm::RowMatrix<float>::Constant(2, c.input_dim, 0.5f);
    pkm::ForwardCache<float> cache;
    const auto out = layer.forward(x, cache);
    pkm::LayerGradients<float> grads(c);
    layer.backward(x, cache, out, grads);  // refused: inference only
  });
  documented_errors_only([&] {
    pkm::optim::LazyAdam<float> adam(4, 3);
    pkm::io::load_optimizer_state(f, adam, "");
  });
  documented_errors_only([&] {
    pkm::optim::RowWiseAdagrad<float> ada(4, 3);
    pkm::io::load_optimizer_state(f, ada, "");
  });
  documented_errors_only([&] {
    std::vector<float> p(6, 1.0f), g(6, 0.5f);
    pkm::optim::AdamW<float> dense;
    dense.add("w", p.data(), g.data(), 6);
    pkm::io::load_optimizer_state(f, dense, "");
    dense.step();
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  documented_errors_only([&] {
    run(pkm::io::SafetensorsFile::from_bytes(std::vector<std::uint8_t>(data, data + size),
                                             "fuzz input"));
  });
  return 0;
}
