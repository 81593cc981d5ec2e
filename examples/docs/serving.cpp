// docs/serving.md: a mapped table served with its rows fetched early, and a RowFetch hook of
// one's own (run in a folder holding memory.safetensors; CTest copies
// tests/data/memplus.checkpoint.safetensors there).
#include <cstdio>
#include <vector>

#include <pkm/io/checkpoint.hpp>

int main() {
  const pkm::RowMatrix<float> x = pkm::RowMatrix<float>::Random(8, 16);
  pkm::ForwardCache<float> cache;
  const auto loaded = pkm::io::load_layer<float>(pkm::io::SafetensorsFile("memory.safetensors"));
  const pkm::RowMatrix<float> want = loaded.forward(x, cache);
  // [fetch_early]
  // The table stays in the file; each forward asks the disk for the rows its key search chose
  // (all at once) before reading them. The layer keeps the mapping alive, and refuses to read
  // a file truncated or rewritten since it was opened.
  pkm::io::LoadOptions opt;
  opt.fetch = pkm::io::TableFetch::early;
  auto layer = pkm::io::load_layer_mapped<float>(pkm::io::SafetensorsFile("memory.safetensors"), opt);
  const pkm::RowMatrix<float> y = layer.forward(x, cache);
  // [/fetch_early]
  // [row_fetch]
  // Any storage can be told early: the hook sees the rows of each forward before its read.
  std::vector<pkm::Index> asked;
  pkm::RowFetch mapped_fetch = layer.row_fetch();  // keep the file check and the early fetch
  layer.set_row_fetch([&](const pkm::Index* rows, pkm::Index n) {
    mapped_fetch(rows, n);
    asked.insert(asked.end(), rows, rows + n);  // e.g. count them, or bring them in from far
  });
  layer.forward(x, cache);
  // [/row_fetch]
  const auto& c = layer.config();
  std::printf("mapped with early fetch: %s; the hook saw %zu rows (8 tokens x %lld heads x %lld)\n",
              y == want ? "same bits as loaded" : "DIFFERENT", asked.size(),
              (long long)c.heads, (long long)c.knn);
  return y == want && asked.size() == std::size_t(8 * c.heads * c.knn) ? 0 : 1;
}
