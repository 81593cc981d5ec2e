// pkm/row_mask.hpp: a row mask honoured exactly by every sparse optimizer, fused or not,
// against an unmasked optimizer stepping the gradient with the masked rows dropped.
#include <catch2/catch.hpp>

#include <vector>

#include <pkm/pkm.hpp>

#include "support.hpp"

using pkm::Index;
using MatF = pkm::RowMatrix<float>;
using pkmtest::same_bits;
using pkmtest::state_of;

TEMPLATE_TEST_CASE(
    "a row mask leaves masked rows bitwise unchanged in every optimizer, fused or not",
    "[row_mask][optim][fused]", pkm::optim::LazyAdam<float>, pkm::optim::RowWiseAdagrad<float>,
    pkm::optim::SparseSgd<float>) {
  using Opt = TestType;
  typename Opt::options_type o;
  o.lr = 0.05;
  o.weight_decay = 0.01;  // decay would move a masked row if the mask were not honoured
  o.max_grad_norm = 0.3;  // clipping active: the norm must be that of the allowed rows
  auto c = pkmtest::medium_config();
  pkm::MemoryLayer<float> base(c, 31);
  // A: masked optimizer, backward then step. B: masked optimizer, fused. R: the reference,
  // an unmasked optimizer stepping the gradient with the masked rows dropped.
  pkm::MemoryLayer<float> a = base, b = base, r = base;
  Opt oa(a.values(), o), ob(b.values(), o), orf(r.values(), o);
  pkm::SlotStatistics background(c.slots());
  for (int step = 0; step < 4; ++step) {
    const MatF x = pkmtest::random_matrix(90, c.input_dim, 40 + step).cast<float>();
    const MatF dout = pkmtest::random_matrix(90, c.output_dim, 60 + step).cast<float>();
    pkm::ForwardCache<float> ca, cb, cr;
    a.forward(x, ca);
    b.forward(x, cb);
    r.forward(x, cr);
    if (step == 0) {  // the first batch is the background
      background.add(ca);
      continue;
    }
    pkm::SlotSelectionOptions so;
    so.fraction = 0.25;
    const pkm::SlotSelection sel =
        pkm::select_slots(pkm::count_slots(ca, c.slots()), background, so);
    oa.set_row_mask(sel.mask);
    ob.set_row_mask(sel.mask);
    const MatF values_before = a.values().matrix();
    const auto state_before = state_of(oa);

    pkm::LayerGradients<float> ga(c), gr(c);
    pkm::LayerParameters<float> gb(c);
    ga.zero();
    gr.zero();
    gb.set_zero();
    a.backward(x, ca, dout, ga);
    const double na = oa.step(a.values(), ga.values);
    const double nb = b.backward_fused(x, cb, dout, gb, ob);
    r.backward(x, cr, dout, gr);
    pkm::mask_gradient(gr.values, sel.mask, c.slots());
    const double nr = orf.step(r.values(), gr.values);
    CHECK(na == nr);
    CHECK(nb == nr);
    CHECK(same_bits(a.values().matrix(), r.values().matrix()));
    CHECK(same_bits(b.values().matrix(), r.values().matrix()));
    CHECK(state_of(oa) == state_of(orf));
    CHECK(state_of(ob) == state_of(orf));

    // Rows outside the mask: value and every per-row state unchanged; inside: changed.
    std::vector<char> allowed(std::size_t(c.slots()), 0);
    for (auto s : sel.slots) allowed[std::size_t(s)] = 1;
    Index changed = 0;
    for (Index row = 0; row < c.slots(); ++row) {
      const bool same = same_bits(a.values().matrix().row(row), values_before.row(row));
      if (!allowed[std::size_t(row)]) {
        CHECK(same);
      } else {
        changed += !same;
      }
    }
    CHECK(changed == Index(sel.slots.size()));
    const auto state_after = state_of(oa);
    for (std::size_t k = 0; k < state_after.size(); ++k) {
      const std::size_t per_row = state_after[k].size() / std::size_t(c.slots());
      if (per_row == 0) continue;  // the step counter
      for (Index row = 0; row < c.slots(); ++row) {
        if (allowed[std::size_t(row)]) continue;
        for (std::size_t e = 0; e < per_row; ++e) {
          const std::size_t i = std::size_t(row) * per_row + e;
          if (state_after[k][i] != state_before[k][i])
            FAIL("state tensor " << k << " of masked row " << row << " changed");
        }
      }
    }
  }
  oa.clear_row_mask();
  CHECK(oa.row_mask() == nullptr);
}
