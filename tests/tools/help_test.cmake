# Every program the build puts in its bin directory answers --help: it exits
# 0 and prints something (its usage). Runs `<program> --help` for each
# executable file in BIN_DIR, one at a time, each with a time limit, and
# fails listing every program that exited non-zero, timed out or printed
# nothing, with the start of what it printed.
#
#   cmake -DBIN_DIR=build/release/bin [-DTIMEOUT=60] [-DMIN_PROGRAMS=1] -P help_test.cmake
#
# MIN_PROGRAMS: fewer executables than this is a failure too (a wrong
# BIN_DIR must not pass with nothing checked).
#
# It was seen to fail: on a copy of build/release/bin where tessera_test_pch
# was the old anchor (`int main() { return 0; }`: exit 0, no output) and a
# script refusing the option (`echo "rejects_help: unknown option '$1'" >&2;
# exit 2`) was added, it ended with
#   2 of 50 programs do not answer --help (exit 0 with a usage text):
#     rejects_help: exit 2: rejects_help: unknown option '--help'
#     tessera_test_pch: exit 0: printed nothing
# and a program that hangs is listed as "Process terminated due to timeout".
if(NOT BIN_DIR OR NOT IS_DIRECTORY "${BIN_DIR}")
  message(FATAL_ERROR "help_test: BIN_DIR '${BIN_DIR}' is not a directory")
endif()
if(NOT TIMEOUT)
  set(TIMEOUT 60)
endif()
if(NOT MIN_PROGRAMS)
  set(MIN_PROGRAMS 1)
endif()

# A program must print its help whatever environment ctest runs in: not as
# one rank of a launched job, not as an RLHF worker its driver spawned.
foreach(var RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK MASTER_ADDR MASTER_PORT
            TESSERA_RLHF_DRIVER TESSERA_RLHF_PROCESS)
  unset(ENV{${var}})
endforeach()

file(GLOB entries LIST_DIRECTORIES false "${BIN_DIR}/*")
list(SORT entries)
set(checked 0)
set(failed 0)
set(failures "")
foreach(path ${entries})
  # Only executable files (CMake 3.25 has no IS_EXECUTABLE test).
  execute_process(COMMAND test -x "${path}" RESULT_VARIABLE not_executable)
  if(NOT not_executable EQUAL 0)
    continue()
  endif()
  get_filename_component(name "${path}" NAME)
  math(EXPR checked "${checked} + 1")
  execute_process(COMMAND "${path}" --help
                  INPUT_FILE /dev/null
                  TIMEOUT ${TIMEOUT}
                  RESULT_VARIABLE rc
                  OUTPUT_VARIABLE out
                  ERROR_VARIABLE err)
  string(STRIP "${out}${err}" printed)
  if(NOT rc STREQUAL "0" OR printed STREQUAL "")
    if(printed STREQUAL "")
      set(what "printed nothing")
    else()
      # The first lines are enough to see why.
      string(SUBSTRING "${printed}" 0 300 what)
      string(REPLACE "\n" "\n      " what "${what}")
    endif()
    if(rc MATCHES "^[0-9]+$")
      set(status "exit ${rc}")
    else()
      set(status "${rc}")  # e.g. "Process terminated due to timeout"
    endif()
    math(EXPR failed "${failed} + 1")
    string(APPEND failures "  ${name}: ${status}: ${what}\n")
    message(STATUS "${name}: FAILED (${status})")
  else()
    message(STATUS "${name}: ok")
  endif()
endforeach()

if(checked LESS MIN_PROGRAMS)
  message(FATAL_ERROR "help_test: only ${checked} executable(s) in ${BIN_DIR}, expected at least "
                      "${MIN_PROGRAMS}")
endif()
if(failed GREATER 0)
  message(FATAL_ERROR "${failed} of ${checked} programs do not answer --help (exit 0 with a usage "
                      "text):\n${failures}")
endif()
message(STATUS "all ${checked} programs in ${BIN_DIR} answer --help")
