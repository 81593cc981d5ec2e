// pkm/io/safetensors.hpp — read and write the safetensors format: the format's vocabulary
// and checks (pkm/io/format.hpp), the reader (pkm/io/safetensors_file.hpp) and the writer
// (pkm/io/safetensors_writer.hpp).
#pragma once

#include "pkm/io/format.hpp"
#include "pkm/io/safetensors_file.hpp"
#include "pkm/io/safetensors_writer.hpp"
