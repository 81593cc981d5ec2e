# Fails when a Catch test case name would break discovery: catch_discover_tests splits names at
# ';', and the halves then "pass" by matching nothing. Run as
#   cmake -DEXE=<pkm_tests> -P check_test_names.cmake
execute_process(COMMAND ${EXE} --list-test-names-only OUTPUT_VARIABLE out RESULT_VARIABLE rc)
if(rc LESS 0 OR rc MATCHES "[^0-9]")
  message(FATAL_ERROR "${EXE} --list-test-names-only failed: ${rc}")
endif()
string(FIND "${out}" ";" semicolon)
if(NOT semicolon EQUAL -1)
  string(REPLACE ";" "<;>" shown "${out}")
  message(FATAL_ERROR "a test name contains ';', which CTest discovery splits:\n${shown}")
endif()
string(REGEX MATCHALL "\n" lines "${out}")
list(LENGTH lines count)
message(STATUS "${count} test case names, none with ';'")
