# Installs the build into a fresh prefix, then builds and runs a separate
# project against it with find_package(taskmgr), and a C program with the
# flags `pkg-config --cflags --libs taskmgr` gives.
# Inputs: SOURCE_DIR BUILD_DIR WORK_DIR CONSUMER_DIR CONFIG SANITIZE EXAMPLES
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

# 1. find_package(taskmgr), with the line the docs show (the same in each).
set(find_line "")
foreach(doc README.md docs/GETTING_STARTED.md docs/C_API.md)
  file(READ "${SOURCE_DIR}/${doc}" text)
  string(REGEX MATCHALL "find_package\\(taskmgr[^)]*\\)" lines "${text}")
  if(NOT lines)
    message(FATAL_ERROR "${doc} shows no find_package(taskmgr ...) line")
  endif()
  foreach(line IN LISTS lines)
    if(find_line AND NOT line STREQUAL find_line)
      message(FATAL_ERROR "the docs show two find_package lines: '${find_line}' and '${line}' (${doc})")
    endif()
    set(find_line "${line}")
  endforeach()
endforeach()
message(STATUS "the docs' line: ${find_line}")
run(${CMAKE_COMMAND} -S "${CONSUMER_DIR}" -B "${WORK_DIR}/build"
    "-DTASKMGR_FIND_PACKAGE_LINE=${find_line}"
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

# The installed programs run with no LD_LIBRARY_PATH (their RUNPATH is
# $ORIGIN/../lib), from any working directory.
if(NOT EXAMPLES)
  message(STATUS "examples not built: no taskmgr-ocr or taskmgr-http to check")
else()
  foreach(program taskmgr-ocr taskmgr-http)
    if(NOT EXISTS "${prefix}/bin/${program}")
      message(FATAL_ERROR "${program} was not installed under ${prefix}/bin")
    endif()
    run(${CMAKE_COMMAND} -E env --unset=LD_LIBRARY_PATH "${prefix}/bin/${program}" --help)
    if(NOT LAST_OUTPUT MATCHES "usage: ${program}")
      message(FATAL_ERROR "the installed ${program} printed: ${LAST_OUTPUT}")
    endif()
  endforeach()
endif()

# The installed Python module imports with no environment variable: it
# finds the installed library from its own location. (Not under the
# sanitizers: their runtime cannot be loaded into a plain python3.)
file(GLOB_RECURSE pymodule "${prefix}/lib/*/taskmgr.py")
find_program(py3 python3 PATHS /usr/bin NO_DEFAULT_PATH)
if(NOT pymodule)
  message(FATAL_ERROR "taskmgr.py was not installed under ${prefix}/lib")
elseif(py3 AND NOT SANITIZE)
  get_filename_component(pydir "${pymodule}" DIRECTORY)
  execute_process(
    COMMAND ${CMAKE_COMMAND} -E env --unset=TASKMGR_LIBRARY --unset=LD_LIBRARY_PATH
            --unset=PYTHONPATH ${py3} -c "import taskmgr; print('python module', taskmgr.version(), taskmgr._lib._name)"
    WORKING_DIRECTORY "${pydir}" RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  string(FIND "${out}" " ${prefix}/lib/libtaskmgr.so.0" at)  # the installed one, not another
  if(NOT rc EQUAL 0 OR NOT out MATCHES "python module 0\\.[0-9]+\\.[0-9]+ " OR at EQUAL -1)
    message(FATAL_ERROR "the installed taskmgr.py (${pymodule}): ${rc}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
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
# The line docs/C_API.md gives for a prefix the loader does not search, run
# as written (host.c is the consumer), then the program with no
# LD_LIBRARY_PATH.
file(READ "${SOURCE_DIR}/docs/C_API.md" capi_doc)
string(REGEX MATCH "cc host\\.c [^\n]*-Wl,-rpath[^\n]*" rpath_line "${capi_doc}")
if(NOT rpath_line)
  message(FATAL_ERROR "docs/C_API.md shows no 'cc host.c ... -Wl,-rpath' line")
endif()
string(STRIP "${rpath_line}" rpath_line)
set(docdir "${WORK_DIR}/doc_line")
file(MAKE_DIRECTORY "${docdir}")
file(COPY_FILE "${CONSUMER_DIR}/consumer_c.c" "${docdir}/host.c")
execute_process(COMMAND ${CMAKE_COMMAND} -E env "PKG_CONFIG_PATH=${pcdir}" "CFLAGS=${san_flags}"
                        bash -c "${rpath_line} ${san_flags} -o host"
                WORKING_DIRECTORY "${docdir}" RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the docs' line failed (${rc}): ${rpath_line}\n${err}")
endif()
run(${CMAKE_COMMAND} -E env --unset=LD_LIBRARY_PATH "${docdir}/host")
if(NOT LAST_OUTPUT MATCHES "pkg-config consumer ok")
  message(FATAL_ERROR "the program built with the docs' rpath line printed: ${LAST_OUTPUT}")
endif()
# examples/c compiles with the same flags.
run(cc -std=c99 -Wall -Wextra -Werror ${san_list} "${SOURCE_DIR}/examples/c/ocr_pages.c" ${pcflags_list}
    -o "${WORK_DIR}/ocr_pages")
