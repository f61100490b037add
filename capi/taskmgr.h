/*
 * taskmgr: the C ABI.
 *
 * The only C header of taskmgr. It compiles as C89, C99 and C++ and uses no
 * C++ type. Conventions (see docs/C_API.md):
 *
 *  - Every function that can fail returns an int status: TASKMGR_OK (0) or
 *    one of the negative TASKMGR_E_* codes below. The values are stable and
 *    equal to taskmgr::ErrorCode in the C++ API.
 *  - The message of a failure is kept per thread: taskmgr_last_error()
 *    returns it. Every entry point clears it first, so after a successful
 *    call it is the empty string.
 *  - Strings the library returns through a `char**` out-parameter belong to
 *    the caller and are freed with taskmgr_free(). `const char*` return
 *    values are borrowed; each function says how long they live.
 *  - No exception ever crosses this boundary: every entry point runs inside
 *    one catch-all. An unexpected C++ exception becomes TASKMGR_E_INTERNAL.
 *  - All functions are thread-safe unless stated otherwise.
 */
#ifndef TASKMGR_H
#define TASKMGR_H

#include <stddef.h>

#include "taskmgr/export.hpp"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Version --------------------------------------------------------- */

/* The version these declarations belong to. Compare with
 * taskmgr_version_number() to detect a header/library mismatch. */
#define TASKMGR_VERSION_MAJOR 0
#define TASKMGR_VERSION_MINOR 1
#define TASKMGR_VERSION_PATCH 0
#define TASKMGR_VERSION_STRING "0.1.0"
/* MAJOR * 10000 + MINOR * 100 + PATCH, as zstd and sqlite3 do. */
#define TASKMGR_VERSION_NUMBER (TASKMGR_VERSION_MAJOR * 10000 + TASKMGR_VERSION_MINOR * 100 + TASKMGR_VERSION_PATCH)

/* The library's version, "MAJOR.MINOR.PATCH". Static storage: never freed. */
TASKMGR_API const char* taskmgr_version_string(void);
/* The library's TASKMGR_VERSION_NUMBER. */
TASKMGR_API int taskmgr_version_number(void);

/* ---- Status codes ----------------------------------------------------- */

#define TASKMGR_OK 0
#define TASKMGR_E_INVALID_ARGUMENT (-1)     /* NULL or malformed parameter */
#define TASKMGR_E_NOT_FOUND (-2)            /* unknown task, device, service, file */
#define TASKMGR_E_QUEUE_FULL (-3)           /* tasks.max_queue_size reached */
#define TASKMGR_E_OUT_OF_MEMORY (-4)        /* allocation or device memory failed */
#define TASKMGR_E_TIMEOUT (-5)              /* a wait ran past its deadline */
#define TASKMGR_E_BUSY (-6)                 /* resource in use (e.g. database held) */
#define TASKMGR_E_INVALID_CONFIG (-7)       /* configuration failed validation */
#define TASKMGR_E_IO (-8)                   /* file system or database I/O failed */
#define TASKMGR_E_DEVICE_UNAVAILABLE (-9)   /* no device can hold the task */
#define TASKMGR_E_MEMORY_LIMIT_EXCEEDED (-10) /* over the per-task memory limit */
#define TASKMGR_E_POOL_EXHAUSTED (-11)      /* no service instance free in time */
#define TASKMGR_E_INVALID_STATE (-12)       /* not allowed in the current state */
#define TASKMGR_E_INCOMPATIBLE (-13)        /* version or schema mismatch */
#define TASKMGR_E_CANCELLED (-14)           /* the operation was cancelled */
#define TASKMGR_E_UNSUPPORTED (-15)         /* not available in this build */
#define TASKMGR_E_INTERNAL (-99)            /* a bug in taskmgr */

/* The stable name of a status code ("ok", "invalid_argument", ...), or
 * "unknown" for a value that is not a code. Static storage: never freed. */
TASKMGR_API const char* taskmgr_status_name(int status);

/* ---- Errors and memory ----------------------------------------------- */

/* The message of the last failed call made by this thread ("" when the last
 * call succeeded). Borrowed: valid until this thread's next taskmgr call. */
TASKMGR_API const char* taskmgr_last_error(void);

/* Frees a string or buffer the library returned. NULL is a no-op. */
TASKMGR_API void taskmgr_free(void* ptr);

/* ---- Configuration ---------------------------------------------------- */

/* Parses and validates a YAML configuration (NULL or "" means the defaults)
 * and returns it as YAML with every key and its value in force.
 *   yaml      configuration text (UTF-8), or NULL
 *   out_yaml  receives a new string; free it with taskmgr_free()
 * Returns TASKMGR_OK, TASKMGR_E_INVALID_ARGUMENT (out_yaml is NULL) or
 * TASKMGR_E_INVALID_CONFIG (the message names the key path and line). */
TASKMGR_API int taskmgr_config_normalize(const char* yaml, char** out_yaml);

/* As taskmgr_config_normalize, reading the YAML from a file. A missing file
 * is TASKMGR_E_INVALID_CONFIG with a message naming the path. */
TASKMGR_API int taskmgr_config_normalize_file(const char* path, char** out_yaml);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* TASKMGR_H */
