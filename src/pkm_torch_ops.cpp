// The shared library python/pkm_torch.py loads (torch.ops.load_library): pkm's memory layer
// as torch.ops.pkm.memory and its value optimizer as torch.classes.pkm.ValueOptimizer.
#include "pkm/torch/register.hpp"
