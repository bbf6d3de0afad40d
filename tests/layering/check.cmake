# The include-layer check (scripts/check_layers.py against cmake/layers.txt):
# the tree passes, and the fixture wrong_include/ — a dist source including
# an nn header — is refused with a message naming the file, the line and
# the layers dist may use.
#   cmake -DPYTHON=... -DSOURCE_DIR=... -P check.cmake
execute_process(COMMAND ${PYTHON} ${SOURCE_DIR}/scripts/check_layers.py ${SOURCE_DIR}
                RESULT_VARIABLE tree_rc OUTPUT_VARIABLE tree_out ERROR_VARIABLE tree_err)
if(NOT tree_rc EQUAL 0)
  message(FATAL_ERROR "includes across layers in the tree:\n${tree_out}${tree_err}")
endif()
execute_process(COMMAND ${PYTHON} ${SOURCE_DIR}/scripts/check_layers.py
                        ${SOURCE_DIR}/tests/layering/wrong_include --layers ${SOURCE_DIR}/cmake/layers.txt
                RESULT_VARIABLE bad_rc OUTPUT_VARIABLE bad_out ERROR_VARIABLE bad_err)
if(bad_rc EQUAL 0)
  message(FATAL_ERROR "the checker accepted a dist source including tessera/nn/model.h:\n${bad_out}")
endif()
string(FIND "${bad_out}" "src/dist/reaches_up.cpp:3: module dist includes tessera/nn/model.h" at)
if(at EQUAL -1)
  message(FATAL_ERROR "the checker refused the fixture without naming it:\n${bad_out}${bad_err}")
endif()
message(STATUS "${tree_out}")
