# Compiles runner.cu (every kernel of pkm/cuda/embedding_bag.cuh) for sm_${ARCH} with
# -Xptxas -v, writes ptxas's report to ${LOG} and prints one line per pkm kernel.
execute_process(
  COMMAND ${NVCC} -std=c++17 -O3 -arch=sm_${ARCH} -Xptxas -v -I${INCLUDE} -c ${SOURCE} -o ${LOG}.o
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
file(WRITE ${LOG} "${out}${err}")
file(REMOVE ${LOG}.o)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nvcc failed for sm_${ARCH}:\n${err}")
endif()
string(REPLACE "\n" ";" lines "${out}${err}")
set(kernel "")
foreach(line IN LISTS lines)
  if(line MATCHES "Compiling entry function '([^']+)'")
    set(kernel "${CMAKE_MATCH_1}")
  elseif(line MATCHES "bytes spill stores" AND kernel MATCHES "pkm4cuda")
    string(REGEX REPLACE "^ +" "" line "${line}")
    string(REGEX MATCH "pkm4cuda6detail[0-9]+([a-z_]+)" short "${kernel}")
    message(STATUS "sm_${ARCH} ${CMAKE_MATCH_1}: ${line}")
  endif()
endforeach()
