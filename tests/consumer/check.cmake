# Installs pkm from PKM_SOURCE into WORK/prefix, then builds and runs the consumer project
# against it with find_package(pkm): every exported target (pkm::io, pkm::precompiled, and
# pkm::torch / pkm::cuda with TORCH / CUDA ON). Run with cmake -P.
file(REMOVE_RECURSE ${WORK})
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}")
  endif()
endfunction()
# An install-only configure builds nothing of pkm's own: it must not look for Torch or CUDA
# (slow, and it used to announce tests and benchmarks that do not exist).
execute_process(COMMAND ${CMAKE_COMMAND} -S ${PKM_SOURCE} -B ${WORK}/plain-configure -G ${GENERATOR}
    -DPKM_BUILD_TESTS=OFF -DPKM_BUILD_BENCH=OFF -DPKM_BUILD_EXAMPLES=OFF
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the install configure failed (${rc}):\n${out}\n${err}")
endif()
if(out MATCHES "pkm: (Torch|CUDA|no CUDA)" OR out MATCHES "tests and benchmark are on")
  message(FATAL_ERROR "the install configure probed Torch or CUDA:\n${out}")
endif()

# The install, with pkm::torch and pkm::cuda where this machine has them (TORCH, CUDA), and a
# consumer of every exported target. PKM_NATIVE=OFF: an installed library for any x86-64.
run(${CMAKE_COMMAND} -S ${PKM_SOURCE} -B ${WORK}/pkm-build -G ${GENERATOR}
    -DPKM_BUILD_TESTS=OFF -DPKM_BUILD_BENCH=OFF -DPKM_BUILD_EXAMPLES=OFF -DPKM_NATIVE=OFF
    -DPKM_TORCH=${TORCH} -DPKM_CUDA=${CUDA} -DCMAKE_INSTALL_PREFIX=${WORK}/prefix)
run(${CMAKE_COMMAND} --build ${WORK}/pkm-build --parallel 2)
run(${CMAKE_COMMAND} --install ${WORK}/pkm-build)
run(${CMAKE_COMMAND} -S ${PKM_SOURCE}/tests/consumer -B ${WORK}/consumer-build -G ${GENERATOR}
    -DCMAKE_PREFIX_PATH=${WORK}/prefix -DCMAKE_BUILD_TYPE=Release
    -DPKM_CONSUMER_TORCH=${TORCH} -DPKM_CONSUMER_CUDA=${CUDA} ${CUDA_ARGS})
run(${CMAKE_COMMAND} --build ${WORK}/consumer-build --parallel 2)
run(${WORK}/consumer-build/consumer)
run(${WORK}/consumer-build/consumer_precompiled)
if(TORCH)
  run(${WORK}/consumer-build/consumer_torch)
endif()
if(CUDA)
  run(${WORK}/consumer-build/consumer_cuda)
endif()

# The same consumer with add_subdirectory(pkm): tests, benchmarks and examples stay off.
run(${CMAKE_COMMAND} -S ${PKM_SOURCE}/tests/consumer -B ${WORK}/subdir-build -G ${GENERATOR}
    -DPKM_SOURCE_DIR=${PKM_SOURCE} -DCMAKE_BUILD_TYPE=Release)
if(EXISTS ${WORK}/subdir-build/pkm/tests)
  message(FATAL_ERROR "add_subdirectory(pkm) built pkm's tests; they must default off there")
endif()
run(${CMAKE_COMMAND} --build ${WORK}/subdir-build --target consumer --parallel 2)
run(${WORK}/subdir-build/consumer)
