# Finds the OpenCV modules taskmgr uses from Debian's per-module -dev packages
# (libopencv-core-dev, libopencv-imgproc-dev, libopencv-imgcodecs-dev). Those
# packages ship neither OpenCVConfig.cmake nor opencv4.pc (only the 150-package
# libopencv-dev does), so the headers and libraries are located directly.
#
# Defines OpenCVLite::<component> imported targets and OpenCVLite_FOUND.

find_path(OpenCVLite_INCLUDE_DIR opencv2/core.hpp PATH_SUFFIXES opencv4)
set(_ocvl_required OpenCVLite_INCLUDE_DIR)
foreach(_c IN LISTS OpenCVLite_FIND_COMPONENTS)
  find_library(OpenCVLite_${_c}_LIBRARY NAMES opencv_${_c})
  if(OpenCVLite_${_c}_LIBRARY)
    set(OpenCVLite_${_c}_FOUND TRUE)
  endif()
  list(APPEND _ocvl_required OpenCVLite_${_c}_LIBRARY)
endforeach()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(OpenCVLite
  REQUIRED_VARS ${_ocvl_required}
  HANDLE_COMPONENTS)

if(OpenCVLite_FOUND)
  foreach(_c IN LISTS OpenCVLite_FIND_COMPONENTS)
    if(NOT TARGET OpenCVLite::${_c})
      add_library(OpenCVLite::${_c} UNKNOWN IMPORTED)
      set_target_properties(OpenCVLite::${_c} PROPERTIES
        IMPORTED_LOCATION "${OpenCVLite_${_c}_LIBRARY}"
        INTERFACE_INCLUDE_DIRECTORIES "${OpenCVLite_INCLUDE_DIR}")
    endif()
  endforeach()
endif()
mark_as_advanced(OpenCVLite_INCLUDE_DIR)
