// pkm/version.hpp — the library's version: the one place it is written (CMake's project
// version is read from here).
#pragma once

#define PKM_VERSION_MAJOR 0
#define PKM_VERSION_MINOR 1
#define PKM_VERSION_PATCH 0

#define PKM_VERSION_STR_(x) #x
#define PKM_VERSION_STR(x) PKM_VERSION_STR_(x)
/// "major.minor.patch"
#define PKM_VERSION_STRING           \
  PKM_VERSION_STR(PKM_VERSION_MAJOR) \
  "." PKM_VERSION_STR(PKM_VERSION_MINOR) "." PKM_VERSION_STR(PKM_VERSION_PATCH)
