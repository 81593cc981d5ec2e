// pkm/pkm.hpp — product-key memory layers (Berges et al., "Memory Layers at Scale", 2024;
// Lample et al., "Large Memory Layers with Product Keys", 2019), header-only, on CPU.
// Include this one header for everything pkm offers on the CPU.
#pragma once

#include "pkm/version.hpp"
#include "pkm/errors.hpp"
#include "pkm/dtype.hpp"
#include "pkm/config.hpp"
#include "pkm/types.hpp"
#include "pkm/parameters.hpp"
#include "pkm/value_table.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/row_accumulator.hpp"
#include "pkm/init.hpp"
#include "pkm/activations.hpp"
#include "pkm/gemm.hpp"
#include "pkm/gemm_bf16.hpp"
#include "pkm/linear.hpp"
#include "pkm/packed_weights.hpp"
#include "pkm/qk_norm.hpp"
#include "pkm/product_keys.hpp"
#include "pkm/softmax.hpp"
#include "pkm/embedding_bag.hpp"
#include "pkm/quantized_table.hpp"
#include "pkm/quantized_bag.hpp"
#include "pkm/memory_layer.hpp"
#include "pkm/optim/grad_clip.hpp"
#include "pkm/optim/adamw.hpp"
#include "pkm/optim/sparse_optimizer.hpp"
#include "pkm/optim/lazy_adam.hpp"
#include "pkm/optim/rowwise_adagrad.hpp"
#include "pkm/optim/sparse_sgd.hpp"
#include "pkm/row_mask.hpp"
#include "pkm/slot_statistics.hpp"
#include "pkm/slot_selection.hpp"
#if defined(PKM_PRECOMPILED)
#include "pkm/precompiled.hpp"  // linked with pkm::precompiled: the common instantiations are there
#endif
