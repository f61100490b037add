# Installs the build into a fresh prefix, then builds and runs a separate
# project against it with find_package(taskmgr), and a C program with the
# flags `pkg-config --cflags --libs taskmgr` gives.
# Inputs: SOURCE_DIR BUILD_DIR WORK_DIR CONSUMER_DIR CONFIG SANITIZE
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    string(JOIN " " cmd ${ARGN})
    message(FATAL_ERROR "command failed (${rc}): ${cmd}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
  set(LAST_OUTPUT "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
run(${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${prefix}")

set(san_flags "")
if(SANITIZE)
  set(san_flags "-fsanitize=${SANITIZE}")
endif()

# 1. find_package(taskmgr)
run(${CMAKE_COMMAND} -S "${CONSUMER_DIR}" -B "${WORK_DIR}/build"
    "-DCMAKE_PREFIX_PATH=${prefix}" "-DCMAKE_BUILD_TYPE=${CONFIG}"
    "-DCMAKE_CXX_FLAGS=${san_flags}" "-DCMAKE_EXE_LINKER_FLAGS=${san_flags}"
    "-DCPP_HOST_SOURCE=${SOURCE_DIR}/examples/cpp_host/main.cpp")
run(${CMAKE_COMMAND} --build "${WORK_DIR}/build")
run("${WORK_DIR}/build/consumer")
if(NOT LAST_OUTPUT MATCHES "consumer ok")
  message(FATAL_ERROR "find_package consumer printed: ${LAST_OUTPUT}")
endif()
# examples/cpp_host, built by that separate project against the install.
run("${WORK_DIR}/build/cpp_host")
if(NOT LAST_OUTPUT MATCHES "event cleanup_completed.*task .*\"status\":\"completed\"")
  message(FATAL_ERROR "examples/cpp_host built against the install printed: ${LAST_OUTPUT}")
endif()

# 2. pkg-config
file(GLOB_RECURSE pcfile "${prefix}/taskmgr.pc")
if(NOT pcfile)
  message(FATAL_ERROR "taskmgr.pc was not installed under ${prefix}")
endif()
get_filename_component(pcdir "${pcfile}" DIRECTORY)
get_filename_component(libdir "${pcdir}" DIRECTORY)
run(${CMAKE_COMMAND} -E env "PKG_CONFIG_PATH=${pcdir}" pkg-config --cflags --libs taskmgr)
string(STRIP "${LAST_OUTPUT}" pcflags)
if(NOT pcflags MATCHES "-ltaskmgr" OR NOT pcflags MATCHES "-I[^ ]*/include")
  message(FATAL_ERROR "unexpected pkg-config flags: ${pcflags}")
endif()
separate_arguments(pcflags_list UNIX_COMMAND "${pcflags}")
separate_arguments(san_list UNIX_COMMAND "${san_flags}")
run(cc -std=c99 -Wall -Wextra -Werror ${san_list} "${CONSUMER_DIR}/consumer_c.c" ${pcflags_list}
    -o "${WORK_DIR}/consumer_c")
run(${CMAKE_COMMAND} -E env "LD_LIBRARY_PATH=${libdir}" "${WORK_DIR}/consumer_c")
if(NOT LAST_OUTPUT MATCHES "pkg-config consumer ok")
  message(FATAL_ERROR "pkg-config consumer printed: ${LAST_OUTPUT}")
endif()
# examples/c compiles with the same flags.
run(cc -std=c99 -Wall -Wextra -Werror ${san_list} "${SOURCE_DIR}/examples/c/ocr_pages.c" ${pcflags_list}
    -o "${WORK_DIR}/ocr_pages")
