# Every dependency comes from the system (Debian packages); nothing is vendored.

find_package(Threads REQUIRED)
find_package(Boost 1.81 REQUIRED COMPONENTS json)   # Asio, Lockfree (headers) + JSON
find_package(fmt REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(SQLiteCpp REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(TESSERACT REQUIRED IMPORTED_TARGET tesseract>=5)
pkg_check_modules(LEPTONICA REQUIRED IMPORTED_TARGET lept)
pkg_check_modules(POPPLER_CPP REQUIRED IMPORTED_TARGET poppler-cpp)  # PDF input
# The PostgreSQL store: libpq's C API (pipeline mode batches a commit's
# statements into one round trip), no C++ wrapper (docs/STORAGE.md).
pkg_check_modules(LIBPQ REQUIRED IMPORTED_TARGET libpq>=14)
find_package(OpenCVLite REQUIRED COMPONENTS core imgproc imgcodecs)
find_package(OpenMP REQUIRED COMPONENTS CXX)

if(TASKMGR_BUILD_TESTS)
  find_package(doctest REQUIRED)
endif()
