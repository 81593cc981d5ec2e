// The definitions behind pkm/precompiled.hpp: one explicit instantiation of each listed
// template, compiled once into the pkm::precompiled library.
#define PKM_EXTERN
#include "pkm/precompiled.hpp"
