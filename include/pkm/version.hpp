// pkm/version.hpp — the library's version (kept equal to the CMake project version).
#pragma once

#define PKM_VERSION_MAJOR 0
#define PKM_VERSION_MINOR 1
#define PKM_VERSION_PATCH 0
#define PKM_VERSION_STRING "0.1.0"
