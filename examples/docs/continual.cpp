// docs/continual.md: slot statistics on background data, then sparse memory finetuning —
// each batch updates only its top t slots by TF-IDF, with SGD, fused with the backward.
#include <cstdio>

#include <pkm/io/safetensors.hpp>
#include <pkm/io/slot_statistics.hpp>
#include <pkm/pkm.hpp>

int main() {
  pkm::MemoryConfig cfg;
  cfg.input_dim = 64;
  cfg.output_dim = 64;
  cfg.heads = 2;
  cfg.k_dim = 32;
  cfg.knn = 8;
  cfg.n_keys = 32;
  cfg.v_dim = 64;
  const pkm::Index B = 16;
  pkm::MemoryLayer<float> layer(cfg, 1);
  pkm::ForwardCache<float> cache;
  pkm::RowMatrix<float> out(B, cfg.output_dim), dout(B, cfg.output_dim);
  pkm::LayerParameters<float> dparams(cfg);  // dense gradients: computed, not applied here

  // [statistics]
  pkm::SlotStatistics background(cfg.slots(), /*track_mass=*/true);
  for (int batch = 0; batch < 20; ++batch) {  // your pretraining (or background) batches
    const pkm::RowMatrix<float> x = pkm::RowMatrix<float>::Random(B, cfg.input_dim);
    layer.forward(x, out, cache);
    background.add(cache);  // one document; add({&c1, &c2}) for layers sharing the table
  }
  std::printf("%.1f%% of the slots used, KL to uniform %.3f nats, busiest slot %lld\n",
              100 * background.used_fraction(), background.kl_to_uniform(),
              (long long)background.top(1)[0].first);
  pkm::io::SafetensorsWriter w;  // saved next to the checkpoint's other tensors
  pkm::io::add_slot_statistics(w, background, "memory.stats.");
  w.write("background_stats.safetensors");
  // [/statistics]

  // [finetune]
  pkm::optim::SgdOptions sgd_options;
  sgd_options.lr = 1.0;
  pkm::optim::SparseSgd<float> sgd(layer.values(), sgd_options);
  pkm::SlotSelectionOptions select;
  select.score = pkm::SlotScore::tf_idf;  // or count, kl
  select.top = 32;                        // or select.fraction = 0.1
  for (int step = 0; step < 5; ++step) {  // the new data
    const pkm::RowMatrix<float> x = pkm::RowMatrix<float>::Random(B, cfg.input_dim);
    layer.forward(x, out, cache);
    const pkm::SlotSelection picked =
        pkm::select_slots(pkm::count_slots(cache, cfg.slots()), background, select);
    sgd.set_row_mask(picked.mask);  // every other row: no update at all
    dout = out;                     // your loss's gradient
    dparams.set_zero();
    layer.backward_fused(x, cache, dout, dparams, sgd);
  }
  // [/finetune]
  std::printf("sparse finetuning: %lld steps of %lld slots\n", (long long)sgd.steps(),
              (long long)select.top);
  return 0;
}
