// pkm/precompiled.hpp — the opt-in precompiled part of pkm: `extern template` declarations for
// the common instantiations (float layers over float and bf16 tables, with the fused backward
// for lazy Adam and row-wise Adagrad; the float optimizers), so that a translation unit
// including pkm does not compile them again. Their one definition is src/pkm_precompiled.cpp,
// built by the CMake target pkm::precompiled (PKM_PRECOMPILED=ON); linking that target defines
// PKM_PRECOMPILED, and pkm/pkm.hpp then includes this header. Other types and member templates
// still compile where used, as usual. The library must be built with the same ISA flags as
// the code using it (under add_subdirectory it is: it takes the project's flags).
#pragma once

#include "pkm/memory_layer.hpp"
#include "pkm/optim/adamw.hpp"
#include "pkm/optim/lazy_adam.hpp"
#include "pkm/optim/rowwise_adagrad.hpp"

// PKM_EXTERN is `extern` in users' code and empty in src/pkm_precompiled.cpp, which defines
// the same list.
#ifndef PKM_EXTERN
#define PKM_EXTERN extern
#endif

#define PKM_FUSED_BACKWARD(S, T, Opt)                                                            \
  PKM_EXTERN template double pkm::MemoryLayer<S, T>::backward_fused_core<Opt>(                   \
      const pkm::ConstMatrixRef<S>&, const pkm::ForwardCache<S>&, const pkm::ConstMatrixRef<S>&, \
      pkm::LayerParameters<S>&, Opt&, pkm::MatrixRef<S>*);
#define PKM_SPARSE_BACKWARD(S, T)                                                                \
  PKM_EXTERN template void pkm::MemoryLayer<S, T>::backward_core<pkm::SparseRowGradSink<S>>(     \
      const pkm::ConstMatrixRef<S>&, const pkm::ForwardCache<S>&, const pkm::ConstMatrixRef<S>&, \
      pkm::LayerParameters<S>&, pkm::SparseRowGradSink<S>&, pkm::MatrixRef<S>*) const;

PKM_EXTERN template class pkm::MemoryLayer<float, float>;
PKM_EXTERN template class pkm::MemoryLayer<float, pkm::bf16>;
PKM_EXTERN template class pkm::optim::AdamW<float>;
PKM_EXTERN template class pkm::optim::LazyAdam<float>;
PKM_EXTERN template class pkm::optim::RowWiseAdagrad<float>;
PKM_SPARSE_BACKWARD(float, float)
PKM_SPARSE_BACKWARD(float, pkm::bf16)
PKM_FUSED_BACKWARD(float, float, pkm::optim::LazyAdam<float>)
PKM_FUSED_BACKWARD(float, float, pkm::optim::RowWiseAdagrad<float>)
PKM_FUSED_BACKWARD(float, pkm::bf16, pkm::optim::LazyAdam<float>)
PKM_FUSED_BACKWARD(float, pkm::bf16, pkm::optim::RowWiseAdagrad<float>)

#undef PKM_FUSED_BACKWARD
#undef PKM_SPARSE_BACKWARD
