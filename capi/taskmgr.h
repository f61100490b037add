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
 *  - User data handed over with a free function (log, event callbacks,
 *    services) belongs to the library only once the call that hands it
 *    over succeeded; a failed call never calls the free function.
 *  - All functions are thread-safe unless stated otherwise.
 */
#ifndef TASKMGR_H
#define TASKMGR_H

#include <stddef.h>
#include <stdint.h>

/* The export attribute of the functions below. Defined here, so that this
 * header needs no other (the C++ headers use the same macro, from the
 * generated taskmgr/export.hpp, with the same meaning). */
#ifndef TASKMGR_API
#if defined(TASKMGR_STATIC_DEFINE)
#define TASKMGR_API
#elif defined(_WIN32) && defined(taskmgr_objects_EXPORTS)
#define TASKMGR_API __declspec(dllexport)
#elif defined(_WIN32)
#define TASKMGR_API __declspec(dllimport)
#elif defined(__GNUC__) && __GNUC__ >= 4
#define TASKMGR_API __attribute__((visibility("default")))
#else
#define TASKMGR_API
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Version --------------------------------------------------------- */

/* The version these declarations belong to. Compare with
 * taskmgr_version_number() to detect a header/library mismatch. */
#define TASKMGR_VERSION_MAJOR 0
#define TASKMGR_VERSION_MINOR 4
#define TASKMGR_VERSION_PATCH 0
#define TASKMGR_VERSION_STRING "0.4.0"
/* MAJOR * 10000 + MINOR * 100 + PATCH, as zstd and sqlite3 do. */
#define TASKMGR_VERSION_NUMBER \
  (TASKMGR_VERSION_MAJOR * 10000 + TASKMGR_VERSION_MINOR * 100 + TASKMGR_VERSION_PATCH)

/* The library's version, "MAJOR.MINOR.PATCH". Static storage: never freed. */
TASKMGR_API const char* taskmgr_version_string(void);
/* The library's TASKMGR_VERSION_NUMBER. */
TASKMGR_API int taskmgr_version_number(void);

/* ---- Status codes ----------------------------------------------------- */

#define TASKMGR_OK 0
#define TASKMGR_E_INVALID_ARGUMENT (-1)       /* NULL or malformed parameter */
#define TASKMGR_E_NOT_FOUND (-2)              /* unknown task, device, service, file */
#define TASKMGR_E_QUEUE_FULL (-3)             /* tasks.max_queue_size reached */
#define TASKMGR_E_OUT_OF_MEMORY (-4)          /* allocation or device memory failed */
#define TASKMGR_E_TIMEOUT (-5)                /* a wait ran past its deadline */
#define TASKMGR_E_BUSY (-6)                   /* resource in use (e.g. database held) */
#define TASKMGR_E_INVALID_CONFIG (-7)         /* configuration failed validation */
#define TASKMGR_E_IO (-8)                     /* file system or database I/O failed */
#define TASKMGR_E_DEVICE_UNAVAILABLE (-9)     /* no device can hold the task */
#define TASKMGR_E_MEMORY_LIMIT_EXCEEDED (-10) /* over the per-task memory limit */
#define TASKMGR_E_POOL_EXHAUSTED (-11)        /* no service instance free in time */
#define TASKMGR_E_INVALID_STATE (-12)         /* not allowed in the current state */
#define TASKMGR_E_INCOMPATIBLE (-13)          /* version or schema mismatch */
#define TASKMGR_E_CANCELLED (-14)             /* the operation was cancelled */
#define TASKMGR_E_UNSUPPORTED (-15)           /* not available in this build */
#define TASKMGR_E_UNPERSISTED (-16)           /* close: accepted writes not in the store */
#define TASKMGR_E_INTERNAL (-99)              /* a bug in taskmgr */

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

/* ---- Documents ----------------------------------------------------------- */

/* The pages of a document (an image, a multi-page TIFF or a PDF) before any
 * task is made, e.g. to make one task per page, largest first. Nothing is
 * decoded: images are measured from their headers, PDF pages from their
 * crop box at `dpi` (points * dpi / 72, rounded): the sizes the OCR
 * service's pages will have. Thread-safe.
 *   path      the file (UTF-8)
 *   dpi       resolution PDF pages are measured at, in [72, 1200] (the OCR
 *             service's default is ocr.pdf_dpi, 300)
 *   out_json  receives {"media_type": "application/pdf" | "image/tiff" |
 *             "image/png" | ..., "pages": [{"page": 1, "width": w,
 *             "height": h}, ...]} (pixels); free it with taskmgr_free()
 * Returns TASKMGR_OK, TASKMGR_E_NOT_FOUND (no such file) or
 * TASKMGR_E_INVALID_ARGUMENT (NULL or non-UTF-8 path, NULL out_json, dpi
 * out of range, or a file that is not a readable image or PDF: encrypted,
 * corrupt, no pages); the message names the parameter or the file. */
TASKMGR_API int taskmgr_describe_document(const char* path, int dpi, char** out_json);

/* ---- Enumerations as stable integers ------------------------------------
 * The values follow the C++ enums (taskmgr/task.hpp) and never change;
 * struct layouts carry them as int32_t, never as a C enum. */

/* Task status. */
#define TASKMGR_TASK_PENDING 0
#define TASKMGR_TASK_QUEUED 1
#define TASKMGR_TASK_RUNNING 2
#define TASKMGR_TASK_COMPLETED 3
#define TASKMGR_TASK_FAILED 4
#define TASKMGR_TASK_CANCELLED 5
/* A status word taskmgr does not know, in a table it adopted (the word is the
 * task JSON's "stored_status"; docs/STORAGE.md, "Adopting an existing
 * database"). */
#define TASKMGR_TASK_UNRECOGNIZED 6

/* Failure reason of a failed task. */
#define TASKMGR_REASON_NONE 0
#define TASKMGR_REASON_PROCESSING_ERROR 1
#define TASKMGR_REASON_INVALID_INPUT 2
#define TASKMGR_REASON_TIMEOUT 3
#define TASKMGR_REASON_QUEUE_TIMEOUT 4
#define TASKMGR_REASON_QUEUE_FULL 5
#define TASKMGR_REASON_CANCELLED 6
#define TASKMGR_REASON_MAX_ATTEMPTS_EXCEEDED 7
#define TASKMGR_REASON_SERVICE_UNAVAILABLE 8
#define TASKMGR_REASON_INTERRUPTED 9
#define TASKMGR_REASON_OUT_OF_MEMORY 10
#define TASKMGR_REASON_POOL_EXHAUSTED 11
#define TASKMGR_REASON_DEVICE_UNAVAILABLE 12
#define TASKMGR_REASON_MEMORY_LIMIT_EXCEEDED 13
#define TASKMGR_REASON_HOST_LOST 14

/* Event type. */
#define TASKMGR_EVENT_CREATED 0
#define TASKMGR_EVENT_QUEUED 1
#define TASKMGR_EVENT_STARTED 2
#define TASKMGR_EVENT_COMPLETED 3
#define TASKMGR_EVENT_FAILED 4
#define TASKMGR_EVENT_RETRIED 5
#define TASKMGR_EVENT_CANCELLED 6
#define TASKMGR_EVENT_DEVICE_FALLBACK 7
#define TASKMGR_EVENT_RESOURCE_ACQUIRED 8
#define TASKMGR_EVENT_RESOURCE_RELEASED 9
#define TASKMGR_EVENT_MEMORY_WARNING 10
#define TASKMGR_EVENT_CLEANUP_STARTED 11
#define TASKMGR_EVENT_CLEANUP_COMPLETED 12
#define TASKMGR_EVENT_PRIORITY_CHANGED 13
#define TASKMGR_EVENT_DELETED 14      /* delivered only: never stored */
#define TASKMGR_EVENT_PAUSED 15       /* manager-level (task_id ""), delivered only */
#define TASKMGR_EVENT_RESUMED 16      /* manager-level (task_id ""), delivered only */
#define TASKMGR_EVENT_POOL_RESIZED 17 /* manager-level (task_id ""), delivered only */

/* What a pause covers (taskmgr_pause). */
#define TASKMGR_PAUSE_MANAGER 0 /* every queue; name NULL or "" */
#define TASKMGR_PAUSE_DEVICE 1  /* one device's queue; name: its id ("cpu", "cuda:0") */
#define TASKMGR_PAUSE_SERVICE 2 /* one service kind's tasks on every device; name: the kind */

/* Log level (logging.level in the configuration). */
#define TASKMGR_LOG_TRACE 0
#define TASKMGR_LOG_DEBUG 1
#define TASKMGR_LOG_INFO 2
#define TASKMGR_LOG_WARN 3
#define TASKMGR_LOG_ERROR 4

/* The spec's string of each value ("pending", "out_of_memory",
 * "resource_acquired", "warn"), or "unknown" for a value that is none.
 * Static storage: never freed. */
TASKMGR_API const char* taskmgr_task_status_name(int status);
TASKMGR_API const char* taskmgr_failure_reason_name(int reason);
TASKMGR_API const char* taskmgr_event_name(int event);
TASKMGR_API const char* taskmgr_log_level_name(int level);

/* ---- Opening and closing a manager -------------------------------------- */

/* A task manager: worker threads, device queues, service pools, a store.
 * Opaque; made by taskmgr_open*, destroyed by taskmgr_destroy. */
typedef struct taskmgr_manager taskmgr_manager;

/* Frees the user_data a callback was registered with. */
typedef void (*taskmgr_free_fn)(void* user_data);

/* A log message at `level` (TASKMGR_LOG_*) or above logging.level.
 * Runs on whichever thread logs (the caller's or a library thread), with no
 * library lock held; `message` is valid only during the call. It must not
 * call taskmgr_close or taskmgr_destroy (they fail with
 * TASKMGR_E_INVALID_STATE); any other function may be called. No callback
 * of a manager (log, event, service) runs after taskmgr_close returned,
 * except destroy_instance and free functions during taskmgr_destroy. */
typedef void (*taskmgr_log_fn)(int level, const char* message, void* user_data);

/* An event callback (struct taskmgr_event is below). It runs on the
 * manager's one event thread, never on the thread that caused the event,
 * with no library lock held, in publication order (a task's events in the
 * order they happened). It may call any taskmgr function, taskmgr_subscribe
 * and taskmgr_unsubscribe included (even for itself), except taskmgr_close
 * and taskmgr_destroy (TASKMGR_E_INVALID_STATE) and waits for events it
 * would deliver itself (taskmgr_flush_events returns at once there). A slow
 * callback delays later events, never the tasks. */
struct taskmgr_event;
typedef void (*taskmgr_event_fn)(const struct taskmgr_event* event, void* user_data);

/* Options of taskmgr_open. Initialise with taskmgr_open_options_init, then
 * set the fields you need: fields a caller built against an older header
 * does not have (struct_size) take their defaults. Every struct_size is
 * checked: 0 or smaller than the struct's first version is
 * TASKMGR_E_INVALID_ARGUMENT, larger than this library's struct is
 * TASKMGR_E_INCOMPATIBLE. */
typedef struct taskmgr_open_options {
  size_t struct_size;          /* sizeof(taskmgr_open_options) */
  const char* config_yaml;     /* configuration as YAML text; NULL = none */
  const char* config_path;     /* configuration file (YAML); NULL = none.
                                  Neither set: the defaults. Not both. */
  const char* database_path;   /* overrides storage.path: a SQLite file, or
                                  ":memory:" to keep nothing; NULL = as configured
                                  (default "taskmgr.db" in the working folder).
                                  Clears storage.url. */
  int32_t worker_threads;      /* overrides executor.worker_threads when > 0 */
  int32_t disable_builtin_ocr; /* non-zero: no built-in "ocr" service */
  taskmgr_log_fn log_callback; /* NULL: warnings and errors go to stderr */
  void* log_user_data;         /* passed to log_callback */
  taskmgr_free_fn log_free;    /* NULL, or frees log_user_data once, when the
                                  manager is destroyed; not called when
                                  taskmgr_open fails (the caller keeps it) */
  /* An event callback subscribed before the store is recovered, so that it
   * also receives the events of recovery (tasks queued again, interrupted
   * attempts retried). NULL = none. It runs as taskmgr_subscribe's do and
   * stays subscribed until taskmgr_destroy, which calls event_free (NULL,
   * or frees event_user_data once; not called when taskmgr_open fails). */
  taskmgr_event_fn event_callback;
  void* event_user_data;
  taskmgr_free_fn event_free;
  /* Since 0.4: overrides storage.url: a PostgreSQL connection string
   * (a postgresql:// URL or libpq key=value pairs; a password in it is never
   * shown in messages); the manager then keeps its tasks in PostgreSQL
   * (docs/STORAGE.md). NULL = as configured. Not together with
   * database_path (TASKMGR_E_INVALID_ARGUMENT). */
  const char* database_url;
} taskmgr_open_options;

/* Sets every field to its default and struct_size to the header's size.
 * NULL is a no-op. */
TASKMGR_API void taskmgr_open_options_init(taskmgr_open_options* options);

/* Opens a manager: validates the configuration, opens (and recovers) the
 * store, probes devices, registers the built-in OCR service and starts the
 * threads.
 *   options      NULL = the defaults
 *   out_manager  receives the handle (NULL on failure)
 * Errors: TASKMGR_E_INVALID_ARGUMENT (out_manager NULL, struct_size 0 or too small, both
 * config_yaml and config_path), TASKMGR_E_INVALID_CONFIG (the message names
 * the key path and line, or the missing file), TASKMGR_E_BUSY (the database
 * is held by another manager), TASKMGR_E_INCOMPATIBLE (database from a newer
 * taskmgr), TASKMGR_E_IO. */
TASKMGR_API int taskmgr_open(const taskmgr_open_options* options, taskmgr_manager** out_manager);

/* taskmgr_open with only config_yaml set (NULL or "" = the defaults). */
TASKMGR_API int taskmgr_open_yaml(const char* config_yaml, taskmgr_manager** out_manager);

/* taskmgr_open with only config_path set (path must not be NULL). */
TASKMGR_API int taskmgr_open_file(const char* config_path, taskmgr_manager** out_manager);

/* Stops accepting work: running tasks finish (this call waits for them and
 * for their cleanup), queued tasks stay queued in the store (a durable store
 * resumes them at the next open). Tasks still running after
 * tasks.close_grace_seconds (default 30) are interrupted: the service sees
 * its cancelled flag (a worker process still running 2 s later is killed);
 * one that stops goes back to the queue, its priority kept, and stays queued
 * in the store (event retried, reason interrupted); one that finishes its
 * work completes; an in-process service that never looks at the flag is
 * waited for. Then the services' instances are destroyed
 * (destroy_instance runs on this thread and may still read the manager),
 * pending events are delivered. After it, every call on the handle but
 * taskmgr_close, taskmgr_destroy, taskmgr_unsubscribe, taskmgr_flush_events
 * and the read calls (get, list, metrics, health, events, devices) fails
 * with TASKMGR_E_INVALID_STATE; taskmgr_wait_task returns an ended task and
 * fails with TASKMGR_E_INVALID_STATE for one that stays queued or pending,
 * and so does taskmgr_wait_idle (threads already waiting return too).
 * Then the store is flushed: writes that failed before are tried once more.
 * Closing twice is allowed: the second call only flushes the store again.
 * Errors: TASKMGR_E_INVALID_ARGUMENT (NULL), TASKMGR_E_INVALID_STATE when
 * called from code the library called (an event or log callback, a host
 * service's functions, supports_device): it would wait for itself; nothing
 * is closed. TASKMGR_E_UNPERSISTED: the manager is closed, but writes it
 * accepted are still not in the store (a full disk, a read-only file, a
 * database that refused them); the message (taskmgr_last_error) names how
 * many and the store's own error, and the same is logged as an error. They
 * are lost if the process ends now: make room and call taskmgr_close again
 * (it returns TASKMGR_OK once they are in). */
TASKMGR_API int taskmgr_close(taskmgr_manager* manager);

/* Closes the manager if open, stops its threads, calls the free functions
 * of the log callback and of every remaining subscription and service, and
 * frees the handle. NULL is a no-op (TASKMGR_OK). From a library thread it
 * fails with TASKMGR_E_INVALID_STATE and destroys nothing. When writes
 * the manager accepted are still not in the store, it frees the handle all
 * the same and returns TASKMGR_E_UNPERSISTED (as taskmgr_close: the
 * message says how many and why). Never call it twice on one handle, nor
 * concurrently with another call on it. */
TASKMGR_API int taskmgr_destroy(taskmgr_manager* manager);

/* ---- Tasks ----------------------------------------------------------------
 * Tasks are named by their id: 36 characters (a UUID), NUL-terminated.
 * Every function taking a task id fails with TASKMGR_E_NOT_FOUND for an id
 * the manager does not know, and TASKMGR_E_INVALID_ARGUMENT for NULL or an
 * id that is not valid UTF-8 (no id could be like it). */

#define TASKMGR_TASK_ID_SIZE 37 /* bytes for an id and its NUL */

/* What to run (the spec's TaskCreateRequest). Initialise with
 * taskmgr_task_request_init. The strings and bytes are copied: they need
 * to live only during the call. Strings are UTF-8. */
typedef struct taskmgr_task_request {
  size_t struct_size;     /* sizeof(taskmgr_task_request) */
  const char* service;    /* service kind; NULL = "ocr" */
  const char* input_path; /* an input file; NULL when input_data is used */
  const void* input_data; /* encoded input (e.g. PNG bytes), copied; NULL when input_path is used */
  size_t input_size;      /* bytes at input_data */
  const char* media_type; /* optional hint, e.g. "image/png"; NULL = none */
  int32_t priority;       /* larger runs first; default 0 */
  int32_t batch_size;     /* pages held and processed at once; 0 = 1 */
  const char* device;     /* requested device ("cpu", "cuda:0"); NULL = any */
  const char* options_json; /* service options, a JSON object; NULL = none.
                               Strict JSON: UTF-8, no NaN/Infinity, every
                               number finite (1e99999 is refused) */
  int32_t start;            /* non-zero: queue at once (create + start in one
                               step); 0 = pending until taskmgr_start_task. A
                               struct_size that ends before it (an older
                               header) reads as 0 */
} taskmgr_task_request;

TASKMGR_API void taskmgr_task_request_init(taskmgr_task_request* request);

/* The spec's create_task: estimates the task's memory, selects its device
 * and stores it (durably, with a durable store) as "pending" or, with
 * `start`, already "queued" (one commit for both; events "created" then
 * "queued").
 *   out_task_id  receives the new id (TASKMGR_TASK_ID_SIZE bytes)
 * Errors: TASKMGR_E_INVALID_ARGUMENT (NULL, both input_path and input_data,
 * neither for a service that needs an input (the built-in "ocr", and a
 * host service without taskmgr_service.input_optional), batch_size < 0, a
 * string that is not valid UTF-8, options that are not a strict JSON
 * object, an input_path with a NUL or one that exists and is not a regular
 * file: a FIFO, a device, a socket, a directory, a file of /proc or /sys,
 * found without opening it), TASKMGR_E_NOT_FOUND (no such service, or an unknown
 * requested device), TASKMGR_E_DEVICE_UNAVAILABLE / TASKMGR_E_MEMORY_LIMIT_EXCEEDED (no device can
 * hold the estimate; the message gives the numbers), TASKMGR_E_QUEUE_FULL (with `start` only:
 * tasks.max_queue_size reached; the task was not created),
 * TASKMGR_E_INVALID_STATE (closed), TASKMGR_E_IO (the store failed: nothing
 * was kept). */
TASKMGR_API int taskmgr_create_task(taskmgr_manager* manager, const taskmgr_task_request* request,
                                    char out_task_id[TASKMGR_TASK_ID_SIZE]);

/* Many tasks in one step (bulk submission): each as taskmgr_create_task
 * would make it, all stored in one commit, all or none. Requests with
 * `start` are queued; if the queue cannot take all of them, none is created.
 *   requests      an array of `count` requests. It is strided by
 *                 requests[0].struct_size, and every element must carry that
 *                 same struct_size: an array of taskmgr_task_request, each
 *                 initialised with taskmgr_task_request_init, is right
 *   count         0: nothing to do, TASKMGR_OK (requests and out_task_ids
 *                 may then be NULL)
 *   out_task_ids  receives the `count` new ids, in request order
 * On failure no task was created and out_task_ids is left untouched; with
 * more than one request, the message names the failing one by its index
 * ("request 3: ...; no task was created").
 * Errors: those of taskmgr_create_task, TASKMGR_E_QUEUE_FULL when the
 * requests with `start` do not all fit in tasks.max_queue_size, and
 * TASKMGR_E_INVALID_ARGUMENT for an element whose struct_size differs from
 * requests[0].struct_size. */
TASKMGR_API int taskmgr_create_tasks(taskmgr_manager* manager, const taskmgr_task_request* requests,
                                     size_t count, char (*out_task_ids)[TASKMGR_TASK_ID_SIZE]);

/* What may change when a task starts (the spec's TaskStartRequest).
 * Initialise with taskmgr_start_params_init: it keeps everything. */
typedef struct taskmgr_start_params {
  size_t struct_size;   /* sizeof(taskmgr_start_params) */
  const char* device;   /* NULL = the device chosen at creation */
  int32_t set_priority; /* non-zero: use `priority` */
  int32_t priority;
  int32_t batch_size;       /* 0 = as created */
  const char* options_json; /* NULL = as created */
} taskmgr_start_params;

TASKMGR_API void taskmgr_start_params_init(taskmgr_start_params* params);

/* Queues a pending task on its device (params NULL = keep everything).
 * Errors: TASKMGR_E_QUEUE_FULL (tasks.max_queue_size: the task stays
 * pending and may be started later), TASKMGR_E_INVALID_STATE (the task is
 * not pending, or the manager is closed), TASKMGR_E_NOT_FOUND,
 * TASKMGR_E_INVALID_ARGUMENT, TASKMGR_E_DEVICE_UNAVAILABLE. */
TASKMGR_API int taskmgr_start_task(taskmgr_manager* manager, const char* task_id,
                                   const taskmgr_start_params* params);

/* Cancels a pending, queued or running task (a running one stops when its
 * service next checks; it still gets its cleanup). A task this cancels ends
 * cancelled, even if its service then finishes the work (its result is
 * dropped).
 *   out_cancelled  NULL, or receives 1 when the task was cancelled, 0 when
 *                  it had already ended
 * Errors: TASKMGR_E_NOT_FOUND, TASKMGR_E_INVALID_ARGUMENT,
 * TASKMGR_E_INVALID_STATE (closed). */
TASKMGR_API int taskmgr_cancel_task(taskmgr_manager* manager, const char* task_id,
                                    int* out_cancelled);

/* Runs a failed or cancelled task again: a new attempt of the same task
 * (its events kept, the attempt counter going on), queued with `params`
 * where they give something (NULL = keep everything; placed again when the
 * device or batch size changes). Events "retried" (reason "host") and
 * "queued" record it.
 * Errors: TASKMGR_E_NOT_FOUND, TASKMGR_E_INVALID_STATE (not failed or
 * cancelled, its cleanup not done, or the manager is closed),
 * TASKMGR_E_QUEUE_FULL (it stays as it was), TASKMGR_E_INVALID_ARGUMENT,
 * TASKMGR_E_DEVICE_UNAVAILABLE. */
TASKMGR_API int taskmgr_retry_task(taskmgr_manager* manager, const char* task_id,
                                   const taskmgr_start_params* params);

/* Changes a waiting task's priority: a pending one starts with it, a queued
 * one moves to its place in its device's queue (among equals by when it was
 * queued), one waiting for a retry is queued with it. A "priority_changed"
 * event records a change (none when the priority is the one it has).
 * Errors: TASKMGR_E_NOT_FOUND, TASKMGR_E_INVALID_STATE (it runs, is
 * finishing an attempt, or has ended; or the manager is closed),
 * TASKMGR_E_INVALID_ARGUMENT. */
TASKMGR_API int taskmgr_set_task_priority(taskmgr_manager* manager, const char* task_id,
                                          int32_t priority);

/* Deletes an ended task (completed, failed or cancelled, its cleanup done)
 * with its events, metric samples and input bytes, in the store and in
 * memory; subscribers get a "deleted" event (delivered, not stored).
 * Errors: TASKMGR_E_NOT_FOUND (unknown, or deleted already),
 * TASKMGR_E_INVALID_STATE (not ended yet: cancel it and wait for it; its
 * cleanup did not complete; its final state is not stored yet; a row of an
 * adopted table taskmgr did not run; or the manager is closed),
 * TASKMGR_E_INVALID_ARGUMENT, TASKMGR_E_IO (the store cannot write the
 * delete now: nothing was deleted), TASKMGR_E_UNSUPPORTED (a store that
 * cannot delete). */
TASKMGR_API int taskmgr_delete_task(taskmgr_manager* manager, const char* task_id);

/* Pauses the manager, a device's queue or a service kind (scope: a
 * TASKMGR_PAUSE_* constant; name: the device id or kind, NULL or "" for the
 * manager; a kind need not be registered). A queued task a pause holds does
 * not start: running tasks finish, new tasks are accepted and queued, and
 * its queue timeout does not run (the paused time is not counted when the
 * pause ends). The pause is recorded in the store before this returns and
 * holds again when a manager opens on that store. Subscribers get a
 * "paused" event with task_id "". *out_changed (may be NULL): 1, or 0 when
 * that pause was in force already (nothing changed).
 * Errors: TASKMGR_E_INVALID_ARGUMENT (an unknown scope, a name for the
 * manager, a kind that is not 1..100 bytes of UTF-8 without control
 * characters), TASKMGR_E_NOT_FOUND (an unknown device),
 * TASKMGR_E_INVALID_STATE (closed), TASKMGR_E_IO (the store cannot record
 * it) or TASKMGR_E_BUSY (another process holds the store locked past its
 * busy timeout; in both cases nothing changed), TASKMGR_E_UNSUPPORTED (a
 * store that cannot). One pause or resume records at a time: others wait
 * for it, while a call that changes nothing answers at once. */
TASKMGR_API int taskmgr_pause(taskmgr_manager* manager, int scope, const char* name,
                              int* out_changed);
/* Ends a pause; the tasks it held start in queue order unless another pause
 * holds them. A "resumed" event (task_id ""). *out_changed: 0 when that
 * pause was not in force. The same errors as taskmgr_pause (a device that is
 * gone may be resumed). */
TASKMGR_API int taskmgr_resume(taskmgr_manager* manager, int scope, const char* name,
                               int* out_changed);
/* The pauses in force as a JSON array of {"scope","name","since"} objects
 * ("since": RFC 3339 UTC), in (scope, name) order. *out_json: free with
 * taskmgr_free. */
TASKMGR_API int taskmgr_paused(taskmgr_manager* manager, char** out_json);

/* Sizes a service kind's pool on a device while the manager runs, until it
 * closes: at most max_instances of its tasks run there at once, and
 * min_instances instances are kept warm (made in the background: this call
 * does not wait for them). A smaller max destroys idle instances at once and
 * running ones as their tasks finish: no running task is stopped, and none
 * starts there while max or more run. A "pool_resized" event (task_id "").
 * *out_previous_min and *out_previous_max (each may be NULL): the sizes it
 * replaced (set to 0 when the call fails). A resize to the sizes in force
 * changes nothing and sends no event. Errors: TASKMGR_E_NOT_FOUND (a kind not registered, an
 * unknown device), TASKMGR_E_INVALID_ARGUMENT (NULL or non-UTF-8 names, a device the kind does not
 * run on, sizes outside 0 <= min <= max, 1 <= max <= 4096), TASKMGR_E_INVALID_STATE (closed). */
TASKMGR_API int taskmgr_resize_pool(taskmgr_manager* manager, const char* service,
                                    const char* device, int min_instances, int max_instances,
                                    int* out_previous_min, int* out_previous_max);

/* The task as a JSON object with every spec field (id, service, input,
 * options, priority, status, attempt, batch_size, failure_reason,
 * failure_message, timestamps, result, estimated_memory_mb,
 * actual_memory_mb, assigned_device, service_instance_id,
 * resource_cleanup_completed). *out_json: free with taskmgr_free. */
TASKMGR_API int taskmgr_get_task(taskmgr_manager* manager, const char* task_id, char** out_json);

/* A task's state without JSON. Each out pointer may be NULL.
 *   out_status          TASKMGR_TASK_*
 *   out_failure_reason  TASKMGR_REASON_* (NONE unless failed or cancelled) */
TASKMGR_API int taskmgr_get_task_status(taskmgr_manager* manager, const char* task_id,
                                        int* out_status, int* out_failure_reason);

/* The task's result document as the service wrote it (for "ocr": JSON with
 * "text", "mean_confidence" and "pages"; each page with its "width",
 * "height" and every box in the source image's pixels, "dpi" (the
 * source's) and "dpi_source" ("file", "estimated" or "assumed"),
 * "preprocess" ({"scale", "rotated", "deskew_degrees"}: what was done to the
 * page before recognition), "text", "words", "orientation": docs/OCR.md,
 * "Results"); "" until it completed.
 * *out_result: free with taskmgr_free. */
TASKMGR_API int taskmgr_get_task_result(taskmgr_manager* manager, const char* task_id,
                                        char** out_result);

/* Waits until the task has ended and its cleanup is done.
 *   timeout_seconds  < 0 waits without limit; NaN is TASKMGR_E_INVALID_ARGUMENT
 *   out_json         NULL, or receives the ended task as taskmgr_get_task
 * Errors: TASKMGR_E_TIMEOUT (still running; *out_json is NULL),
 * TASKMGR_E_NOT_FOUND, TASKMGR_E_INVALID_ARGUMENT, TASKMGR_E_INVALID_STATE
 * (the manager was closed and the task stays queued or pending). Do not
 * wait from an event callback for a task whose events that callback would
 * deliver. */
TASKMGR_API int taskmgr_wait_task(taskmgr_manager* manager, const char* task_id,
                                  double timeout_seconds, char** out_json);

/* Waits until no task is queued, backing off or running.
 * TASKMGR_E_TIMEOUT when the timeout passes first (< 0: no limit),
 * TASKMGR_E_INVALID_STATE when the manager is closed with tasks queued,
 * TASKMGR_E_INVALID_ARGUMENT when timeout_seconds is NaN. */
TASKMGR_API int taskmgr_wait_idle(taskmgr_manager* manager, double timeout_seconds);

/* Tasks as a JSON array of task objects, oldest first.
 *   status   NULL = any, else a status name ("completed", ...)
 *   service  NULL or "" = any
 *   limit    0 = all, else the newest `limit`
 * TASKMGR_E_INVALID_ARGUMENT for an unknown status name. */
TASKMGR_API int taskmgr_list_tasks(taskmgr_manager* manager, const char* status,
                                   const char* service, size_t limit, char** out_json);

/* One page of tasks, newest first, for paging back through many of them.
 * Initialise with taskmgr_list_params_init (any status and service, pages
 * of 100, from the newest, no results). */
typedef struct taskmgr_list_params {
  size_t struct_size;   /* sizeof(taskmgr_list_params) */
  const char* status;   /* NULL = any, else a status name */
  const char* service;  /* NULL or "" = any */
  size_t limit;         /* tasks per page, 1..10000 (0 = 100) */
  const char* before;   /* NULL or "" = from the newest; else the cursor of
                           the previous page (*out_next_cursor) */
  int32_t with_results; /* non-zero: each task's result too (never its
                           input bytes: "input.bytes" says how many) */
} taskmgr_list_params;

TASKMGR_API void taskmgr_list_params_init(taskmgr_list_params* params);

/* *out_json: a JSON array of task objects, newest first (params NULL = the
 * defaults). *out_next_cursor (may be NULL to not ask): the cursor to pass
 * as `before` for the next page, or NULL when this page is the last (it has
 * fewer than `limit` tasks); free with taskmgr_free. A task created while
 * paging is not on a later page (pages go back in time).
 * Errors: TASKMGR_E_INVALID_ARGUMENT (an unknown status, a limit over
 * 10000, a `before` that is not a cursor). */
TASKMGR_API int taskmgr_list_tasks_page(taskmgr_manager* manager, const taskmgr_list_params* params,
                                        char** out_json, char** out_next_cursor);

/* The events stored for a task, a JSON array of event objects with the
 * keys of the delivered ones ({"sequence","task_id","event_type",
 * "timestamp","details"}), in order. Their "sequence" is the store's order,
 * which orders a task's events as the delivered sequence does (across
 * tasks the two may differ when tasks are created from several threads). */
TASKMGR_API int taskmgr_get_task_events(taskmgr_manager* manager, const char* task_id,
                                        char** out_json);

/* ---- Metrics and health ------------------------------------------------- */

/* The spec's get_task_metrics as JSON: active_tasks, queued_tasks,
 * memory_by_device, pool_utilization, average_wait_time, counters and
 * latency summaries (the same keys as TaskMetrics::to_json). */
TASKMGR_API int taskmgr_get_task_metrics(taskmgr_manager* manager, char** out_json);

/* The same metrics in the Prometheus text format (version 0.0.4). */
TASKMGR_API int taskmgr_get_metrics_prometheus(taskmgr_manager* manager, char** out_text);

/* The spec's get_task_health as JSON: status, memory_usage_mb,
 * processing_time_s, device, warnings. */
TASKMGR_API int taskmgr_get_task_health(taskmgr_manager* manager, const char* task_id,
                                        char** out_json);

/* The cluster of a shared queue (storage.shared: docs/SCALING.md) as JSON:
 * {"host_id" (this host), "queued" (waiting for any host to claim them),
 * "pending", "hosts": [{"id", "host_name", "pid", "started_at",
 * "heartbeat_at", "lease_seconds", "closed_at" (null while open), "state"
 * ("alive", "lost": no heartbeat for longer than its lease, or "closed"),
 * "lost", "claimed", "running", "report" (what the host reported at its last
 * heartbeat: "host_name", "devices" (id, total_mb, free_mb, available),
 * "running", "queued", "workers", "lost_claims", "rescued")}]}, read from
 * the shared tables. *out_json: free with taskmgr_free.
 * Errors: TASKMGR_E_UNSUPPORTED (the store is not shared), TASKMGR_E_IO
 * (the database cannot be read), TASKMGR_E_INVALID_STATE (closed). */
TASKMGR_API int taskmgr_cluster(taskmgr_manager* manager, char** out_json);

/* ---- Devices --------------------------------------------------------------- */

/* The devices as a JSON array: id, kind, total_mb, reserved_mb,
 * observed_mb, free_mb, available, source, note (why a probe made it
 * unavailable, e.g. a GPU in MIG mode or one NVML no longer reports; ""). */
TASKMGR_API int taskmgr_list_devices(taskmgr_manager* manager, char** out_json);

/* Marks a device unavailable (0) or available again (non-zero). An
 * unavailable device gets no new task; its queued tasks move to a device
 * that can hold them (event device_fallback) or fail DEVICE_UNAVAILABLE.
 * TASKMGR_E_NOT_FOUND for an unknown device. */
TASKMGR_API int taskmgr_set_device_available(taskmgr_manager* manager, const char* device,
                                             int available);

/* ---- Events ------------------------------------------------------------------ */

/* One event, as passed to a callback. Every pointer in it is valid only
 * during the callback: copy what you keep. */
typedef struct taskmgr_event {
  size_t struct_size;       /* sizeof(taskmgr_event) of the library */
  uint64_t sequence;        /* publication order, from 1 */
  const char* task_id;      /* "" for a manager-level event (paused, resumed) */
  int32_t event;            /* TASKMGR_EVENT_* */
  const char* event_type;   /* its name: "created", "resource_acquired", ... */
  int64_t timestamp_ms;     /* milliseconds since 1970-01-01 UTC */
  const char* timestamp;    /* the same, RFC 3339 ("2026-11-28T01:02:03.456Z") */
  const char* details_json; /* a JSON object; keys depend on the event */
  const char* json;         /* the whole event as JSON (as in taskmgr_get_task_events) */
} taskmgr_event;

/* taskmgr_event_fn, the event callback, is declared above taskmgr_open
 * (taskmgr_open_options can subscribe one before recovery). */

/* Subscribes a callback to every event of every task.
 *   free_user_data  NULL, or called once with user_data when the callback
 *                   will never run again: by taskmgr_unsubscribe (after the
 *                   callback returns, when it unsubscribes itself) or by
 *                   taskmgr_destroy
 *   out_subscription  receives the subscription's id (never 0)
 * On failure free_user_data is not called: the caller still owns
 * user_data. */
TASKMGR_API int taskmgr_subscribe(taskmgr_manager* manager, taskmgr_event_fn callback,
                                  void* user_data, taskmgr_free_fn free_user_data,
                                  uint64_t* out_subscription);

/* Ends a subscription. Outside a callback, it returns when the callback is
 * not running and will not run again. From inside a callback it returns at
 * once and the callback gets no further event. TASKMGR_E_NOT_FOUND for an
 * unknown (or already ended) subscription. */
TASKMGR_API int taskmgr_unsubscribe(taskmgr_manager* manager, uint64_t subscription);

/* Waits until every event published so far has been delivered to the
 * callbacks (returns at once from inside a callback). */
TASKMGR_API int taskmgr_flush_events(taskmgr_manager* manager);

/* ---- Host-provided services ---------------------------------------------------
 * A host brings its own work (a GPU model, a parser) as a service kind and
 * gets the library's placement, pooling, OOM recovery and cleanup for it.
 * An instance is one warm engine on one device: created once, reused for
 * task after task, never used by two threads at once. */

/* What a service's process function sees of its task. Valid only during
 * process(), and only on the thread that runs it. */
typedef struct taskmgr_task_context taskmgr_task_context;

/* A service kind, described by its functions. The library copies the
 * struct; user_data lives until free_user_data is called. The functions
 * run with no library lock held, and may call any function of this header
 * but taskmgr_close and taskmgr_destroy: create_instance, process and
 * destroy_instance on worker threads (create_instance also on a pool's
 * warming thread; destroy_instance also on the thread of taskmgr_close, or
 * of taskmgr_resize_pool for the idle instances a smaller max retires, with
 * no lock held); supports_device on the thread that
 * places a task (create, start, set_device_available, a worker deciding a
 * retry) and once per device at registration. The kind is 1 to 100 bytes
 * of UTF-8 without control characters.
 *
 * process() returns TASKMGR_OK, or the failure of the task:
 *   TASKMGR_E_OUT_OF_MEMORY          out of memory: retried per tasks.retry
 *                                    (a GPU task moves to the CPU when
 *                                    tasks.retry.cpu_fallback is on, else
 *                                    its batch size shrinks); the instance
 *                                    is destroyed and replaced
 *   TASKMGR_E_INVALID_ARGUMENT       the input is bad: INVALID_INPUT, not retried
 *   TASKMGR_E_TIMEOUT                TIMEOUT, not retried
 *   TASKMGR_E_CANCELLED              the task ends cancelled (status and
 *                                    reason), not retried
 *   TASKMGR_E_MEMORY_LIMIT_EXCEEDED  MEMORY_LIMIT_EXCEEDED, not retried
 *                                    (a limit, not out of memory)
 *   any other value                  PROCESSING_ERROR, not retried
 * with the message given to taskmgr_context_set_error (default: the status
 * name). */
typedef struct taskmgr_service {
  size_t struct_size; /* sizeof(taskmgr_service) */
  const char* kind;   /* the service's name, used in task requests; copied */
  void* user_data;    /* passed to every function below */

  /* Creates an instance on `device` ("cpu", "cuda:0"); may be slow (loads
   * a model). Returns TASKMGR_OK with *out_instance set, or a failure
   * status: the task that needed it fails with a message naming the
   * status. Required. */
  int (*create_instance)(void* user_data, const char* device, void** out_instance);
  /* Processes one task on an instance. Required. */
  int (*process)(void* user_data, void* instance, taskmgr_task_context* context);
  /* Destroys an instance (when the manager closes, or after a failure that
   * may have broken it). Optional. */
  void (*destroy_instance)(void* user_data, void* instance);
  /* Returns non-zero when the service can run on the device (kind is "cpu"
   * or "gpu"). Optional: all devices. */
  int (*supports_device)(void* user_data, const char* device, const char* kind);
  /* Frees user_data, once, when the manager that holds the service is
   * destroyed. Not called when taskmgr_register_service fails (a duplicate
   * kind, a bad field, a closed manager): the caller keeps user_data,
   * which a live registration may share. Optional. */
  taskmgr_free_fn free_user_data;

  /* Memory model, MB: base + batch * (per_page + per_mpixel * megapixels +
   * per_input_mb * input MB per page), learned from measured actuals. All 0
   * = the library's default coefficients. */
  double memory_base_mb;
  double memory_per_page_mb;
  double memory_per_mpixel_mb;
  double memory_per_input_mb;

  /* Since 0.4: non-zero when the service's tasks may have no input at all
   * (neither input_path nor input_data). 0, the default: a request with no
   * input is refused by taskmgr_create_task/_tasks with
   * TASKMGR_E_INVALID_ARGUMENT, instead of failing later. */
  int32_t input_optional;
} taskmgr_service;

TASKMGR_API void taskmgr_service_init(taskmgr_service* service);

/* Registers a service kind; pools.* settings apply to it as to "ocr".
 * Errors: TASKMGR_E_INVALID_ARGUMENT (NULL, no kind, a kind that is not 1
 * to 100 bytes of UTF-8 without control characters, no create_instance or
 * process), TASKMGR_E_INVALID_STATE (the kind is registered already, or the
 * manager is closed). */
TASKMGR_API int taskmgr_register_service(taskmgr_manager* manager, const taskmgr_service* service);

/* The task being processed. Strings are borrowed for the duration of
 * process(). */
TASKMGR_API const char* taskmgr_context_task_id(const taskmgr_task_context* context);
TASKMGR_API const char* taskmgr_context_device(const taskmgr_task_context* context);
TASKMGR_API const char* taskmgr_context_service_instance_id(const taskmgr_task_context* context);
/* "" when the task has no options. */
TASKMGR_API const char* taskmgr_context_options_json(const taskmgr_task_context* context);
/* NULL when the input is bytes or absent. */
TASKMGR_API const char* taskmgr_context_input_path(const taskmgr_task_context* context);
/* The input bytes (*out_data NULL and *out_size 0 when the input is a path). */
TASKMGR_API int taskmgr_context_input_data(const taskmgr_task_context* context,
                                           const void** out_data, size_t* out_size);
/* Shrinks after an out-of-memory retry. */
TASKMGR_API int taskmgr_context_batch_size(const taskmgr_task_context* context);
/* 1 for the first run. */
TASKMGR_API int taskmgr_context_attempt(const taskmgr_task_context* context);
TASKMGR_API int64_t taskmgr_context_estimated_memory_mb(const taskmgr_task_context* context);
/* Non-zero once the host cancelled the task: return TASKMGR_E_CANCELLED. */
TASKMGR_API int taskmgr_context_cancelled(const taskmgr_task_context* context);
/* Seconds left before the attempt's deadline (tasks.task_timeout_seconds or
 * the task's "timeout_seconds" option); a huge value (HUGE_VAL) when there is
 * none, 0 once it passed: then return TASKMGR_E_TIMEOUT. An attempt still
 * running at its deadline ends TIMEOUT whatever process() returns. */
TASKMGR_API double taskmgr_context_seconds_left(const taskmgr_task_context* context);
/* A directory private to the task, removed with its content when the
 * task's cleanup runs. NULL (and the last error set) when it cannot be made. */
TASKMGR_API const char* taskmgr_context_temp_dir(taskmgr_task_context* context);
/* Starts a processing stage ("load", "infer", ...): a task_metrics sample.
 * A name that is not UTF-8 is TASKMGR_E_INVALID_ARGUMENT. */
TASKMGR_API int taskmgr_context_stage(taskmgr_task_context* context, const char* name);
/* Reports memory the task uses now, in MB; the peak becomes the task's
 * actual_memory_mb and teaches the estimator. Returns
 * TASKMGR_E_MEMORY_LIMIT_EXCEEDED past tasks.max_task_memory_mb (the task
 * then fails MEMORY_LIMIT_EXCEEDED, not retried) or TASKMGR_E_OUT_OF_MEMORY
 * past the device's total (retried as out of memory), whatever process()
 * returns. */
TASKMGR_API int taskmgr_context_report_memory(taskmgr_task_context* context, int64_t mb);
/* Sets the result document (copied): strict JSON in UTF-8 with finite
 * numbers, so that every reader can parse it back. Anything else is
 * TASKMGR_E_INVALID_ARGUMENT, whose message names the byte ("not valid
 * UTF-8 (byte 6)", "not valid JSON (byte 5: ...)") or the number ("a number
 * out of range (not finite) at /a/0"); the result set before stays. */
TASKMGR_API int taskmgr_context_set_result(taskmgr_task_context* context, const char* result_json);
/* Sets the failure message used when process() returns a failure. A
 * message that is not UTF-8 is TASKMGR_E_INVALID_ARGUMENT (naming the byte). */
TASKMGR_API int taskmgr_context_set_error(taskmgr_task_context* context, const char* message);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* TASKMGR_H */
