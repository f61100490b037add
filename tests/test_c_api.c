/* The C ABI from plain C (C99), linked against the shared library.
 * Every check prints what failed and the test exits non-zero. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "strict_json.h"
#include "taskmgr.h"

static int failures = 0;
static int checks = 0;

/* A CHECK in a table-driven test: names the row and what was seen. */
#define CHECK_ROW(cond, row, seen)                                                            \
  do {                                                                                        \
    ++checks;                                                                                 \
    if (!(cond)) {                                                                            \
      ++failures;                                                                             \
      fprintf(stderr, "%s:%d: CHECK failed for row %d: %s\n  seen: %s\n", __FILE__, __LINE__, \
              (int)(row), #cond, (seen) ? (seen) : "(null)");                                 \
    }                                                                                         \
  } while (0)

#define CHECK(cond)                                                            \
  do {                                                                         \
    ++checks;                                                                  \
    if (!(cond)) {                                                             \
      ++failures;                                                              \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                          \
  } while (0)

static void test_version(void) {
  CHECK(taskmgr_version_number() == TASKMGR_VERSION_NUMBER);
  CHECK(strcmp(taskmgr_version_string(), TASKMGR_VERSION_STRING) == 0);
  CHECK(TASKMGR_VERSION_NUMBER ==
        TASKMGR_VERSION_MAJOR * 10000 + TASKMGR_VERSION_MINOR * 100 + TASKMGR_VERSION_PATCH);
}

static void test_status_names(void) {
  CHECK(strcmp(taskmgr_status_name(TASKMGR_OK), "ok") == 0);
  CHECK(strcmp(taskmgr_status_name(TASKMGR_E_INVALID_ARGUMENT), "invalid_argument") == 0);
  CHECK(strcmp(taskmgr_status_name(TASKMGR_E_QUEUE_FULL), "queue_full") == 0);
  CHECK(strcmp(taskmgr_status_name(TASKMGR_E_INVALID_CONFIG), "invalid_config") == 0);
  CHECK(strcmp(taskmgr_status_name(TASKMGR_E_POOL_EXHAUSTED), "pool_exhausted") == 0);
  CHECK(strcmp(taskmgr_status_name(TASKMGR_E_INTERNAL), "internal") == 0);
  CHECK(strcmp(taskmgr_status_name(12345), "unknown") == 0);
}

static void test_config_defaults(void) {
  char* yaml = NULL;
  CHECK(taskmgr_config_normalize(NULL, &yaml) == TASKMGR_OK);
  CHECK(yaml != NULL);
  CHECK(strcmp(taskmgr_last_error(), "") == 0);
  if (yaml != NULL) {
    CHECK(strstr(yaml, "max_queue_size: 100") != NULL);
    CHECK(strstr(yaml, "memory_reduction_factor: 0.5") != NULL);
  }
  taskmgr_free(yaml);
}

static void test_config_values(void) {
  char* yaml = NULL;
  CHECK(taskmgr_config_normalize("tasks:\n  max_queue_size: 17\n", &yaml) == TASKMGR_OK);
  CHECK(yaml != NULL && strstr(yaml, "max_queue_size: 17") != NULL);
  taskmgr_free(yaml);
}

static void test_config_errors(void) {
  char* yaml = (char*)0x1; /* must be reset to NULL on failure */
  int rc = taskmgr_config_normalize("tasks:\n  retry:\n    memory_reduction_factor: 2\n", &yaml);
  CHECK(rc == TASKMGR_E_INVALID_CONFIG);
  CHECK(yaml == NULL);
  CHECK(strstr(taskmgr_last_error(), "tasks.retry.memory_reduction_factor") != NULL);
  CHECK(strstr(taskmgr_last_error(), ":3") != NULL);

  /* A successful call clears the last error. */
  CHECK(taskmgr_config_normalize(NULL, &yaml) == TASKMGR_OK);
  CHECK(strcmp(taskmgr_last_error(), "") == 0);
  taskmgr_free(yaml);

  CHECK(taskmgr_config_normalize(NULL, NULL) == TASKMGR_E_INVALID_ARGUMENT);
  CHECK(strstr(taskmgr_last_error(), "out_yaml") != NULL);

  yaml = NULL;
  CHECK(taskmgr_config_normalize_file(NULL, &yaml) == TASKMGR_E_INVALID_ARGUMENT);
  CHECK(strstr(taskmgr_last_error(), "path") != NULL);
  CHECK(taskmgr_config_normalize_file("/no/such/taskmgr.yaml", &yaml) == TASKMGR_E_INVALID_CONFIG);
  CHECK(strstr(taskmgr_last_error(), "/no/such/taskmgr.yaml") != NULL);
  CHECK(yaml == NULL);

  CHECK(taskmgr_config_normalize("unknown_section: 1\n", &yaml) == TASKMGR_E_INVALID_CONFIG);
  CHECK(strstr(taskmgr_last_error(), "unknown_section") != NULL);
}

static void test_free_null(void) {
  taskmgr_free(NULL);
  CHECK(1);
}

/* ---- shared state for callbacks (guarded: callbacks run on library threads) -- */

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

#define CHECK_RC(call, expected)                                                                  \
  do {                                                                                            \
    int rc_ = (call);                                                                             \
    ++checks;                                                                                     \
    if (rc_ != (expected)) {                                                                      \
      ++failures;                                                                                 \
      fprintf(stderr, "%s:%d: %s returned %d (%s), expected %s: %s\n", __FILE__, __LINE__, #call, \
              rc_, taskmgr_status_name(rc_), #expected, taskmgr_last_error());                    \
    }                                                                                             \
  } while (0)

/* The last error names `what` (a function, a parameter, a value). */
/* The last error names `what`, and is UTF-8 like every string out. */
#define CHECK_MSG(what)                                                               \
  do {                                                                                \
    CHECK(strstr(taskmgr_last_error(), (what)) != NULL);                              \
    CHECK(strict_utf8_error(taskmgr_last_error(), strlen(taskmgr_last_error())) < 0); \
  } while (0)

/* Every string the C ABI hands out goes back through taskmgr_free: each is
 * checked on its way, valid UTF-8 always, and strict JSON when it is a JSON
 * document (it starts with '{' or '['; YAML and Prometheus text are not). */
static int strings_checked = 0, json_checked = 0, bad_strings = 0; /* under check_mu */
static pthread_mutex_t check_mu = PTHREAD_MUTEX_INITIALIZER;       /* callbacks free strings too */

static void check_and_free(void* p) {
  if (p != NULL) {
    const char* s = (const char*)p;
    size_t n = strlen(s);
    long bad = strict_utf8_error(s, n);
    long bad_json = -1;
    int is_json = s[0] == '{' || s[0] == '[';
    if (is_json && bad < 0) bad_json = strict_json_error(s, n);
    if (bad >= 0) fprintf(stderr, "a returned string is not UTF-8 at byte %ld: %.200s\n", bad, s);
    if (bad_json >= 0) {
      fprintf(stderr, "a returned JSON document is not strict JSON at byte %ld: %.300s\n", bad_json,
              s);
    }
    pthread_mutex_lock(&check_mu);
    ++strings_checked;
    json_checked += is_json;
    bad_strings += (bad >= 0 || bad_json >= 0) ? 1 : 0;
    pthread_mutex_unlock(&check_mu);
  }
  taskmgr_free(p);
}
#define taskmgr_free check_and_free

static const char* kConfig =
    "devices:\n"
    "  probe_cpu: false\n"
    "  probe_nvidia: false\n"
    "  cpu_memory_mb: 4000\n"
    "  declared:\n"
    "    - {id: \"cuda:0\", kind: gpu, memory_mb: 2000}\n"
    "executor:\n"
    "  worker_threads: 2\n"
    "storage:\n"
    "  path: \":memory:\"\n"
    "tasks:\n"
    "  retry:\n"
    "    backoff_base_seconds: 0.01\n"
    "    backoff_jitter: 0\n";

/* ---- a host-provided service: "echo" -----------------------------------------
 * Instances count themselves; process() copies the input into the result,
 * fails as the options say, and blocks while the gate is closed. */

typedef struct service_state {
  int instances_created;
  int instances_destroyed;
  int processed;
  int freed;
  int gate_closed; /* process() waits while non-zero */
  int running;     /* process() calls in progress */
  int oom_on_gpu;  /* return OUT_OF_MEMORY on "cuda:*" */
  char last_device[32];
  int last_attempt;
  int last_batch;
  char temp_dir[512];
  char instance_id[64];
  long long estimate_mb;
  pthread_cond_t cv;
} service_state;

static service_state echo;

static int echo_create(void* user_data, const char* device, void** out_instance) {
  service_state* st = (service_state*)user_data;
  int* instance = (int*)malloc(sizeof(int));
  if (instance == NULL) return TASKMGR_E_OUT_OF_MEMORY;
  pthread_mutex_lock(&mu);
  *instance = ++st->instances_created;
  pthread_mutex_unlock(&mu);
  (void)device;
  *out_instance = instance;
  return TASKMGR_OK;
}

static void echo_destroy(void* user_data, void* instance) {
  service_state* st = (service_state*)user_data;
  pthread_mutex_lock(&mu);
  ++st->instances_destroyed;
  pthread_mutex_unlock(&mu);
  free(instance);
}

static void echo_free(void* user_data) {
  service_state* st = (service_state*)user_data;
  pthread_mutex_lock(&mu);
  ++st->freed;
  pthread_mutex_unlock(&mu);
}

static void sleep_ms(int ms) {
  struct timespec ts;
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = (long)(ms % 1000) * 1000000L;
  nanosleep(&ts, NULL);
}

static int echo_process(void* user_data, void* instance, taskmgr_task_context* ctx) {
  service_state* st = (service_state*)user_data;
  const char* options = taskmgr_context_options_json(ctx);
  const char* device = taskmgr_context_device(ctx);
  const char* path = taskmgr_context_input_path(ctx);
  const void* data = NULL;
  size_t size = 0;
  char result[1024];
  const char* dir;
  (void)instance;

  pthread_mutex_lock(&mu);
  ++st->running;
  while (st->gate_closed) pthread_cond_wait(&st->cv, &mu);
  --st->running;
  ++st->processed;
  snprintf(st->last_device, sizeof st->last_device, "%s", device);
  st->last_attempt = taskmgr_context_attempt(ctx);
  st->last_batch = taskmgr_context_batch_size(ctx);
  snprintf(st->instance_id, sizeof st->instance_id, "%s", taskmgr_context_service_instance_id(ctx));
  st->estimate_mb = (long long)taskmgr_context_estimated_memory_mb(ctx);
  pthread_mutex_unlock(&mu);

  if (taskmgr_context_cancelled(ctx)) return TASKMGR_E_CANCELLED;
  if (strstr(options, "\"bad_text\"") != NULL) {
    /* Text the library could not hand back as strict JSON / UTF-8 is
     * refused at the call, naming the byte; the task goes on. */
    int refused = 0;
    refused += taskmgr_context_set_result(ctx, "{\"t\":\"\xff\"}") == TASKMGR_E_INVALID_ARGUMENT &&
               strstr(taskmgr_last_error(), "byte 6") != NULL;
    refused += taskmgr_context_set_result(ctx, "{\"a\":1e99999}") == TASKMGR_E_INVALID_ARGUMENT &&
               strstr(taskmgr_last_error(), "/a") != NULL;
    refused += taskmgr_context_set_result(ctx, "{\"a\":") == TASKMGR_E_INVALID_ARGUMENT;
    refused += taskmgr_context_set_result(ctx, "[1] x") == TASKMGR_E_INVALID_ARGUMENT;
    refused += taskmgr_context_set_error(ctx, "bad \xc3\x28") == TASKMGR_E_INVALID_ARGUMENT &&
               strstr(taskmgr_last_error(), "byte 4") != NULL;
    refused += taskmgr_context_stage(ctx, "st\xf4\x90\x80\x80") == TASKMGR_E_INVALID_ARGUMENT;
    snprintf(result, sizeof result, "{\"refused\":%d}", refused);
    return taskmgr_context_set_result(ctx, result);
  }
  if (strstr(options, "\"wait_for_deadline\"") != NULL) {
    /* Cooperative: waits until the deadline, then reports it. */
    if (taskmgr_context_seconds_left(ctx) > 1e6) return TASKMGR_E_INTERNAL; /* a deadline was set */
    while (taskmgr_context_seconds_left(ctx) > 0) sleep_ms(2);
    taskmgr_context_set_error(ctx, "echo: out of time");
    return TASKMGR_E_TIMEOUT;
  }
  if (taskmgr_context_seconds_left(ctx) < 1e6)
    return TASKMGR_E_INTERNAL; /* no deadline by default */
  if (taskmgr_context_stage(ctx, "load") != TASKMGR_OK) return TASKMGR_E_INTERNAL;
  if (taskmgr_context_input_data(ctx, &data, &size) != TASKMGR_OK) return TASKMGR_E_INTERNAL;
  dir = taskmgr_context_temp_dir(ctx);
  if (dir != NULL) {
    pthread_mutex_lock(&mu);
    snprintf(st->temp_dir, sizeof st->temp_dir, "%s", dir);
    pthread_mutex_unlock(&mu);
  }
  if (st->oom_on_gpu && strncmp(device, "cuda:", 5) == 0) {
    taskmgr_context_set_error(ctx, "echo: CUDA out of memory (simulated)");
    return TASKMGR_E_OUT_OF_MEMORY;
  }
  if (strstr(options, "\"fail\":\"input\"") != NULL) {
    taskmgr_context_set_error(ctx, "echo: the input is not what I expected");
    return TASKMGR_E_INVALID_ARGUMENT;
  }
  if (strstr(options, "\"fail\":\"other\"") != NULL) return 42; /* no message set */
  if (strstr(options, "\"return\":") != NULL) {
    /* Returns the status the options name (the process() status table). */
    int rc = atoi(strstr(options, "\"return\":") + 9);
    if (rc != TASKMGR_OK) taskmgr_context_set_error(ctx, "echo: returned as asked");
    if (rc == TASKMGR_OK) taskmgr_context_set_result(ctx, "{\"row\":\"ok\"}");
    return rc;
  }
  if (strstr(options, "\"memory\":") != NULL) {
    int rc = taskmgr_context_report_memory(ctx, atoi(strstr(options, "\"memory\":") + 9));
    if (rc != TASKMGR_OK) return TASKMGR_OK; /* ignored on purpose: the library still fails it */
  }
  if (strstr(options, "\"big_result\"") != NULL) {
    /* A 2 MiB result: more than a database capped at 1 MiB can take. */
    const size_t n = (size_t)2 << 20;
    char* big = (char*)malloc(n + 16);
    int rc;
    if (big == NULL) return TASKMGR_E_OUT_OF_MEMORY;
    memcpy(big, "{\"pad\":\"", 8);
    memset(big + 8, 'x', n);
    memcpy(big + 8 + n, "\"}", 3);
    rc = taskmgr_context_set_result(ctx, big);
    free(big);
    return rc;
  }
  taskmgr_context_stage(ctx, "compute");
  snprintf(result, sizeof result,
           "{\"device\":\"%s\",\"path\":\"%s\",\"bytes\":%u,\"task\":\"%s\"}", device,
           path ? path : "", (unsigned)size, taskmgr_context_task_id(ctx));
  return taskmgr_context_set_result(ctx, result);
}

static void echo_reset(void) {
  pthread_mutex_lock(&mu);
  memset(echo.last_device, 0, sizeof echo.last_device);
  echo.instances_created = echo.instances_destroyed = echo.processed = echo.freed = 0;
  echo.gate_closed = echo.running = echo.oom_on_gpu = 0;
  pthread_mutex_unlock(&mu);
}

static void echo_open_gate(void) {
  pthread_mutex_lock(&mu);
  echo.gate_closed = 0;
  pthread_cond_broadcast(&echo.cv);
  pthread_mutex_unlock(&mu);
}

static int echo_running(void) {
  int n;
  pthread_mutex_lock(&mu);
  n = echo.running;
  pthread_mutex_unlock(&mu);
  return n;
}

static int register_echo(taskmgr_manager* tm) {
  taskmgr_service s;
  taskmgr_service_init(&s);
  s.kind = "echo";
  s.user_data = &echo;
  s.create_instance = echo_create;
  s.process = echo_process;
  s.destroy_instance = echo_destroy;
  s.free_user_data = echo_free;
  s.memory_base_mb = 100;
  return taskmgr_register_service(tm, &s);
}

static taskmgr_manager* open_test_manager(const char* extra_yaml) {
  char yaml[2048];
  taskmgr_manager* tm = NULL;
  snprintf(yaml, sizeof yaml, "%s%s", kConfig, extra_yaml ? extra_yaml : "");
  CHECK_RC(taskmgr_open_yaml(yaml, &tm), TASKMGR_OK);
  if (tm != NULL) CHECK_RC(register_echo(tm), TASKMGR_OK);
  return tm;
}

static int create_echo(taskmgr_manager* tm, const char* path, const char* options,
                       const char* device, char id[TASKMGR_TASK_ID_SIZE]) {
  taskmgr_task_request r;
  taskmgr_task_request_init(&r);
  r.service = "echo";
  r.input_path = path;
  r.options_json = options;
  r.device = device;
  return taskmgr_create_task(tm, &r, id);
}

/* ---- events ------------------------------------------------------------------- */

typedef struct event_log {
  int count;
  int frees;
  char types[256][32];
  char details[256][256];
  uint64_t last_sequence;
  int out_of_order;
  int bad_pointers;
} event_log;

static void record_event(const taskmgr_event* e, void* user_data) {
  event_log* log = (event_log*)user_data;
  pthread_mutex_lock(&mu);
  if (e->details_json != NULL && e->json != NULL &&
      (strict_json_error(e->details_json, strlen(e->details_json)) >= 0 ||
       strict_json_error(e->json, strlen(e->json)) >= 0 ||
       strict_utf8_error(e->timestamp, strlen(e->timestamp)) >= 0)) {
    ++log->bad_pointers; /* not strict: counted with the other bad events */
  }
  if (e->struct_size < sizeof(taskmgr_event) || e->task_id == NULL || strlen(e->task_id) != 36 ||
      e->details_json == NULL || e->details_json[0] != '{' || e->json == NULL ||
      strstr(e->json, e->task_id) == NULL || e->timestamp == NULL || e->timestamp_ms <= 0 ||
      strcmp(e->event_type, taskmgr_event_name(e->event)) != 0) {
    ++log->bad_pointers;
  }
  if (e->sequence <= log->last_sequence) ++log->out_of_order;
  log->last_sequence = e->sequence;
  if (log->count < 256) {
    snprintf(log->types[log->count], sizeof log->types[0], "%s", e->event_type);
    snprintf(log->details[log->count], sizeof log->details[0], "%s", e->details_json);
  }
  ++log->count;
  pthread_mutex_unlock(&mu);
}

static void free_event_log(void* user_data) {
  event_log* log = (event_log*)user_data;
  pthread_mutex_lock(&mu);
  ++log->frees;
  pthread_mutex_unlock(&mu);
}

static int event_index(event_log* log, const char* type, int from) {
  int i, n;
  pthread_mutex_lock(&mu);
  n = log->count < 256 ? log->count : 256;
  for (i = from; i < n; ++i) {
    if (strcmp(log->types[i], type) == 0) break;
  }
  pthread_mutex_unlock(&mu);
  return i < n ? i : -1;
}

/* ---- the tests --------------------------------------------------------------------- */

static void test_enum_names(void) {
  CHECK(strcmp(taskmgr_task_status_name(TASKMGR_TASK_PENDING), "pending") == 0);
  CHECK(strcmp(taskmgr_task_status_name(TASKMGR_TASK_CANCELLED), "cancelled") == 0);
  CHECK(strcmp(taskmgr_task_status_name(TASKMGR_TASK_UNRECOGNIZED), "unrecognized") == 0);
  CHECK(strcmp(taskmgr_task_status_name(7), "unknown") == 0);
  CHECK(strcmp(taskmgr_task_status_name(-1), "unknown") == 0);
  CHECK(strcmp(taskmgr_failure_reason_name(TASKMGR_REASON_OUT_OF_MEMORY), "out_of_memory") == 0);
  CHECK(strcmp(taskmgr_failure_reason_name(TASKMGR_REASON_MEMORY_LIMIT_EXCEEDED),
               "memory_limit_exceeded") == 0);
  CHECK(strcmp(taskmgr_failure_reason_name(TASKMGR_REASON_HOST_LOST), "host_lost") == 0);
  CHECK(strcmp(taskmgr_failure_reason_name(15), "unknown") == 0);
  CHECK(strcmp(taskmgr_event_name(TASKMGR_EVENT_RESOURCE_ACQUIRED), "resource_acquired") == 0);
  CHECK(strcmp(taskmgr_event_name(TASKMGR_EVENT_CLEANUP_COMPLETED), "cleanup_completed") == 0);
  CHECK(strcmp(taskmgr_event_name(TASKMGR_EVENT_DELETED), "deleted") == 0);
  CHECK(strcmp(taskmgr_event_name(TASKMGR_EVENT_PRIORITY_CHANGED), "priority_changed") == 0);
  CHECK(strcmp(taskmgr_event_name(15), "unknown") == 0);
  CHECK(strcmp(taskmgr_log_level_name(TASKMGR_LOG_WARN), "warn") == 0);
  CHECK(strcmp(taskmgr_log_level_name(5), "unknown") == 0);
}

/* Every entry point refuses NULL handles and NULL out-pointers, naming them. */
static int log_frees = 0;
static void count_free(void* user_data) {
  (void)user_data;
  pthread_mutex_lock(&mu);
  ++log_frees;
  pthread_mutex_unlock(&mu);
}

static void test_null_arguments(void) {
  char id[TASKMGR_TASK_ID_SIZE];
  char* out = (char*)0x1;
  uint64_t sub = 0;
  int flag = 0;
  taskmgr_task_request req;
  taskmgr_service svc;
  const void* data = NULL;
  size_t size = 0;
  taskmgr_manager* tm = NULL;

  taskmgr_task_request_init(&req);
  taskmgr_service_init(&svc);
  taskmgr_open_options_init(NULL);
  taskmgr_task_request_init(NULL);
  taskmgr_start_params_init(NULL);
  taskmgr_service_init(NULL);

  CHECK_RC(taskmgr_open(NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("out_manager");
  CHECK_RC(taskmgr_open_yaml(NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_open_file(NULL, &tm), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("config_path");
  CHECK(tm == NULL);
  CHECK_RC(taskmgr_close(NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("taskmgr_close");
  CHECK_RC(taskmgr_destroy(NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_create_task(NULL, &req, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("manager");
  CHECK_RC(taskmgr_create_tasks(NULL, &req, 1, &id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("taskmgr_create_tasks: manager");
  CHECK_RC(taskmgr_start_task(NULL, "x", NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_cancel_task(NULL, "x", &flag), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_get_task(NULL, "x", &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_get_task_status(NULL, "x", &flag, &flag), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_get_task_result(NULL, "x", &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_wait_task(NULL, "x", 0, &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_wait_idle(NULL, 0), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_list_tasks(NULL, NULL, NULL, 0, &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_list_tasks_page(NULL, NULL, &out, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_delete_task(NULL, "x"), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_set_task_priority(NULL, "x", 1), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_retry_task(NULL, "x", NULL), TASKMGR_E_INVALID_ARGUMENT);
  taskmgr_list_params_init(NULL);
  CHECK_RC(taskmgr_get_task_events(NULL, "x", &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_get_task_metrics(NULL, &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_get_metrics_prometheus(NULL, &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_get_task_health(NULL, "x", &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_list_devices(NULL, &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_set_device_available(NULL, "cpu", 1), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_subscribe(NULL, record_event, NULL, NULL, &sub), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_unsubscribe(NULL, 1), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_flush_events(NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_register_service(NULL, &svc), TASKMGR_E_INVALID_ARGUMENT);

  /* Context functions with no context. */
  CHECK(taskmgr_context_task_id(NULL) == NULL);
  CHECK(taskmgr_context_device(NULL) == NULL);
  CHECK(taskmgr_context_service_instance_id(NULL) == NULL);
  CHECK(taskmgr_context_options_json(NULL) == NULL);
  CHECK(taskmgr_context_input_path(NULL) == NULL);
  CHECK_RC(taskmgr_context_input_data(NULL, &data, &size), TASKMGR_E_INVALID_ARGUMENT);
  CHECK(taskmgr_context_batch_size(NULL) == 0);
  CHECK(taskmgr_context_attempt(NULL) == 0);
  CHECK(taskmgr_context_estimated_memory_mb(NULL) == 0);
  CHECK(taskmgr_context_cancelled(NULL) == 0);
  CHECK(taskmgr_context_seconds_left(NULL) == 0.0);
  CHECK(taskmgr_context_temp_dir(NULL) == NULL);
  CHECK_MSG("context");
  CHECK_RC(taskmgr_context_stage(NULL, "x"), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_context_report_memory(NULL, 1), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_context_set_result(NULL, "{}"), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_context_set_error(NULL, "x"), TASKMGR_E_INVALID_ARGUMENT);

  /* NULL arguments on a live manager. */
  tm = open_test_manager(NULL);
  if (tm == NULL) return;
  CHECK_RC(taskmgr_create_task(tm, NULL, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("request");
  CHECK_RC(taskmgr_create_task(tm, &req, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("out_task_id");
  CHECK_RC(taskmgr_create_tasks(tm, NULL, 1, &id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("requests");
  CHECK_RC(taskmgr_create_tasks(tm, &req, 1, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("out_task_ids");
  CHECK_RC(taskmgr_start_task(tm, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("task_id");
  CHECK_RC(taskmgr_cancel_task(tm, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_get_task(tm, NULL, &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_get_task_status(tm, NULL, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_wait_task(tm, NULL, 0, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_get_task_events(tm, NULL, &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_get_task_health(tm, NULL, &out), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_list_tasks(tm, NULL, NULL, 0, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("out_json");
  CHECK_RC(taskmgr_list_tasks_page(tm, NULL, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("out_json");
  CHECK_RC(taskmgr_delete_task(tm, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("task_id");
  CHECK_RC(taskmgr_set_task_priority(tm, NULL, 1), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("task_id");
  CHECK_RC(taskmgr_retry_task(tm, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("task_id");
  CHECK_RC(taskmgr_get_task_metrics(tm, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_get_metrics_prometheus(tm, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_list_devices(tm, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_cluster(tm, NULL), TASKMGR_E_INVALID_ARGUMENT);
  {
    char* cj = (char*)1;
    CHECK_RC(taskmgr_cluster(NULL, &cj), TASKMGR_E_INVALID_ARGUMENT);
    CHECK(cj == NULL);
  }
  CHECK_RC(taskmgr_set_device_available(tm, NULL, 1), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("device");
  CHECK_RC(taskmgr_subscribe(tm, NULL, NULL, NULL, &sub), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("callback");
  log_frees = 0;
  CHECK_RC(taskmgr_subscribe(tm, NULL, &log_frees, count_free, &sub), TASKMGR_E_INVALID_ARGUMENT);
  CHECK(log_frees == 0); /* a failed subscribe leaves the user data to the caller */
  CHECK_RC(taskmgr_subscribe(tm, record_event, NULL, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("out_subscription");
  CHECK_RC(taskmgr_register_service(tm, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

static void ignore_log(int level, const char* message, void* user_data) {
  (void)level;
  (void)message;
  (void)user_data;
}

static void test_open_errors(void) {
  taskmgr_manager* tm = (taskmgr_manager*)0x1;
  taskmgr_open_options o;

  CHECK_RC(taskmgr_open_yaml("tasks:\n  max_queue_size: -3\n", &tm), TASKMGR_E_INVALID_CONFIG);
  CHECK(tm == NULL);
  CHECK_MSG("tasks.max_queue_size");
  CHECK_RC(taskmgr_open_yaml("tasks: [1, 2\n", &tm), TASKMGR_E_INVALID_CONFIG);
  CHECK_RC(taskmgr_open_file("/no/such/dir/taskmgr.yaml", &tm), TASKMGR_E_INVALID_CONFIG);
  CHECK_MSG("/no/such/dir/taskmgr.yaml");

  taskmgr_open_options_init(&o);
  o.config_yaml = kConfig;
  o.config_path = "/tmp/x.yaml";
  o.log_callback = ignore_log;
  o.log_free = count_free;
  log_frees = 0;
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("not both");
  /* A failed open never calls log_free: the log user data stays the
   * caller's (issue 15, item 8: one ownership rule for every free function). */
  CHECK(log_frees == 0);

  taskmgr_open_options_init(&o);
  o.struct_size = 0;
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("struct_size");
  taskmgr_open_options_init(&o);
  o.struct_size = sizeof(o) + 64; /* a newer header than the library */
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_E_INCOMPATIBLE);
  CHECK_MSG("newer");
  /* Smaller than any version of the struct: garbage, not an old header. */
  taskmgr_open_options_init(&o);
  o.struct_size = 4;
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("struct_size is 4, smaller than any version");
  o.struct_size = offsetof(taskmgr_open_options, log_free); /* one field short of 0.1.0 */
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_E_INVALID_ARGUMENT);

  /* A database path that cannot be opened. */
  taskmgr_open_options_init(&o);
  o.config_yaml = kConfig;
  o.database_path = "/no/such/dir/taskmgr.db";
  CHECK(taskmgr_open(&o, &tm) != TASKMGR_OK);
  CHECK_MSG("/no/such/dir/taskmgr.db");
  CHECK(tm == NULL);

  /* A configuration file. */
  {
    const char* path = "c_api_test_config.yaml";
    FILE* f = fopen(path, "w");
    CHECK(f != NULL);
    if (f != NULL) {
      fputs(kConfig, f);
      fclose(f);
      CHECK_RC(taskmgr_open_file(path, &tm), TASKMGR_OK);
      CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
      remove(path);
    }
  }

  /* An options struct from the oldest header (0.1.0, up to log_free): only
   * its fields are read. */
  taskmgr_open_options_init(&o);
  o.config_yaml = kConfig;
  o.struct_size = offsetof(taskmgr_open_options, log_free) + sizeof o.log_free;
  o.event_callback = (taskmgr_event_fn)(uintptr_t)1; /* beyond struct_size: never read */
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_OK);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

static void test_task_lifecycle(void) {
  taskmgr_manager* tm = open_test_manager(NULL);
  char id[TASKMGR_TASK_ID_SIZE], id2[TASKMGR_TASK_ID_SIZE], id3[TASKMGR_TASK_ID_SIZE];
  char* json = NULL;
  int status = -1, reason = -1, cancelled = -1;
  taskmgr_task_request r;
  taskmgr_start_params p;
  static const unsigned char bytes[5] = {1, 2, 3, 4, 5};
  if (tm == NULL) return;
  echo_reset();

  /* By path. */
  CHECK_RC(create_echo(tm, "/data/page-1.png", "{\"k\":1}", NULL, id), TASKMGR_OK);
  CHECK(strlen(id) == 36);
  CHECK_RC(taskmgr_get_task_status(tm, id, &status, &reason), TASKMGR_OK);
  CHECK(status == TASKMGR_TASK_PENDING && reason == TASKMGR_REASON_NONE);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_E_INVALID_STATE); /* not pending any more */
  CHECK_MSG(id);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"status\":\"completed\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"resource_cleanup_completed\":true") != NULL);
  CHECK(json != NULL && strstr(json, "\"estimated_memory_mb\":") != NULL);
  CHECK(json != NULL && strstr(json, "\"assigned_device\":") != NULL);
  CHECK(json != NULL && strstr(json, "\"service_instance_id\":\"echo@") != NULL);
  CHECK(json != NULL && strstr(json, "/data/page-1.png") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_get_task_result(tm, id, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"path\":\"/data/page-1.png\"") != NULL);
  CHECK(json != NULL && strstr(json, id) != NULL);
  taskmgr_free(json);
  CHECK(echo.temp_dir[0] != '\0');
  CHECK(strncmp(echo.instance_id, "echo@", 5) == 0 && strchr(echo.instance_id, '#') != NULL);
  CHECK(echo.estimate_mb >= 100);          /* the service's memory_base_mb */
  CHECK(access(echo.temp_dir, F_OK) != 0); /* the task's temp dir went with its cleanup */

  /* By bytes, with start parameters. */
  taskmgr_task_request_init(&r);
  r.service = "echo";
  r.input_data = bytes;
  r.input_size = sizeof bytes;
  r.media_type = "application/octet-stream";
  CHECK_RC(taskmgr_create_task(tm, &r, id2), TASKMGR_OK);
  taskmgr_start_params_init(&p);
  p.set_priority = 1;
  p.priority = 7;
  p.batch_size = 3;
  p.device = "cpu";
  CHECK_RC(taskmgr_start_task(tm, id2, &p), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id2, 30, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_get_task(tm, id2, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"priority\":7") != NULL);
  CHECK(json != NULL && strstr(json, "\"batch_size\":3") != NULL);
  CHECK(json != NULL && strstr(json, "\\\"bytes\\\":5") == NULL); /* result embedded as JSON */
  CHECK(json != NULL && strstr(json, "\"bytes\":5") != NULL);
  taskmgr_free(json);
  CHECK(echo.last_batch == 3);
  CHECK(strcmp(echo.last_device, "cpu") == 0);

  /* Cancel a pending task; cancelling again reports it had ended. */
  CHECK_RC(create_echo(tm, "/data/page-3.png", NULL, NULL, id3), TASKMGR_OK);
  CHECK_RC(taskmgr_cancel_task(tm, id3, &cancelled), TASKMGR_OK);
  CHECK(cancelled == 1);
  CHECK_RC(taskmgr_cancel_task(tm, id3, &cancelled), TASKMGR_OK);
  CHECK(cancelled == 0);
  CHECK_RC(taskmgr_get_task_status(tm, id3, &status, NULL), TASKMGR_OK);
  CHECK(status == TASKMGR_TASK_CANCELLED);

  /* Listing. */
  CHECK_RC(taskmgr_list_tasks(tm, "completed", "echo", 0, &json), TASKMGR_OK);
  CHECK(json != NULL && json[0] == '[' && strstr(json, id) != NULL && strstr(json, id2) != NULL);
  CHECK(json != NULL && strstr(json, id3) == NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_list_tasks(tm, NULL, NULL, 1, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, id3) != NULL && strstr(json, id) == NULL); /* newest 1 */
  taskmgr_free(json);
  CHECK_RC(taskmgr_list_tasks(tm, "finished", NULL, 0, &json), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("finished");
  CHECK(json == NULL);
  CHECK_MSG("unrecognized"); /* the message lists every name it accepts */
  CHECK_RC(taskmgr_list_tasks(tm, "unrecognized", NULL, 0, &json), TASKMGR_OK);
  CHECK(json != NULL && strcmp(json, "[]") == 0);
  taskmgr_free(json);
  json = NULL;

  /* Events, metrics, health, devices. */
  CHECK_RC(taskmgr_get_task_events(tm, id, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"event_type\":\"created\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"event_type\":\"resource_acquired\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"event_type\":\"cleanup_completed\"") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_get_task_metrics(tm, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"active_tasks\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"queued_tasks\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"memory_by_device\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"pool_utilization\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"average_wait_time\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"tasks_completed\":2") != NULL);
  CHECK(json != NULL && strstr(json, "\"tasks_cancelled\":1") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_get_metrics_prometheus(tm, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "# TYPE taskmgr_") != NULL);
  CHECK(json != NULL && strstr(json, "taskmgr_tasks_completed_total 2") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_get_task_health(tm, id, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"status\":\"completed\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"processing_time_s\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"warnings\":[") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_list_devices(tm, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"id\":\"cpu\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"id\":\"cuda:0\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"total_mb\":2000") != NULL);
  taskmgr_free(json);
  /* Not a shared queue: no cluster (UNSUPPORTED, the message says why). */
  json = NULL;
  CHECK_RC(taskmgr_cluster(tm, &json), TASKMGR_E_UNSUPPORTED);
  CHECK(json == NULL);
  CHECK_MSG("storage.shared is off");
  CHECK_RC(taskmgr_wait_idle(tm, 30), TASKMGR_OK);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
  /* Every instance destroyed, the service's user data freed once. */
  CHECK(echo.instances_created >= 1 && echo.instances_destroyed == echo.instances_created);
  CHECK(echo.freed == 1);
}

static void test_task_errors(void) {
  taskmgr_manager* tm = open_test_manager("  max_queue_size: 1\n");
  char id[TASKMGR_TASK_ID_SIZE], id2[TASKMGR_TASK_ID_SIZE];
  char* json = (char*)0x1;
  int status = 0, reason = 0;
  const char* unknown = "01890000-0000-7000-8000-000000000000";
  taskmgr_task_request r;
  taskmgr_start_params p;
  taskmgr_service s;
  static const unsigned char bytes[2] = {1, 2};
  if (tm == NULL) return;
  echo_reset();

  /* Unknown ids. */
  CHECK_RC(taskmgr_start_task(tm, unknown, NULL), TASKMGR_E_NOT_FOUND);
  CHECK_MSG(unknown);
  CHECK_RC(taskmgr_get_task(tm, unknown, &json), TASKMGR_E_NOT_FOUND);
  CHECK(json == NULL);
  CHECK_RC(taskmgr_get_task_status(tm, "not-an-id", &status, NULL), TASKMGR_E_NOT_FOUND);
  CHECK_RC(taskmgr_cancel_task(tm, unknown, NULL), TASKMGR_E_NOT_FOUND);
  CHECK_RC(taskmgr_wait_task(tm, unknown, 0.1, NULL), TASKMGR_E_NOT_FOUND);
  CHECK_RC(taskmgr_get_task_events(tm, unknown, &json), TASKMGR_E_NOT_FOUND);
  CHECK_RC(taskmgr_get_task_health(tm, unknown, &json), TASKMGR_E_NOT_FOUND);
  CHECK_RC(taskmgr_get_task_result(tm, unknown, &json), TASKMGR_E_NOT_FOUND);
  CHECK_RC(taskmgr_unsubscribe(tm, 987654), TASKMGR_E_NOT_FOUND);
  CHECK_RC(taskmgr_set_device_available(tm, "cuda:7", 0), TASKMGR_E_NOT_FOUND);
  CHECK_MSG("cuda:7");

  /* Bad requests. */
  CHECK_RC(create_echo(tm, "/data/\xff\xfe.png", NULL, NULL, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("UTF-8");
  CHECK(id[0] == '\0');
  CHECK_RC(create_echo(tm, "/data/\xc3\x28.png", NULL, NULL, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(create_echo(tm, "/data/caf\xc3\xa9.png", NULL, NULL, id), TASKMGR_OK); /* valid */
  CHECK_RC(create_echo(tm, "/data/a.png", "{\"psm\": ", NULL, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("JSON");
  CHECK_RC(create_echo(tm, "/data/a.png", "[1, 2]", NULL, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("object");
  CHECK_RC(create_echo(tm, "/data/a.png", NULL, "tpu:0", id), TASKMGR_E_NOT_FOUND);
  CHECK_MSG("tpu:0");
  taskmgr_task_request_init(&r);
  r.service = "no-such-service";
  r.input_path = "/data/a.png";
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_E_NOT_FOUND);
  CHECK_MSG("no-such-service");
  CHECK_MSG("echo"); /* lists the registered services */
  r.service = "echo";
  r.input_data = bytes;
  r.input_size = sizeof bytes;
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("not both");
  r.input_path = NULL;
  r.input_data = NULL;
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("input_data is NULL");
  r.input_size = 0;
  r.batch_size = -2;
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("batch_size");
  r.batch_size = 0;
  r.struct_size = 0;
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("taskmgr_task_request_init");

  /* Bad start parameters. */
  CHECK_RC(create_echo(tm, "/data/a.png", NULL, NULL, id), TASKMGR_OK);
  taskmgr_start_params_init(&p);
  p.options_json = "{oops}";
  CHECK_RC(taskmgr_start_task(tm, id, &p), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("JSON");
  taskmgr_start_params_init(&p);
  p.batch_size = -1;
  CHECK_RC(taskmgr_start_task(tm, id, &p), TASKMGR_E_INVALID_ARGUMENT);
  taskmgr_start_params_init(&p);
  p.struct_size = 4;
  CHECK_RC(taskmgr_start_task(tm, id, &p), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("smaller than any version");
  {
    char other[TASKMGR_TASK_ID_SIZE];
    r.struct_size = 1;
    CHECK_RC(taskmgr_create_task(tm, &r, other), TASKMGR_E_INVALID_ARGUMENT);
    CHECK_MSG("struct_size is 1, smaller than any version");
    r.struct_size = sizeof r;
  }

  /* Bad services. */
  taskmgr_service_init(&s);
  s.kind = "small";
  s.create_instance = echo_create;
  s.process = echo_process;
  s.struct_size = 4;
  CHECK_RC(taskmgr_register_service(tm, &s), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("smaller than any version");
  taskmgr_service_init(&s);
  s.kind = "broken";
  CHECK_RC(taskmgr_register_service(tm, &s), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("create_instance");
  s.create_instance = echo_create;
  CHECK_RC(taskmgr_register_service(tm, &s), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("process");
  s.kind = "echo";
  s.process = echo_process;
  s.user_data = &echo;
  s.free_user_data = echo_free;
  CHECK_RC(taskmgr_register_service(tm, &s), TASKMGR_E_INVALID_STATE);
  CHECK_MSG("registered already");
  /* A refused registration does not free the user data: the live "echo"
   * registration uses the same &echo (freeing it invited a double free). */
  CHECK(echo.freed == 0);

  /* QUEUE_FULL: one task runs (blocked), one waits, the next is refused
   * and stays pending. */
  pthread_mutex_lock(&mu);
  echo.gate_closed = 1;
  pthread_mutex_unlock(&mu);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  while (echo_running() < 1) sleep_ms(1);
  CHECK_RC(create_echo(tm, "/data/b.png", NULL, NULL, id2), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id2, NULL), TASKMGR_OK);
  {
    char id3[TASKMGR_TASK_ID_SIZE];
    CHECK_RC(create_echo(tm, "/data/c.png", NULL, NULL, id3), TASKMGR_OK);
    CHECK_RC(taskmgr_start_task(tm, id3, NULL), TASKMGR_E_QUEUE_FULL);
    CHECK_MSG("max_queue_size");
    CHECK_RC(taskmgr_get_task_status(tm, id3, &status, NULL), TASKMGR_OK);
    CHECK(status == TASKMGR_TASK_PENDING);
    /* Waiting on a blocked task times out. */
    CHECK_RC(taskmgr_wait_task(tm, id, 0.05, &json), TASKMGR_E_TIMEOUT);
    CHECK(json == NULL);
    CHECK_RC(taskmgr_wait_idle(tm, 0.05), TASKMGR_E_TIMEOUT);
    /* NaN is not "< 0": refused, not a wait without limit (it hung). */
    CHECK_RC(taskmgr_wait_task(tm, id, NAN, &json), TASKMGR_E_INVALID_ARGUMENT);
    CHECK_MSG("NaN");
    CHECK(json == NULL);
    CHECK_RC(taskmgr_wait_idle(tm, NAN), TASKMGR_E_INVALID_ARGUMENT);
    CHECK_MSG("NaN");
    echo_open_gate();
    CHECK_RC(taskmgr_wait_task(tm, id2, 30, NULL), TASKMGR_OK);
    CHECK_RC(taskmgr_start_task(tm, id3, NULL), TASKMGR_OK); /* room again */
    CHECK_RC(taskmgr_wait_task(tm, id3, 30, NULL), TASKMGR_OK);
  }

  /* Failures a service reports. */
  CHECK_RC(create_echo(tm, "/data/d.png", "{\"fail\":\"input\"}", NULL, id), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"failure_reason\":\"invalid_input\"") != NULL);
  CHECK(json != NULL && strstr(json, "the input is not what I expected") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_get_task_status(tm, id, &status, &reason), TASKMGR_OK);
  CHECK(status == TASKMGR_TASK_FAILED && reason == TASKMGR_REASON_INVALID_INPUT);
  CHECK_RC(create_echo(tm, "/data/e.png", "{\"fail\":\"other\"}", NULL, id), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"failure_reason\":\"processing_error\"") != NULL);
  CHECK(json != NULL && strstr(json, "echo") != NULL && strstr(json, "unknown") != NULL);
  taskmgr_free(json);
  /* A deadline: the service sees it through taskmgr_context_seconds_left. */
  CHECK_RC(create_echo(tm, "/data/g.png", "{\"wait_for_deadline\":1,\"timeout_seconds\":0.05}",
                       NULL, id),
           TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"failure_reason\":\"timeout\"") != NULL);
  CHECK(json != NULL && strstr(json, "deadline of 0.05 s") != NULL);
  taskmgr_free(json);
  /* Memory reported past the device's total: OUT_OF_MEMORY even though
   * process() returned OK; retried, then out of attempts. */
  CHECK_RC(create_echo(tm, "/data/f.png", "{\"memory\":999999}", "cpu", id), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"status\":\"failed\"") != NULL);
  CHECK(json != NULL && strstr(json, "999999 MB") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
  CHECK(echo.freed == 1);
}

/* A host service that runs out of memory on cuda:0 is retried on the CPU. */
static void test_oom_cpu_fallback(void) {
  taskmgr_manager* tm = open_test_manager(NULL);
  char id[TASKMGR_TASK_ID_SIZE];
  char* json = NULL;
  uint64_t sub = 0;
  event_log log;
  int fallback, retried, completed;
  if (tm == NULL) return;
  echo_reset();
  memset(&log, 0, sizeof log);
  echo.oom_on_gpu = 1;
  CHECK_RC(taskmgr_subscribe(tm, record_event, &log, free_event_log, &sub), TASKMGR_OK);
  CHECK(sub != 0);
  CHECK_RC(create_echo(tm, "/data/big.png", NULL, "cuda:0", id), TASKMGR_OK);
  CHECK_RC(taskmgr_get_task(tm, id, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"assigned_device\":\"cuda:0\"") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"status\":\"completed\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"assigned_device\":\"cpu\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"attempt\":2") != NULL);
  taskmgr_free(json);
  CHECK(strcmp(echo.last_device, "cpu") == 0);
  CHECK_RC(taskmgr_flush_events(tm), TASKMGR_OK);
  retried = event_index(&log, "retried", 0);
  fallback = event_index(&log, "device_fallback", 0);
  completed = event_index(&log, "completed", 0);
  CHECK(event_index(&log, "started", 0) >= 0);
  CHECK(retried >= 0 && fallback >= 0 && completed > fallback);
  if (fallback >= 0) {
    CHECK(strstr(log.details[fallback], "\"from\":\"cuda:0\"") != NULL);
    CHECK(strstr(log.details[fallback], "\"to\":\"cpu\"") != NULL);
    CHECK(strstr(log.details[fallback], "\"reason\":\"out_of_memory\"") != NULL);
  }
  CHECK(log.out_of_order == 0 && log.bad_pointers == 0);
  CHECK_RC(taskmgr_get_task_metrics(tm, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"oom_errors\":1") != NULL);
  CHECK(json != NULL && strstr(json, "\"cpu_fallbacks\":1") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_unsubscribe(tm, sub), TASKMGR_OK);
  CHECK(log.frees == 1); /* freed by unsubscribe, outside a callback */
  CHECK_RC(taskmgr_unsubscribe(tm, sub), TASKMGR_E_NOT_FOUND);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
  CHECK(log.frees == 1);
}

/* ---- create + start in one step; many tasks at once --------------------------------- */

/* The number of tasks the manager knows (-1 when listing fails). */
static int count_tasks(taskmgr_manager* tm) {
  char* json = NULL;
  const char* p;
  int n = 0;
  if (taskmgr_list_tasks(tm, NULL, NULL, 0, &json) != TASKMGR_OK || json == NULL) return -1;
  for (p = json; (p = strstr(p, "\"id\":\"")) != NULL; ++p) ++n;
  taskmgr_free(json);
  return n;
}

/* One worker thread, so a task held at the gate keeps the others queued. */
static taskmgr_manager* open_one_worker(const char* extra_yaml) {
  char yaml[2048];
  taskmgr_open_options o;
  taskmgr_manager* tm = NULL;
  snprintf(yaml, sizeof yaml, "%s%s", kConfig, extra_yaml ? extra_yaml : "");
  taskmgr_open_options_init(&o);
  o.config_yaml = yaml;
  o.worker_threads = 1;
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_OK);
  if (tm != NULL) CHECK_RC(register_echo(tm), TASKMGR_OK);
  return tm;
}

static void echo_request(taskmgr_task_request* r, const char* path, int start) {
  taskmgr_task_request_init(r);
  r->service = "echo";
  r->input_path = path;
  r->device = "cpu";
  r->start = start;
}

/* Closes the gate and starts a task that holds the one worker until it opens. */
static void hold_the_worker(taskmgr_manager* tm, char id[TASKMGR_TASK_ID_SIZE]) {
  taskmgr_task_request r;
  pthread_mutex_lock(&mu);
  echo.gate_closed = 1;
  pthread_mutex_unlock(&mu);
  echo_request(&r, "/data/blocker.png", 1); /* create + start: it runs at once */
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_OK);
  while (echo_running() < 1) sleep_ms(1);
}

static int task_status(taskmgr_manager* tm, const char* id) {
  int status = -1;
  CHECK_RC(taskmgr_get_task_status(tm, id, &status, NULL), TASKMGR_OK);
  return status;
}

static int wait_completed(taskmgr_manager* tm, const char* id) {
  char* json = NULL;
  int ok;
  CHECK_RC(taskmgr_wait_task(tm, id, 30, &json), TASKMGR_OK);
  ok = json != NULL && strstr(json, "\"status\":\"completed\"") != NULL;
  taskmgr_free(json);
  return ok;
}

/* Every string in is UTF-8 and every document strict JSON, so that every
 * string and document out is too (issue 15, items 5 and 6). */
static void test_strict_text(void) {
  taskmgr_manager* tm = open_test_manager(NULL);
  taskmgr_open_options o;
  taskmgr_manager* other = NULL;
  char id[TASKMGR_TASK_ID_SIZE];
  char* json = NULL;
  if (tm == NULL) return;
  echo_reset();
  CHECK_RC(create_echo(tm, "/data/a.png", "{\"a\":1e99999}", NULL, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("not finite");
  CHECK_RC(create_echo(tm, "/data/a.png", "{\"a\":[1,-1e400]}", NULL, id),
           TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("/a/1");
  CHECK_RC(create_echo(tm, "/data/a.png", "{\"a\":\"\xed\xa0\x80\"}", NULL, id),
           TASKMGR_E_INVALID_ARGUMENT); /* an encoded surrogate */
  CHECK_MSG("byte 6");
  /* Above U+10FFFF: not a task id that could exist, an invalid argument. */
  CHECK_RC(taskmgr_get_task(tm, "\xf4\x90\x80\x80", &json), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("task_id is not valid UTF-8 (byte 0)");
  CHECK(json == NULL);
  CHECK_RC(taskmgr_cancel_task(tm, "\xff", NULL), TASKMGR_E_INVALID_ARGUMENT);
  /* Every other string argument too (a stranger found these four). */
  CHECK_RC(create_echo(tm, "/data/a.png", NULL, NULL, id), TASKMGR_OK);
  {
    taskmgr_start_params sp;
    char* yaml = NULL;
    FILE* f;
    const char* bad_yaml_path = "/tmp/taskmgr-c-api-bad-key.yaml";
    taskmgr_start_params_init(&sp);
    sp.device = "x\xff";
    CHECK_RC(taskmgr_start_task(tm, id, &sp), TASKMGR_E_INVALID_ARGUMENT);
    CHECK_MSG("device is not valid UTF-8 (byte 1)");
    CHECK_RC(taskmgr_set_device_available(tm, "\xc0\xaf", 1), TASKMGR_E_INVALID_ARGUMENT);
    CHECK_MSG("device is not valid UTF-8 (byte 0)");
    CHECK_RC(taskmgr_list_tasks(tm, "que\xffued", NULL, 5, &json), TASKMGR_E_INVALID_ARGUMENT);
    CHECK_MSG("status is not valid UTF-8 (byte 3)");
    CHECK_RC(taskmgr_config_normalize("tasks: {}\n# a comment \xfe\n", &yaml),
             TASKMGR_E_INVALID_ARGUMENT);
    CHECK_MSG("yaml is not valid UTF-8");
    CHECK_RC(taskmgr_config_normalize_file("/tmp/\xff.yaml", &yaml), TASKMGR_E_INVALID_ARGUMENT);
    /* A file's content is configuration: INVALID_CONFIG, with a message
     * that is UTF-8 although it quotes the bad key. */
    f = fopen(bad_yaml_path, "wb");
    if (f != NULL) {
      fputs("ta\xffsks: {max_queue_size: 3}\n", f);
      fclose(f);
      CHECK_RC(taskmgr_config_normalize_file(bad_yaml_path, &yaml), TASKMGR_E_INVALID_CONFIG);
      CHECK_MSG("");
      remove(bad_yaml_path);
    }
    CHECK(yaml == NULL);
  }

  CHECK_RC(create_echo(tm, "/data/a.png", "{\"bad_text\":true}", NULL, id), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"status\":\"completed\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"result\":{\"refused\":6}") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);

  taskmgr_open_options_init(&o);
  o.config_yaml = kConfig;
  o.database_path = "/tmp/\xff.db";
  CHECK_RC(taskmgr_open(&o, &other), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("database_path is not valid UTF-8 (byte 5)");
  CHECK(other == NULL);
  o.database_path = NULL;
  o.config_yaml = NULL;
  o.config_path = "/tmp/\xc0\xaf.yaml"; /* an overlong '/' */
  CHECK_RC(taskmgr_open(&o, &other), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("config_path is not valid UTF-8 (byte 5)");
}

/* Item 6 of issue 15: a request with no input at all is refused at create
 * (it was accepted and failed later), unless the service sets
 * input_optional. */
static int reading_process(void* user_data, void* instance, taskmgr_task_context* ctx);

/* Rows of the status table in docs/C_API.md that no other test here
 * returns from a call: IO, MEMORY_LIMIT_EXCEEDED and DEVICE_UNAVAILABLE at
 * create. (POOL_EXHAUSTED, CANCELLED and UNSUPPORTED are never a call's
 * status today: they name task outcomes and process() returns.) */
static void test_status_rows(void) {
  taskmgr_open_options o;
  taskmgr_manager* tm = NULL;
  taskmgr_service s;
  taskmgr_task_request r;
  char id[TASKMGR_TASK_ID_SIZE];
  taskmgr_open_options_init(&o);
  o.config_yaml =
      "devices: {probe_cpu: false, probe_nvidia: false, cpu_memory_mb: 40}\n"
      "tasks: {max_task_memory_mb: 45}\n";
  o.disable_builtin_ocr = 1;
  o.database_path = "/no/such/dir/taskmgr.db";
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_E_IO);
  CHECK_MSG("/no/such/dir/taskmgr.db");
  o.database_path = ":memory:";
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_OK);
  if (tm == NULL) return;
  taskmgr_service_init(&s);
  s.kind = "big";
  s.user_data = &echo;
  s.create_instance = echo_create;
  s.destroy_instance = echo_destroy; /* frees what echo_create allocates */
  s.process = reading_process;
  s.memory_base_mb = 50; /* over the 45 MB limit */
  CHECK_RC(taskmgr_register_service(tm, &s), TASKMGR_OK);
  s.kind = "mid";
  s.memory_base_mb = 42; /* under the limit, over the CPU's 40 MB */
  CHECK_RC(taskmgr_register_service(tm, &s), TASKMGR_OK);
  s.kind = "small";
  s.memory_base_mb = 1;
  CHECK_RC(taskmgr_register_service(tm, &s), TASKMGR_OK);
  taskmgr_task_request_init(&r);
  r.input_path = "/data/row.png";
  r.service = "big";
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_E_MEMORY_LIMIT_EXCEEDED);
  CHECK_MSG("tasks.max_task_memory_mb = 45");
  r.service = "mid";
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_E_DEVICE_UNAVAILABLE);
  CHECK_MSG("cpu 40 MB total");
  r.service = "small";
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_OK);
  CHECK_RC(taskmgr_set_device_available(tm, "cpu", 0), TASKMGR_OK);
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_E_DEVICE_UNAVAILABLE);
  CHECK_MSG("unavailable");
  CHECK(count_tasks(tm) == 1);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

static void test_no_input(void) {
  taskmgr_manager* tm = open_test_manager(NULL);
  taskmgr_task_request r, many[2];
  taskmgr_service s;
  char id[TASKMGR_TASK_ID_SIZE], ids[2][TASKMGR_TASK_ID_SIZE];
  if (tm == NULL) return;
  echo_reset();
  CHECK_RC(create_echo(tm, NULL, NULL, NULL, id), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("service 'echo' needs an input");
  taskmgr_task_request_init(&many[0]);
  taskmgr_task_request_init(&many[1]);
  many[0].service = many[1].service = "echo";
  many[0].input_path = "/data/one.png"; /* the second has none: the batch is refused */
  CHECK_RC(taskmgr_create_tasks(tm, many, 2, ids), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("request 1");
  CHECK(count_tasks(tm) == 0);
  taskmgr_service_init(&s);
  s.kind = "inputless";
  s.user_data = &echo;
  s.create_instance = echo_create;
  s.destroy_instance = echo_destroy; /* frees what echo_create allocates */
  s.process = reading_process;
  s.input_optional = 1;
  CHECK_RC(taskmgr_register_service(tm, &s), TASKMGR_OK);
  taskmgr_task_request_init(&r);
  r.service = "inputless";
  r.start = 1;
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_OK);
  CHECK(wait_completed(tm, id));
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

/* docs/C_API.md, "Host services": one row of the process() status table
 * per case, the task as the table says it ends (issue 15, item 7). */
static void test_process_status_table(void) {
  static const struct {
    int rc;
    const char* status;
    const char* reason; /* the JSON value of failure_reason */
    int attempts;
  } rows[] = {
      {TASKMGR_OK, "completed", "null", 1},
      {TASKMGR_E_OUT_OF_MEMORY, "failed", "\"out_of_memory\"", 3}, /* retried, max_attempts 3 */
      {TASKMGR_E_INVALID_ARGUMENT, "failed", "\"invalid_input\"", 1},
      {TASKMGR_E_TIMEOUT, "failed", "\"timeout\"", 1},
      {TASKMGR_E_CANCELLED, "cancelled", "\"cancelled\"", 1},
      {TASKMGR_E_MEMORY_LIMIT_EXCEEDED, "failed", "\"memory_limit_exceeded\"", 1},
      {TASKMGR_E_IO, "failed", "\"processing_error\"", 1},
      {42, "failed", "\"processing_error\"", 1},
  };
  taskmgr_manager* tm = open_test_manager("    max_attempts: 3\n    cpu_fallback: false\n");
  size_t i;
  if (tm == NULL) return;
  echo_reset();
  for (i = 0; i < sizeof rows / sizeof rows[0]; ++i) {
    char options[64], id[TASKMGR_TASK_ID_SIZE], want[128];
    char* json = NULL;
    snprintf(options, sizeof options, "{\"return\":%d}", rows[i].rc);
    CHECK_RC(create_echo(tm, "/data/row.png", options, "cpu", id), TASKMGR_OK);
    CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
    CHECK_RC(taskmgr_wait_task(tm, id, 60, &json), TASKMGR_OK);
    snprintf(want, sizeof want, "\"status\":\"%s\"", rows[i].status);
    CHECK_ROW(json != NULL && strstr(json, want) != NULL, i, json);
    snprintf(want, sizeof want, "\"failure_reason\":%s", rows[i].reason);
    CHECK_ROW(json != NULL && strstr(json, want) != NULL, i, json);
    snprintf(want, sizeof want, "\"attempt\":%d,", rows[i].attempts);
    CHECK_ROW(json != NULL && strstr(json, want) != NULL, i, json);
    if (rows[i].rc != TASKMGR_OK) {
      CHECK_ROW(json != NULL && strstr(json, "echo: returned as asked") != NULL, i, json);
    }
    taskmgr_free(json);
  }
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

/* Item 4 of issue 15: an out-of-memory retry lowers the priority by one,
 * saturating at INT32_MIN (it overflowed: UBSan abort, or the lowest task
 * became the highest). */
static void test_priority_saturates(void) {
  taskmgr_manager* tm = open_test_manager(NULL);
  taskmgr_task_request r;
  char id[TASKMGR_TASK_ID_SIZE];
  char* json = NULL;
  if (tm == NULL) return;
  echo_reset();
  echo.oom_on_gpu = 1; /* fails on the GPU, falls back to the CPU */
  taskmgr_task_request_init(&r);
  r.service = "echo";
  r.input_path = "/data/low.png";
  r.device = "cuda:0";
  r.priority = INT32_MIN;
  r.start = 1;
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"status\":\"completed\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"attempt\":2") != NULL);
  CHECK(json != NULL && strstr(json, "\"priority\":-2147483648,") != NULL);
  taskmgr_free(json);
  echo.oom_on_gpu = 0;
  r.priority = INT32_MAX; /* the other end: stays representable too */
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"priority\":2147483647,") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

typedef struct close_waiter {
  taskmgr_manager* tm;
  const char* id; /* NULL: wait_idle */
  int rc;
} close_waiter;

static void* wait_forever(void* arg) {
  close_waiter* w = (close_waiter*)arg;
  w->rc = w->id != NULL ? taskmgr_wait_task(w->tm, w->id, -1, NULL) : taskmgr_wait_idle(w->tm, -1);
  return NULL;
}

static void* close_it(void* arg) {
  close_waiter* w = (close_waiter*)arg;
  w->rc = taskmgr_close(w->tm);
  return NULL;
}

/* Item 3 of issue 15: after close every wait returns, also for threads that
 * were waiting already (they waited for ever); changes are refused with
 * INVALID_STATE; reads work. */
static void test_waits_after_close(void) {
  taskmgr_manager* tm = open_test_manager(NULL);
  char a[TASKMGR_TASK_ID_SIZE], b[TASKMGR_TASK_ID_SIZE], c[TASKMGR_TASK_ID_SIZE];
  char pending[TASKMGR_TASK_ID_SIZE], id[TASKMGR_TASK_ID_SIZE];
  close_waiter on_pending, on_queued, on_idle, closer;
  pthread_t t1, t2, t3, t4;
  taskmgr_task_request r;
  taskmgr_service s;
  uint64_t sub = 0;
  int cancelled = -1;
  char* json = NULL;
  if (tm == NULL) return;
  echo_reset();
  pthread_mutex_lock(&mu);
  echo.gate_closed = 1;
  pthread_mutex_unlock(&mu);
  echo_request(&r, "/data/a.png", 1);
  CHECK_RC(taskmgr_create_task(tm, &r, a), TASKMGR_OK);
  CHECK_RC(taskmgr_create_task(tm, &r, b), TASKMGR_OK);
  while (echo_running() < 2) sleep_ms(1);               /* both workers held */
  CHECK_RC(taskmgr_create_task(tm, &r, c), TASKMGR_OK); /* queued behind them */
  echo_request(&r, "/data/p.png", 0);
  CHECK_RC(taskmgr_create_task(tm, &r, pending), TASKMGR_OK);
  on_pending.tm = on_queued.tm = on_idle.tm = closer.tm = tm;
  on_pending.id = pending;
  on_queued.id = c;
  on_idle.id = NULL;
  on_pending.rc = on_queued.rc = on_idle.rc = closer.rc = 1;
  pthread_create(&t1, NULL, wait_forever, &on_pending);
  pthread_create(&t2, NULL, wait_forever, &on_queued);
  pthread_create(&t3, NULL, wait_forever, &on_idle);
  sleep_ms(50);                                 /* all three are waiting */
  pthread_create(&t4, NULL, close_it, &closer); /* waits for a and b */
  sleep_ms(50);
  echo_open_gate();
  pthread_join(t4, NULL);
  pthread_join(t1, NULL);
  pthread_join(t2, NULL);
  pthread_join(t3, NULL);
  CHECK_RC(closer.rc, TASKMGR_OK);
  CHECK_RC(on_pending.rc, TASKMGR_E_INVALID_STATE); /* it stays pending: told, not left */
  CHECK_RC(on_queued.rc, TASKMGR_E_INVALID_STATE);  /* close left it queued */
  CHECK_RC(on_idle.rc, TASKMGR_E_INVALID_STATE);
  CHECK(task_status(tm, a) == TASKMGR_TASK_COMPLETED); /* close waited for it */
  CHECK(task_status(tm, c) == TASKMGR_TASK_QUEUED);
  CHECK_RC(taskmgr_wait_task(tm, a, -1, &json), TASKMGR_OK); /* it had ended */
  taskmgr_free(json);
  CHECK_RC(taskmgr_wait_task(tm, pending, 0, NULL), TASKMGR_E_INVALID_STATE);
  CHECK_RC(taskmgr_wait_idle(tm, 5), TASKMGR_E_INVALID_STATE);
  /* Changes are refused and change nothing. */
  CHECK_RC(taskmgr_cancel_task(tm, pending, &cancelled), TASKMGR_E_INVALID_STATE);
  CHECK_MSG("closed");
  CHECK(task_status(tm, pending) == TASKMGR_TASK_PENDING);
  CHECK_RC(taskmgr_start_task(tm, pending, NULL), TASKMGR_E_INVALID_STATE);
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_E_INVALID_STATE);
  CHECK_RC(taskmgr_set_device_available(tm, "cpu", 0), TASKMGR_E_INVALID_STATE);
  log_frees = 0;
  CHECK_RC(taskmgr_subscribe(tm, record_event, &log_frees, count_free, &sub),
           TASKMGR_E_INVALID_STATE);
  CHECK(log_frees == 0 && sub == 0);
  taskmgr_service_init(&s);
  s.kind = "late";
  s.create_instance = echo_create;
  s.process = echo_process;
  CHECK_RC(taskmgr_register_service(tm, &s), TASKMGR_E_INVALID_STATE);
  CHECK_RC(taskmgr_close(tm), TASKMGR_OK); /* again: nothing to do */
  /* Reads work. */
  CHECK_RC(taskmgr_get_task(tm, c, &json), TASKMGR_OK);
  taskmgr_free(json);
  CHECK_RC(taskmgr_get_task_metrics(tm, &json), TASKMGR_OK);
  taskmgr_free(json);
  CHECK_RC(taskmgr_list_tasks(tm, NULL, NULL, 10, &json), TASKMGR_OK);
  taskmgr_free(json);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

/* Item 1 of issue 15: close destroys the instances, while reads still
 * work, so a destroy_instance may read the manager (it crashed inside
 * taskmgr_destroy: the manager was gone); destroy after close destroys
 * nothing twice. */
typedef struct reading_service {
  taskmgr_manager* tm;
  int created, destroyed, reads_ok, reads;
} reading_service;

static int reading_create(void* user_data, const char* device, void** out) {
  reading_service* rs = (reading_service*)user_data;
  static int instance;
  (void)device;
  pthread_mutex_lock(&mu);
  ++rs->created;
  pthread_mutex_unlock(&mu);
  *out = &instance;
  return TASKMGR_OK;
}

static int reading_process(void* user_data, void* instance, taskmgr_task_context* ctx) {
  (void)user_data;
  (void)instance;
  (void)ctx;
  return TASKMGR_OK;
}

static void reading_destroy(void* user_data, void* instance) {
  reading_service* rs = (reading_service*)user_data;
  char* json = NULL;
  int ok = taskmgr_get_task_metrics(rs->tm, &json) == TASKMGR_OK && json != NULL;
  taskmgr_free(json);
  ok = ok && taskmgr_list_tasks(rs->tm, NULL, NULL, 5, &json) == TASKMGR_OK;
  taskmgr_free(json);
  (void)instance;
  pthread_mutex_lock(&mu);
  ++rs->destroyed;
  ++rs->reads;
  rs->reads_ok += ok;
  pthread_mutex_unlock(&mu);
}

static void test_close_destroys_instances(void) {
  reading_service rs;
  taskmgr_service s;
  taskmgr_task_request r;
  char id[TASKMGR_TASK_ID_SIZE];
  taskmgr_manager* tm = NULL;
  memset(&rs, 0, sizeof rs);
  CHECK_RC(taskmgr_open_yaml(kConfig, &tm), TASKMGR_OK);
  if (tm == NULL) return;
  rs.tm = tm;
  taskmgr_service_init(&s);
  s.kind = "reader";
  s.user_data = &rs;
  s.create_instance = reading_create;
  s.process = reading_process;
  s.destroy_instance = reading_destroy;
  CHECK_RC(taskmgr_register_service(tm, &s), TASKMGR_OK);
  taskmgr_task_request_init(&r);
  r.service = "reader";
  r.input_path = "/data/r.png";
  r.start = 1;
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, NULL), TASKMGR_OK);
  CHECK(rs.created >= 1 && rs.destroyed == 0); /* warm in its pool */
  CHECK_RC(taskmgr_close(tm), TASKMGR_OK);
  CHECK(rs.destroyed == rs.created); /* close destroyed them, as the header says */
  CHECK(rs.reads_ok == rs.reads);    /* and each destroy_instance read the manager */
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
  CHECK(rs.destroyed == rs.created); /* not twice */
}

/* Item 2 of issue 15: a thread that ends inside a call of the library
 * (pthread_exit in a callback, as Python's finalization ends its threads)
 * unwinds through it; the library does not swallow the unwind (glibc then
 * aborts the process: "FATAL: exception not rethrown") and stays usable. */
static pthread_t exiting_thread;
static int exiting_armed = 0;

static int exiting_supports(void* user_data, const char* device, const char* kind) {
  int armed;
  (void)user_data;
  (void)device;
  (void)kind;
  pthread_mutex_lock(&mu);
  armed = exiting_armed && pthread_equal(pthread_self(), exiting_thread);
  pthread_mutex_unlock(&mu);
  if (armed) pthread_exit(NULL); /* ends this thread inside taskmgr_create_task */
  return 1;
}

static void* create_and_exit(void* arg) {
  taskmgr_manager* tm = (taskmgr_manager*)arg;
  taskmgr_task_request r;
  char id[TASKMGR_TASK_ID_SIZE];
  taskmgr_task_request_init(&r);
  r.service = "exiting";
  r.input_path = "/data/x.png";
  r.start = 1;
  taskmgr_create_task(tm, &r, id);
  return (void*)1; /* not reached: the thread exits in supports_device */
}

static void test_thread_exit_in_callback(void) {
  taskmgr_manager* tm = open_test_manager(NULL);
  taskmgr_service s;
  void* result = NULL;
  char id[TASKMGR_TASK_ID_SIZE];
  taskmgr_task_request r;
  if (tm == NULL) return;
  taskmgr_service_init(&s);
  s.kind = "exiting";
  s.user_data = &echo;
  s.create_instance = echo_create;
  s.destroy_instance = echo_destroy; /* frees what echo_create allocates */
  s.process = reading_process;
  s.supports_device = exiting_supports;
  CHECK_RC(taskmgr_register_service(tm, &s), TASKMGR_OK);
  pthread_mutex_lock(&mu);
  exiting_armed = 1;
  CHECK(pthread_create(&exiting_thread, NULL, create_and_exit, tm) == 0);
  pthread_mutex_unlock(&mu);
  CHECK(pthread_join(exiting_thread, &result) == 0);
  CHECK(result == PTHREAD_CANCELED || result == NULL); /* it exited, no value returned */
  pthread_mutex_lock(&mu);
  exiting_armed = 0;
  pthread_mutex_unlock(&mu);
  /* The manager goes on: nothing was left locked or reserved. */
  taskmgr_task_request_init(&r);
  r.service = "exiting";
  r.input_path = "/data/y.png";
  r.start = 1;
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, NULL), TASKMGR_OK);
  CHECK(task_status(tm, id) == TASKMGR_TASK_COMPLETED);
  CHECK_RC(taskmgr_wait_idle(tm, 30), TASKMGR_OK);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

static void test_create_with_start(void) {
  taskmgr_manager* tm = open_one_worker("  max_queue_size: 1\n");
  taskmgr_task_request r;
  char blocker[TASKMGR_TASK_ID_SIZE], id[TASKMGR_TASK_ID_SIZE], old[TASKMGR_TASK_ID_SIZE];
  char refused[TASKMGR_TASK_ID_SIZE];
  char* json = NULL;
  if (tm == NULL) return;
  echo_reset();
  taskmgr_task_request_init(&r);
  CHECK(r.start == 0); /* the default: pending until taskmgr_start_task */
  hold_the_worker(tm, blocker);

  /* Created already queued: no taskmgr_start_task (it is not pending). */
  echo_request(&r, "/data/started.png", 1);
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_OK);
  CHECK(strlen(id) == 36);
  CHECK(task_status(tm, id) == TASKMGR_TASK_QUEUED);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_E_INVALID_STATE);

  /* The queue is full (max_queue_size 1): refused as a whole, not left pending. */
  echo_request(&r, "/data/refused.png", 1);
  CHECK(count_tasks(tm) == 2);
  CHECK_RC(taskmgr_create_task(tm, &r, refused), TASKMGR_E_QUEUE_FULL);
  CHECK_MSG("max_queue_size");
  CHECK_MSG("the task was not created");
  CHECK(refused[0] == '\0');
  CHECK(count_tasks(tm) == 2);

  /* A struct from an older header, ending before `start`: still accepted,
   * `start` reads as 0 (whatever lies beyond struct_size), the task is pending. */
  echo_request(&r, "/data/old.png", 1);
  r.struct_size = offsetof(taskmgr_task_request, start);
  CHECK_RC(taskmgr_create_task(tm, &r, old), TASKMGR_OK);
  CHECK(task_status(tm, old) == TASKMGR_TASK_PENDING);

  echo_open_gate();
  CHECK(wait_completed(tm, blocker));
  CHECK(wait_completed(tm, id));
  CHECK(task_status(tm, old) == TASKMGR_TASK_PENDING);
  CHECK_RC(taskmgr_start_task(tm, old, NULL), TASKMGR_OK);
  CHECK(wait_completed(tm, old));

  /* Events: "created" then "queued", in one step, then the run. */
  CHECK_RC(taskmgr_get_task_events(tm, id, &json), TASKMGR_OK);
  if (json != NULL) {
    const char* first = strstr(json, "\"event_type\":");
    const char* second = first ? strstr(first + 1, "\"event_type\":") : NULL;
    CHECK(first != NULL && strncmp(first, "\"event_type\":\"created\"", 22) == 0);
    CHECK(second != NULL && strncmp(second, "\"event_type\":\"queued\"", 21) == 0);
    CHECK(strstr(json, "\"event_type\":\"cleanup_completed\"") != NULL);
  }
  taskmgr_free(json);
  CHECK_RC(taskmgr_get_task_metrics(tm, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"tasks_completed\":3") != NULL);
  taskmgr_free(json);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

/* A taskmgr_task_request as a caller built against an older header sees it:
 * the same fields, without `start`. */
typedef struct old_task_request {
  size_t struct_size;
  const char* service;
  const char* input_path;
  const void* input_data;
  size_t input_size;
  const char* media_type;
  int32_t priority;
  int32_t batch_size;
  const char* device;
  const char* options_json;
} old_task_request;

static void test_create_tasks(void) {
  taskmgr_manager* tm = open_one_worker("  max_queue_size: 2\n");
  taskmgr_task_request reqs[3];
  old_task_request olds[2];
  char ids[3][TASKMGR_TASK_ID_SIZE], untouched[3][TASKMGR_TASK_ID_SIZE];
  char blocker[TASKMGR_TASK_ID_SIZE];
  char* json = NULL;
  int i, n;
  if (tm == NULL) return;
  echo_reset();
  memset(untouched, 'x', sizeof untouched);

  /* Nothing to do: OK, nothing written; the arrays may then be NULL. */
  memcpy(ids, untouched, sizeof ids);
  CHECK_RC(taskmgr_create_tasks(tm, NULL, 0, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 0, ids), TASKMGR_OK);
  CHECK(memcmp(ids, untouched, sizeof ids) == 0);
  CHECK(count_tasks(tm) == 0);

  /* NULL arguments, named. */
  for (i = 0; i < 3; ++i) echo_request(&reqs[i], "/data/m.png", 0);
  CHECK_RC(taskmgr_create_tasks(NULL, reqs, 3, ids), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("taskmgr_create_tasks: manager is NULL");
  CHECK_RC(taskmgr_create_tasks(tm, NULL, 3, ids), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("taskmgr_create_tasks: requests is NULL");
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("taskmgr_create_tasks: out_task_ids is NULL");
  CHECK(memcmp(ids, untouched, sizeof ids) == 0);
  CHECK(count_tasks(tm) == 0);

  /* Three at once, with the worker held: the first and last start (queued
   * right away), the middle one stays pending. Ids distinct, in request order. */
  hold_the_worker(tm, blocker);
  echo_request(&reqs[0], "/data/m0.png", 1);
  echo_request(&reqs[1], "/data/m1.png", 0);
  echo_request(&reqs[2], "/data/m2.png", 1);
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, ids), TASKMGR_OK);
  CHECK(strcmp(taskmgr_last_error(), "") == 0);
  for (i = 0; i < 3; ++i) {
    char path[32];
    CHECK(strlen(ids[i]) == 36);
    snprintf(path, sizeof path, "\"/data/m%d.png\"", i);
    CHECK_RC(taskmgr_get_task(tm, ids[i], &json), TASKMGR_OK);
    CHECK(json != NULL && strstr(json, path) != NULL);
    taskmgr_free(json);
  }
  CHECK(strcmp(ids[0], ids[1]) < 0 && strcmp(ids[1], ids[2]) < 0); /* time-ordered ids */
  CHECK(task_status(tm, ids[0]) == TASKMGR_TASK_QUEUED);
  CHECK(task_status(tm, ids[1]) == TASKMGR_TASK_PENDING);
  CHECK(task_status(tm, ids[2]) == TASKMGR_TASK_QUEUED);
  CHECK(count_tasks(tm) == 4);

  /* All or none. The queue holds 2 and has 2: one more that starts does
   * not fit, so none of the three is created; the ids are left untouched. */
  memcpy(ids, untouched, sizeof ids);
  echo_request(&reqs[0], "/data/n0.png", 0);
  echo_request(&reqs[1], "/data/n1.png", 1);
  echo_request(&reqs[2], "/data/n2.png", 0);
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, ids), TASKMGR_E_QUEUE_FULL);
  CHECK_MSG("max_queue_size");
  CHECK_MSG("no task was created");
  CHECK(memcmp(ids, untouched, sizeof ids) == 0);
  CHECK(count_tasks(tm) == 4);

  /* An invalid request at index 1, caught by the C layer or by the library:
   * named by index, nothing created, ids untouched. */
  reqs[1].start = 0;
  reqs[1].batch_size = -1;
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, ids), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("taskmgr_create_tasks: request 1: batch_size");
  CHECK_MSG("no task was created");
  reqs[1].batch_size = 0;
  reqs[1].options_json = "[1, 2]";
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, ids), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("request 1: ");
  CHECK_MSG("object");
  CHECK_MSG("no task was created");
  reqs[1].options_json = NULL;
  reqs[1].service = "no-such-service";
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, ids), TASKMGR_E_NOT_FOUND);
  CHECK_MSG("request 1: ");
  CHECK_MSG("no-such-service");
  reqs[1].service = "echo";
  reqs[1].input_data = "abc";
  reqs[1].input_size = 3;
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, ids), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("request 1: give input_path or input_data, not both");
  reqs[1].input_data = NULL;
  reqs[1].input_size = 0;
  /* Every element carries requests[0].struct_size: the array is strided by it. */
  reqs[1].struct_size = 0;
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, ids), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("request 1: struct_size is 0");
  CHECK_MSG("taskmgr_task_request_init");
  reqs[1].struct_size = sizeof reqs[1];
  reqs[0].struct_size = sizeof reqs[0] + 64; /* a newer header than the library */
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, ids), TASKMGR_E_INCOMPATIBLE);
  CHECK_MSG("newer");
  reqs[0].struct_size = 0;
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, ids), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("struct_size");
  reqs[0].struct_size = 2; /* cannot be an element's size: not read as a stride */
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, ids), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("struct_size is 2");
  reqs[0].struct_size = sizeof reqs[0];
  CHECK(memcmp(ids, untouched, sizeof ids) == 0);
  CHECK(count_tasks(tm) == 4);

  /* A single request: the message is taskmgr_create_task's (no index). */
  reqs[0].batch_size = -1;
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 1, ids), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("taskmgr_create_tasks: batch_size");
  reqs[0].batch_size = 0;

  /* Fixed (and none starting), all three are created, pending. */
  CHECK_RC(taskmgr_create_tasks(tm, reqs, 3, ids), TASKMGR_OK);
  CHECK(task_status(tm, ids[0]) == TASKMGR_TASK_PENDING);
  CHECK(task_status(tm, ids[1]) == TASKMGR_TASK_PENDING);
  CHECK(task_status(tm, ids[2]) == TASKMGR_TASK_PENDING);
  CHECK(count_tasks(tm) == 7);

  /* An array built with an older header (no `start`): strided by its own
   * struct_size, every task pending. */
  CHECK(sizeof(old_task_request) == offsetof(taskmgr_task_request, start));
  memset(olds, 0, sizeof olds);
  for (i = 0; i < 2; ++i) {
    olds[i].struct_size = sizeof olds[i];
    olds[i].service = "echo";
    olds[i].input_path = i == 0 ? "/data/old0.png" : "/data/old1.png";
    olds[i].priority = 3 + i;
  }
  CHECK_RC(taskmgr_create_tasks(tm, (const taskmgr_task_request*)(const void*)olds, 2, ids),
           TASKMGR_OK);
  for (i = 0; i < 2; ++i) {
    CHECK(task_status(tm, ids[i]) == TASKMGR_TASK_PENDING);
    CHECK_RC(taskmgr_get_task(tm, ids[i], &json), TASKMGR_OK);
    CHECK(json != NULL && strstr(json, i == 0 ? "/data/old0.png" : "/data/old1.png") != NULL);
    CHECK(json != NULL && strstr(json, i == 0 ? "\"priority\":3" : "\"priority\":4") != NULL);
    taskmgr_free(json);
  }
  CHECK(count_tasks(tm) == 9);

  /* Everything runs to completion once the worker is free. */
  echo_open_gate();
  CHECK_RC(taskmgr_wait_idle(tm, 30), TASKMGR_OK);
  CHECK_RC(taskmgr_list_tasks(tm, "pending", NULL, 0, &json), TASKMGR_OK);
  n = 0;
  if (json != NULL) {
    const char* p;
    for (p = json; (p = strstr(p, "\"id\":\"")) != NULL; ++p) {
      char pid[TASKMGR_TASK_ID_SIZE];
      memcpy(pid, p + 6, 36);
      pid[36] = '\0';
      CHECK_RC(taskmgr_start_task(tm, pid, NULL), TASKMGR_OK);
      CHECK(wait_completed(tm, pid));
      ++n;
    }
  }
  taskmgr_free(json);
  CHECK(n == 6); /* m1, n0..n2, old0, old1 */
  CHECK_RC(taskmgr_list_tasks(tm, "completed", "echo", 0, &json), TASKMGR_OK);
  n = 0;
  if (json != NULL) {
    const char* p;
    for (p = json; (p = strstr(p, "\"id\":\"")) != NULL; ++p) ++n;
  }
  taskmgr_free(json);
  CHECK(n == 9);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

/* ---- callbacks that call back ------------------------------------------------------ */

typedef struct reentrant {
  taskmgr_manager* tm;
  uint64_t self;
  int calls;
  int frees;
  int close_rc;
  int destroy_rc;
  int get_rc;
  int unsub_rc;
  int calls_after_unsubscribe;
  char close_message[256];
} reentrant;

static void unsubscribe_self(const taskmgr_event* e, void* user_data) {
  reentrant* r = (reentrant*)user_data;
  uint64_t self;
  int n;
  (void)e;
  pthread_mutex_lock(&mu);
  n = ++r->calls;
  self = r->self;
  pthread_mutex_unlock(&mu);
  if (n == 1) {
    int rc = taskmgr_unsubscribe(r->tm, self);
    pthread_mutex_lock(&mu);
    r->unsub_rc = rc;
    pthread_mutex_unlock(&mu);
  } else {
    pthread_mutex_lock(&mu);
    ++r->calls_after_unsubscribe;
    pthread_mutex_unlock(&mu);
  }
}

static void close_from_callback(const taskmgr_event* e, void* user_data) {
  reentrant* r = (reentrant*)user_data;
  char* json = NULL;
  int close_rc, destroy_rc, get_rc;
  if (e->event != TASKMGR_EVENT_CREATED) return;
  close_rc = taskmgr_close(r->tm);
  pthread_mutex_lock(&mu);
  snprintf(r->close_message, sizeof r->close_message, "%s", taskmgr_last_error());
  pthread_mutex_unlock(&mu);
  destroy_rc = taskmgr_destroy(r->tm);
  get_rc = taskmgr_get_task(r->tm, e->task_id, &json); /* other calls work */
  taskmgr_free(json);
  pthread_mutex_lock(&mu);
  ++r->calls;
  r->close_rc = close_rc;
  r->destroy_rc = destroy_rc;
  r->get_rc = get_rc;
  pthread_mutex_unlock(&mu);
}

static void count_reentrant_free(void* user_data) {
  reentrant* r = (reentrant*)user_data;
  pthread_mutex_lock(&mu);
  ++r->frees;
  pthread_mutex_unlock(&mu);
}

typedef struct log_capture {
  taskmgr_manager* tm;
  int messages;
  int close_rc;
  int levels_ok;
} log_capture;

static void capture_log(int level, const char* message, void* user_data) {
  log_capture* c = (log_capture*)user_data;
  int rc = TASKMGR_OK;
  taskmgr_manager* tm;
  pthread_mutex_lock(&mu);
  tm = c->tm;
  pthread_mutex_unlock(&mu);
  if (tm != NULL) rc = taskmgr_close(tm);
  pthread_mutex_lock(&mu);
  ++c->messages;
  if (tm != NULL) c->close_rc = rc;
  if (level < TASKMGR_LOG_TRACE || level > TASKMGR_LOG_ERROR || message == NULL) c->levels_ok = 0;
  pthread_mutex_unlock(&mu);
}

static void test_reentrant_callbacks(void) {
  taskmgr_manager* tm;
  char id[TASKMGR_TASK_ID_SIZE];
  reentrant a, b;
  log_capture lc;
  taskmgr_open_options o;
  uint64_t sub_b = 0;
  int i;
  memset(&a, 0, sizeof a);
  memset(&b, 0, sizeof b);
  memset(&lc, 0, sizeof lc);
  lc.levels_ok = 1;
  lc.close_rc = TASKMGR_OK;

  taskmgr_open_options_init(&o);
  o.config_yaml = kConfig;
  o.log_callback = capture_log;
  o.log_user_data = &lc;
  o.log_free = count_free;
  log_frees = 0;
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_OK);
  if (tm == NULL) return;
  CHECK_RC(register_echo(tm), TASKMGR_OK);
  echo_reset();
  a.tm = tm;
  b.tm = tm;

  pthread_mutex_lock(&mu); /* the callback reads a.self: set it before any event */
  CHECK_RC(taskmgr_subscribe(tm, unsubscribe_self, &a, count_reentrant_free, &a.self), TASKMGR_OK);
  pthread_mutex_unlock(&mu);
  CHECK_RC(taskmgr_subscribe(tm, close_from_callback, &b, count_reentrant_free, &sub_b),
           TASKMGR_OK);
  for (i = 0; i < 3; ++i) {
    CHECK_RC(create_echo(tm, "/data/a.png", NULL, NULL, id), TASKMGR_OK);
    CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
    CHECK_RC(taskmgr_wait_task(tm, id, 30, NULL), TASKMGR_OK);
  }
  CHECK_RC(taskmgr_flush_events(tm), TASKMGR_OK);
  pthread_mutex_lock(&mu);
  /* The self-unsubscribing callback ran once, then never again, and its
   * user data was freed once, after it returned. */
  CHECK(a.calls == 1);
  CHECK(a.calls_after_unsubscribe == 0);
  CHECK(a.unsub_rc == TASKMGR_OK);
  CHECK(a.frees == 1);
  /* close and destroy from a callback: refused, no deadlock; other calls work. */
  CHECK(b.calls == 3);
  CHECK(b.close_rc == TASKMGR_E_INVALID_STATE);
  CHECK(b.destroy_rc == TASKMGR_E_INVALID_STATE);
  CHECK(b.get_rc == TASKMGR_OK);
  CHECK(strstr(b.close_message, "callback") != NULL);
  pthread_mutex_unlock(&mu);

  /* The manager still works after the refused close. */
  CHECK_RC(create_echo(tm, "/data/a.png", NULL, NULL, id), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, NULL), TASKMGR_OK);

  /* A log callback that tries to close the manager: refused. Running out
   * of memory logs a warning (on a worker thread). */
  pthread_mutex_lock(&mu);
  lc.tm = tm;
  pthread_mutex_unlock(&mu);
  CHECK_RC(create_echo(tm, "/data/a.png", "{\"memory\":999999}", NULL, id), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 30, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_flush_events(tm), TASKMGR_OK);
  pthread_mutex_lock(&mu);
  CHECK(lc.messages >= 1);
  CHECK(lc.close_rc == TASKMGR_E_INVALID_STATE);
  CHECK(lc.levels_ok);
  lc.tm = NULL;
  pthread_mutex_unlock(&mu);
  CHECK_RC(taskmgr_create_task(tm, NULL, id), TASKMGR_E_INVALID_ARGUMENT); /* still open */

  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
  CHECK(b.frees == 1); /* the remaining subscription is freed by destroy */
  CHECK(a.frees == 1);
  CHECK(log_frees == 1);
}

/* ---- closing with tasks running ---------------------------------------------------- */

static void* open_gate_later(void* arg) {
  (void)arg;
  sleep_ms(100);
  echo_open_gate();
  return NULL;
}

/* A task's outcome the database cannot take (storage.max_size_mb: 1, a
 * 2 MiB result): the task completes in memory, the update waits in the
 * backlog, and taskmgr_close says so with its own status, the count and
 * the store's message; taskmgr_destroy frees the handle and says it too. */
static void test_close_unpersisted(const char* db_path) {
  taskmgr_open_options o;
  taskmgr_manager* tm = NULL;
  char id[TASKMGR_TASK_ID_SIZE];
  char wal[640]; /* db_path (< 600) and "-wal" */
  int status = -1;

  remove(db_path);
  snprintf(wal, sizeof wal, "%s-wal", db_path);
  remove(wal);
  taskmgr_open_options_init(&o);
  o.config_yaml =
      "devices: {probe_cpu: false, probe_nvidia: false, cpu_memory_mb: 4000}\n"
      "storage: {max_size_mb: 1}\n";
  o.database_path = db_path;
  o.worker_threads = 1;
  o.log_callback = ignore_log;
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_OK);
  if (tm == NULL) return;
  echo_reset();
  CHECK_RC(register_echo(tm), TASKMGR_OK);
  CHECK_RC(create_echo(tm, "/data/big.png", "{\"big_result\":true}", "cpu", id), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK(wait_completed(tm, id)); /* in memory: the manager ran it */
  CHECK_RC(taskmgr_close(tm), TASKMGR_E_UNPERSISTED);
  CHECK_MSG("not in the store");
  CHECK_MSG("full");
  CHECK(strcmp(taskmgr_status_name(TASKMGR_E_UNPERSISTED), "unpersisted") == 0);
  /* Reads still answer with the task's latest state, persisted or not. */
  CHECK_RC(taskmgr_get_task_status(tm, id, &status, NULL), TASKMGR_OK);
  CHECK(status == TASKMGR_TASK_COMPLETED);
  CHECK_RC(taskmgr_close(tm), TASKMGR_E_UNPERSISTED);   /* still not in: said again */
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_E_UNPERSISTED); /* freed all the same */
  CHECK_MSG("not in the store");
  remove(db_path);
  remove(wal);
}

static void test_close_with_tasks(const char* db_path) {
  taskmgr_open_options o;
  taskmgr_manager* tm = NULL;
  char running[TASKMGR_TASK_ID_SIZE], queued[TASKMGR_TASK_ID_SIZE];
  char* json = NULL;
  int status = -1;
  pthread_t t;

  remove(db_path);
  taskmgr_open_options_init(&o);
  o.config_yaml = kConfig;
  o.database_path = db_path;
  o.worker_threads = 1;
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_OK);
  if (tm == NULL) return;
  CHECK_RC(register_echo(tm), TASKMGR_OK);
  echo_reset();
  pthread_mutex_lock(&mu);
  echo.gate_closed = 1;
  pthread_mutex_unlock(&mu);

  CHECK_RC(create_echo(tm, "/data/running.png", NULL, NULL, running), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, running, NULL), TASKMGR_OK);
  while (echo_running() < 1) sleep_ms(1);
  CHECK_RC(create_echo(tm, "/data/queued.png", NULL, NULL, queued), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, queued, NULL), TASKMGR_OK);

  /* close() waits for the running task (released 100 ms from now); the
   * queued one stays queued, in the store. */
  pthread_create(&t, NULL, open_gate_later, NULL);
  CHECK_RC(taskmgr_close(tm), TASKMGR_OK);
  pthread_join(t, NULL);
  CHECK_RC(taskmgr_get_task_status(tm, running, &status, NULL), TASKMGR_OK);
  CHECK(status == TASKMGR_TASK_COMPLETED);
  CHECK_RC(taskmgr_get_task_status(tm, queued, &status, NULL), TASKMGR_OK);
  CHECK(status == TASKMGR_TASK_QUEUED);
  /* After close: writes refused, reads allowed, a second close is a no-op. */
  CHECK_RC(create_echo(tm, "/data/late.png", NULL, NULL, running), TASKMGR_E_INVALID_STATE);
  CHECK_MSG("closed");
  CHECK_RC(taskmgr_list_tasks(tm, NULL, NULL, 0, &json), TASKMGR_OK);
  taskmgr_free(json);
  CHECK_RC(taskmgr_close(tm), TASKMGR_OK);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);

  /* Reopened on the same database, the queued task runs once its service
   * is registered again: nothing accepted is lost. */
  tm = NULL;
  CHECK_RC(taskmgr_open(&o, &tm), TASKMGR_OK);
  if (tm == NULL) return;
  CHECK_RC(taskmgr_get_task_status(tm, queued, &status, NULL), TASKMGR_OK);
  CHECK(status == TASKMGR_TASK_QUEUED);
  CHECK_RC(register_echo(tm), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, queued, 30, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"status\":\"completed\"") != NULL);
  taskmgr_free(json);
  /* A second manager on the same database is refused while this one holds it. */
  {
    taskmgr_manager* other = (taskmgr_manager*)0x1;
    CHECK_RC(taskmgr_open(&o, &other), TASKMGR_E_BUSY);
    CHECK(other == NULL);
  }
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
  remove(db_path);
}

/* ---- the built-in OCR service on a real page ----------------------------------------- */

/* taskmgr_describe_document: a one-page PDF written here (no content, a
 * US-letter page box), an encrypted one, a missing file, bad arguments. */
static void write_file(const char* path, const char* content) {
  FILE* f = fopen(path, "wb");
  CHECK(f != NULL);
  if (f == NULL) return;
  fputs(content, f);
  fclose(f);
}

static void test_describe_document(void) {
  const char* pdf_path = "/tmp/taskmgr-c-api-describe.pdf";
  const char* locked_path = "/tmp/taskmgr-c-api-describe-locked.pdf";
  char* json = (char*)0x1;
  write_file(pdf_path,
             "%PDF-1.4\n1 0 obj <</Type/Catalog/Pages 2 0 R>> endobj\n"
             "2 0 obj <</Type/Pages/Kids[3 0 R]/Count 1>> endobj\n"
             "3 0 obj <</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>> endobj\n"
             "trailer <</Root 1 0 R/Size 4>>\n%%EOF\n");
  write_file(locked_path,
             "%PDF-1.4\n1 0 obj <</Type/Catalog/Pages 2 0 R>> endobj\n"
             "2 0 obj <</Type/Pages/Kids[3 0 R]/Count 1>> endobj\n"
             "3 0 obj <</Type/Page/Parent 2 0 R/MediaBox[0 0 612 792]>> endobj\n"
             "4 0 obj <</Filter/Standard/V 1/R 2/Length 40"
             "/O <00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff>"
             "/U <00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff>/P -4>> endobj\n"
             "trailer <</Root 1 0 R/Encrypt 4 0 R/ID[<0123456789abcdef0123456789abcdef>"
             "<0123456789abcdef0123456789abcdef>]/Size 5>>\n%%EOF\n");
  CHECK_RC(taskmgr_describe_document(pdf_path, 300, &json), TASKMGR_OK);
  CHECK(json != NULL && strcmp(json,
                               "{\"media_type\":\"application/pdf\",\"pages\":[{\"page\":1,"
                               "\"width\":2550,\"height\":3300}]}") == 0);
  taskmgr_free(json);
  CHECK_RC(taskmgr_describe_document(pdf_path, 72, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"width\":612,\"height\":792") != NULL);
  taskmgr_free(json);
  json = (char*)0x1;
  CHECK_RC(taskmgr_describe_document(locked_path, 300, &json), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("encrypted");
  CHECK_MSG(locked_path);
  CHECK(json == NULL);
  CHECK_RC(taskmgr_describe_document("/no/such/doc.pdf", 300, &json), TASKMGR_E_NOT_FOUND);
  CHECK_MSG("/no/such/doc.pdf");
  CHECK_RC(taskmgr_describe_document(pdf_path, 71, &json), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("dpi");
  CHECK_RC(taskmgr_describe_document(pdf_path, 1201, &json), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_describe_document(NULL, 300, &json), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("taskmgr_describe_document: path");
  CHECK_RC(taskmgr_describe_document(pdf_path, 300, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("taskmgr_describe_document: out_json");
  CHECK_RC(taskmgr_describe_document("/tmp/\xff.pdf", 300, &json), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("path is not valid UTF-8 (byte 5)");
  remove(pdf_path);
  remove(locked_path);
}

static void test_ocr_page(const char* page) {
  taskmgr_manager* tm = NULL;
  taskmgr_task_request r;
  char id[TASKMGR_TASK_ID_SIZE];
  char* result = NULL;
  int status = -1, reason = -1;
  if (page == NULL) {
    printf("c_api: no OCR page given (argv[1]); OCR test skipped\n");
    return;
  }
  CHECK_RC(taskmgr_open_yaml(kConfig, &tm), TASKMGR_OK);
  if (tm == NULL) return;
  taskmgr_task_request_init(&r);
  r.input_path = page;
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 120, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_get_task_status(tm, id, &status, &reason), TASKMGR_OK);
  CHECK(status == TASKMGR_TASK_COMPLETED);
  CHECK_RC(taskmgr_get_task_result(tm, id, &result), TASKMGR_OK);
  CHECK(result != NULL && strstr(result, "\"mean_confidence\"") != NULL);
  CHECK(result != NULL && strstr(result, "quick brown") != NULL);
  taskmgr_free(result);
  /* A missing file fails the task INVALID_INPUT, naming the file. */
  r.input_path = "/no/such/page.png";
  CHECK_RC(taskmgr_create_task(tm, &r, id), TASKMGR_OK);
  CHECK_RC(taskmgr_start_task(tm, id, NULL), TASKMGR_OK);
  CHECK_RC(taskmgr_wait_task(tm, id, 120, &result), TASKMGR_OK);
  CHECK(result != NULL && strstr(result, "/no/such/page.png") != NULL);
  taskmgr_free(result);
  CHECK_RC(taskmgr_get_task_status(tm, id, &status, &reason), TASKMGR_OK);
  CHECK(status == TASKMGR_TASK_FAILED && reason == TASKMGR_REASON_INVALID_INPUT);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

/* The checker itself: it must refuse what a strict parser refuses. */
static void test_strict_json_checker(void) {
  static const char* good[] = {
      "{}",      "[]", "{\"a\":[1,-0.5e-3,true,false,null,\"\\u00e9\\ud83d\\ude00\"]}",
      " \"x\" ", "0",  "{\"\xc3\xa9\":1E+2}"};
  static const char* bad[] = {"",
                              "{\"a\":NaN}",
                              "{\"a\":Infinity}",
                              "[1,]",
                              "{'a':1}",
                              "[01]",
                              "[1.]",
                              "\"\\udc00\"",
                              "\"\\ud800\"",
                              "\"\xff\"",
                              "\"a\tb\"",
                              "{} x",
                              "[1e]",
                              "{\"a\" 1}",
                              "// c\n{}",
                              "\"\xed\xa0\x80\""};
  size_t i;
  for (i = 0; i < sizeof good / sizeof good[0]; ++i) {
    CHECK_ROW(strict_json_error(good[i], strlen(good[i])) < 0, i, good[i]);
  }
  for (i = 0; i < sizeof bad / sizeof bad[0]; ++i) {
    CHECK_ROW(strict_json_error(bad[i], strlen(bad[i])) >= 0, i, bad[i]);
  }
}

/* Pages of tasks, newest first, each task once; and deleting ended tasks. */
typedef struct control_log {
  int paused, resumed, bad;
} control_log;

static void record_control(const taskmgr_event* e, void* user_data) {
  control_log* log = (control_log*)user_data;
  pthread_mutex_lock(&mu);
  if (e->event == TASKMGR_EVENT_PAUSED || e->event == TASKMGR_EVENT_RESUMED) {
    /* Manager-level: no task; the details name the scope and the name. */
    if (e->task_id == NULL || e->task_id[0] != '\0' ||
        strstr(e->details_json, "\"scope\":\"service\"") == NULL ||
        strstr(e->details_json, "\"name\":\"echo\"") == NULL ||
        strict_json_error(e->json, strlen(e->json)) >= 0) {
      ++log->bad;
    }
    if (e->event == TASKMGR_EVENT_PAUSED) ++log->paused;
    if (e->event == TASKMGR_EVENT_RESUMED) ++log->resumed;
  }
  pthread_mutex_unlock(&mu);
}

/* taskmgr_pause / taskmgr_resume / taskmgr_paused: a paused kind's tasks stay
 * queued, resume runs them, each change is one manager-level event, and
 * every argument a caller can get wrong is refused by name. */
static void test_pauses(void) {
  taskmgr_manager* tm = open_one_worker(NULL);
  taskmgr_task_request r;
  char a[TASKMGR_TASK_ID_SIZE], b[TASKMGR_TASK_ID_SIZE];
  char* json = NULL;
  int changed = -1;
  control_log log;
  uint64_t sub = 0;
  if (tm == NULL) return;
  memset(&log, 0, sizeof log);
  CHECK_RC(taskmgr_subscribe(tm, record_control, &log, NULL, &sub), TASKMGR_OK);
  CHECK_RC(taskmgr_pause(tm, TASKMGR_PAUSE_SERVICE, "echo", &changed), TASKMGR_OK);
  CHECK(changed == 1);
  CHECK_RC(taskmgr_pause(tm, TASKMGR_PAUSE_SERVICE, "echo", &changed), TASKMGR_OK);
  CHECK(changed == 0); /* in force already */
  echo_request(&r, "/data/a.png", 1);
  CHECK_RC(taskmgr_create_task(tm, &r, a), TASKMGR_OK);
  echo_request(&r, "/data/b.png", 1);
  CHECK_RC(taskmgr_create_task(tm, &r, b), TASKMGR_OK);
  sleep_ms(50);
  CHECK(task_status(tm, a) == TASKMGR_TASK_QUEUED);
  CHECK(task_status(tm, b) == TASKMGR_TASK_QUEUED);
  CHECK_RC(taskmgr_paused(tm, &json), TASKMGR_OK);
  CHECK(json != NULL && strict_json_error(json, strlen(json)) < 0 && json[0] == '[' &&
        strstr(json, "{\"scope\":\"service\",\"name\":\"echo\",\"since\":\"") != NULL);
  taskmgr_free(json);
  json = NULL;

  /* Refused, by name, changing nothing. */
  CHECK_RC(taskmgr_pause(tm, 7, "echo", &changed), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("scope must be");
  CHECK_RC(taskmgr_pause(tm, TASKMGR_PAUSE_DEVICE, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("device id");
  CHECK_RC(taskmgr_pause(tm, TASKMGR_PAUSE_DEVICE, "cuda:9", NULL), TASKMGR_E_NOT_FOUND);
  CHECK_MSG("unknown device");
  CHECK_RC(taskmgr_pause(tm, TASKMGR_PAUSE_MANAGER, "x", NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_pause(tm, TASKMGR_PAUSE_SERVICE, "\xff", NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_pause(NULL, TASKMGR_PAUSE_MANAGER, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_paused(tm, NULL), TASKMGR_E_INVALID_ARGUMENT);

  CHECK_RC(taskmgr_resume(tm, TASKMGR_PAUSE_SERVICE, "echo", &changed), TASKMGR_OK);
  CHECK(changed == 1);
  CHECK_RC(taskmgr_resume(tm, TASKMGR_PAUSE_SERVICE, "echo", &changed), TASKMGR_OK);
  CHECK(changed == 0);
  CHECK(wait_completed(tm, a));
  CHECK(wait_completed(tm, b));
  CHECK_RC(taskmgr_paused(tm, &json), TASKMGR_OK);
  CHECK(json != NULL && strcmp(json, "[]") == 0);
  taskmgr_free(json);
  CHECK_RC(taskmgr_flush_events(tm), TASKMGR_OK);
  pthread_mutex_lock(&mu);
  CHECK(log.paused == 1 && log.resumed == 1 && log.bad == 0);
  pthread_mutex_unlock(&mu);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

/* taskmgr_resize_pool: the sizes in force change (metrics say so), a larger
 * min is made in the background, each resize is one manager-level event,
 * and every argument a caller can get wrong is refused by name. */
static int resized_events;
static int resized_bad;
static void record_resized(const taskmgr_event* e, void* user_data) {
  (void)user_data;
  if (e->event != TASKMGR_EVENT_POOL_RESIZED) return;
  pthread_mutex_lock(&mu);
  ++resized_events;
  if (e->task_id == NULL || e->task_id[0] != '\0' ||
      strstr(e->details_json, "\"service\":\"echo\"") == NULL ||
      strstr(e->details_json, "\"device\":\"cpu\"") == NULL ||
      strstr(e->details_json, "\"min_instances\":2") == NULL ||
      strstr(e->details_json, "\"max_instances\":3") == NULL ||
      strstr(e->details_json, "\"previous_max_instances\":") == NULL ||
      strict_json_error(e->json, strlen(e->json)) >= 0) {
    ++resized_bad;
  }
  pthread_mutex_unlock(&mu);
}

static void test_resize_pool(void) {
  taskmgr_manager* tm = open_one_worker(NULL);
  char* json = NULL;
  int before_min = -1, before_max = -1, warmed = 0, i;
  uint64_t sub = 0;
  if (tm == NULL) return;
  resized_events = resized_bad = 0;
  CHECK_RC(taskmgr_subscribe(tm, record_resized, NULL, NULL, &sub), TASKMGR_OK);
  CHECK_RC(taskmgr_resize_pool(tm, "echo", "cpu", 2, 3, &before_min, &before_max), TASKMGR_OK);
  CHECK(before_min == 0 && before_max == 1); /* one worker: the cpu's auto max */
  for (i = 0; i < 500 && !warmed; ++i) {     /* made in the background */
    CHECK_RC(taskmgr_get_task_metrics(tm, &json), TASKMGR_OK);
    warmed = json != NULL && strstr(json, "\"echo@cpu\":{") != NULL &&
             strstr(strstr(json, "\"echo@cpu\":{"), "\"size\":2,\"max\":3,\"min\":2") != NULL;
    taskmgr_free(json);
    json = NULL;
    if (!warmed) sleep_ms(10);
  }
  CHECK(warmed);

  CHECK_RC(taskmgr_resize_pool(tm, NULL, "cpu", 0, 1, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("service is NULL");
  CHECK_RC(taskmgr_resize_pool(tm, "echo", NULL, 0, 1, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("device is NULL");
  CHECK_RC(taskmgr_resize_pool(tm, "nope", "cpu", 0, 1, NULL, NULL), TASKMGR_E_NOT_FOUND);
  CHECK_MSG("service 'nope' is not registered");
  CHECK_RC(taskmgr_resize_pool(tm, "echo", "cuda:9", 0, 1, NULL, NULL), TASKMGR_E_NOT_FOUND);
  CHECK_MSG("unknown device 'cuda:9'");
  CHECK_RC(taskmgr_resize_pool(tm, "echo", "cpu", 2, 1, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("0 <= min_instances <= max_instances");
  CHECK_RC(taskmgr_resize_pool(tm, "echo", "cpu", 0, 0, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_resize_pool(tm, "\xff", "cpu", 0, 1, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_resize_pool(NULL, "echo", "cpu", 0, 1, NULL, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_RC(taskmgr_flush_events(tm), TASKMGR_OK);
  pthread_mutex_lock(&mu);
  CHECK(resized_events == 1 && resized_bad == 0); /* the refused ones sent none */
  pthread_mutex_unlock(&mu);
  CHECK_RC(taskmgr_close(tm), TASKMGR_OK);
  CHECK_RC(taskmgr_resize_pool(tm, "echo", "cpu", 0, 1, NULL, NULL), TASKMGR_E_INVALID_STATE);
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

static void test_paging_and_delete(void) {
  taskmgr_manager* tm = open_one_worker(NULL);
  taskmgr_task_request r;
  taskmgr_list_params lp;
  char ids[25][TASKMGR_TASK_ID_SIZE], pending[TASKMGR_TASK_ID_SIZE];
  char *json = NULL, *next = NULL, *before = NULL;
  int i, pages = 0, seen = 0, order_ok = 1;
  event_log log;
  uint64_t sub = 0;
  if (tm == NULL) return;
  echo_reset();
  memset(&log, 0, sizeof log);
  CHECK_RC(taskmgr_subscribe(tm, record_event, &log, NULL, &sub), TASKMGR_OK);
  for (i = 0; i < 25; ++i) {
    echo_request(&r, "/data/page.png", 1);
    CHECK_RC(taskmgr_create_task(tm, &r, ids[i]), TASKMGR_OK);
  }
  CHECK_RC(taskmgr_wait_idle(tm, 30), TASKMGR_OK);
  for (i = 0; i < 25; ++i) CHECK(wait_completed(tm, ids[i]));
  echo_request(&r, "/data/pending.png", 0);
  CHECK_RC(taskmgr_create_task(tm, &r, pending), TASKMGR_OK);

  /* Pages of 10 of the completed ones: 10, 10, 5, newest first, the cursor
   * NULL after the last. */
  taskmgr_list_params_init(&lp);
  CHECK(lp.struct_size == sizeof lp && lp.limit == 0 && lp.before == NULL);
  lp.status = "completed";
  lp.limit = 10;
  do {
    const char* p;
    lp.before = before;
    CHECK_RC(taskmgr_list_tasks_page(tm, &lp, &json, &next), TASKMGR_OK);
    if (json == NULL) break;
    for (p = json; (p = strstr(p, "\"id\":\"")) != NULL; p += 6) {
      /* Newest first: the seen-th task listed is ids[24 - seen]. */
      if (seen >= 25 || strncmp(p + 6, ids[24 - seen], 36) != 0) order_ok = 0;
      ++seen;
    }
    CHECK(strstr(json, "\"result\":null") != NULL); /* no results unless asked */
    ++pages;
    taskmgr_free(json);
    json = NULL;
    taskmgr_free(before);
    before = next;
    next = NULL;
  } while (before != NULL && pages < 10);
  CHECK(pages == 3);
  CHECK(seen == 25);
  CHECK(order_ok);
  /* All statuses, results too, and no cursor asked for. */
  taskmgr_list_params_init(&lp);
  lp.with_results = 1;
  CHECK_RC(taskmgr_list_tasks_page(tm, &lp, &json, NULL), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, pending) != NULL && strstr(json, "\"result\":{") != NULL);
  CHECK(json != NULL && strncmp(json + 8, pending, 36) == 0); /* [{"id":"<newest>" */
  taskmgr_free(json);
  json = NULL;
  /* Bad parameters name themselves and return nothing. */
  lp.limit = 10001;
  next = (char*)1;
  CHECK_RC(taskmgr_list_tasks_page(tm, &lp, &json, &next), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("limit");
  CHECK(json == NULL && next == NULL);
  lp.limit = 0;
  lp.before = "yesterday";
  CHECK_RC(taskmgr_list_tasks_page(tm, &lp, &json, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("yesterday");
  lp.before = "99999999999999999999_x"; /* out of range */
  CHECK_RC(taskmgr_list_tasks_page(tm, &lp, &json, NULL), TASKMGR_E_INVALID_ARGUMENT);
  lp.before = NULL;
  lp.status = "finished";
  CHECK_RC(taskmgr_list_tasks_page(tm, &lp, &json, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("finished");
  lp.status = NULL;
  lp.struct_size = 0;
  CHECK_RC(taskmgr_list_tasks_page(tm, &lp, &json, NULL), TASKMGR_E_INVALID_ARGUMENT);
  CHECK_MSG("struct_size");

  /* A waiting task's priority changes; an ended one's is refused. */
  CHECK_RC(taskmgr_set_task_priority(tm, pending, 9), TASKMGR_OK);
  CHECK_RC(taskmgr_get_task(tm, pending, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"priority\":9") != NULL);
  taskmgr_free(json);
  json = NULL;
  CHECK_RC(taskmgr_get_task_events(tm, pending, &json), TASKMGR_OK);
  CHECK(json != NULL && strstr(json, "\"event_type\":\"priority_changed\"") != NULL);
  CHECK(json != NULL && strstr(json, "\"from\":0,\"to\":9,\"while\":\"pending\"") != NULL);
  taskmgr_free(json);
  json = NULL;
  CHECK_RC(taskmgr_set_task_priority(tm, ids[3], 1), TASKMGR_E_INVALID_STATE);
  CHECK_MSG("completed");
  CHECK_RC(taskmgr_set_task_priority(tm, "no-such-task", 1), TASKMGR_E_NOT_FOUND);

  /* Retry: a cancelled task runs again, with new parameters; a completed
   * one is refused. */
  {
    char again[TASKMGR_TASK_ID_SIZE];
    taskmgr_start_params sp;
    echo_request(&r, "/data/again.png", 0);
    CHECK_RC(taskmgr_create_task(tm, &r, again), TASKMGR_OK);
    CHECK_RC(taskmgr_cancel_task(tm, again, NULL), TASKMGR_OK);
    taskmgr_start_params_init(&sp);
    sp.set_priority = 1;
    sp.priority = 3;
    CHECK_RC(taskmgr_retry_task(tm, again, &sp), TASKMGR_OK);
    CHECK(wait_completed(tm, again));
    CHECK_RC(taskmgr_get_task_events(tm, again, &json), TASKMGR_OK);
    CHECK(json != NULL && strstr(json, "\"reason\":\"host\"") != NULL);
    CHECK(json != NULL && strstr(json, "\"event_type\":\"cancelled\"") != NULL);
    taskmgr_free(json);
    json = NULL;
    CHECK_RC(taskmgr_retry_task(tm, again, NULL), TASKMGR_E_INVALID_STATE);
    CHECK_MSG("only a failed or cancelled task");
    CHECK_RC(taskmgr_retry_task(tm, "no-such-task", NULL), TASKMGR_E_NOT_FOUND);
    CHECK_RC(taskmgr_delete_task(tm, again), TASKMGR_OK);
  }

  /* Delete: an ended task goes with its events; a pending one is refused. */
  CHECK_RC(taskmgr_delete_task(tm, pending), TASKMGR_E_INVALID_STATE);
  CHECK_MSG("pending");
  CHECK_RC(taskmgr_delete_task(tm, ids[0]), TASKMGR_OK);
  CHECK_RC(taskmgr_delete_task(tm, ids[0]), TASKMGR_E_NOT_FOUND);
  CHECK_RC(taskmgr_get_task(tm, ids[0], &json), TASKMGR_E_NOT_FOUND);
  CHECK_RC(taskmgr_get_task_events(tm, ids[0], &json), TASKMGR_E_NOT_FOUND);
  CHECK_RC(taskmgr_delete_task(tm, "no-such-task"), TASKMGR_E_NOT_FOUND);
  CHECK(count_tasks(tm) == 25);
  CHECK_RC(taskmgr_flush_events(tm), TASKMGR_OK);
  CHECK(event_index(&log, "deleted", 0) >= 0);
  pthread_mutex_lock(&mu);
  CHECK(log.bad_pointers == 0 && log.out_of_order == 0);
  pthread_mutex_unlock(&mu);
  CHECK_RC(taskmgr_close(tm), TASKMGR_OK);
  CHECK_RC(taskmgr_delete_task(tm, ids[1]), TASKMGR_E_INVALID_STATE); /* closed */
  CHECK_RC(taskmgr_destroy(tm), TASKMGR_OK);
}

int main(int argc, char** argv) {
  const char* page = argc > 1 && argv[1][0] != '\0' ? argv[1] : NULL;
  char db_path[256];
  pthread_cond_init(&echo.cv, NULL);
  snprintf(db_path, sizeof db_path, "%s", argc > 2 ? argv[2] : "c_api_test.db");
  test_strict_json_checker();
  test_version();
  test_status_names();
  test_enum_names();
  test_config_defaults();
  test_config_values();
  test_config_errors();
  test_describe_document();
  test_free_null();
  test_null_arguments();
  test_open_errors();
  test_task_lifecycle();
  test_task_errors();
  test_oom_cpu_fallback();
  test_strict_text();
  test_process_status_table();
  test_no_input();
  test_status_rows();
  test_priority_saturates();
  test_waits_after_close();
  test_close_destroys_instances();
  test_thread_exit_in_callback();
  test_create_with_start();
  test_create_tasks();
  test_reentrant_callbacks();
  test_paging_and_delete();
  test_pauses();
  test_resize_pool();
  test_close_with_tasks(db_path);
  {
    char unpersisted_db[600];
    snprintf(unpersisted_db, sizeof unpersisted_db, "%s.full.db", db_path);
    test_close_unpersisted(unpersisted_db);
  }
  test_ocr_page(page);
  pthread_cond_destroy(&echo.cv);
  CHECK(bad_strings == 0);   /* every string returned was UTF-8, every document strict */
  CHECK(json_checked >= 50); /* the tests above saw every kind of document */
  if (failures != 0) {
    fprintf(stderr, "%d of %d checks failed\n", failures, checks);
    return 1;
  }
  printf("c_api: %d checks passed (%d strings returned, %d of them JSON, all strict)\n", checks,
         strings_checked, json_checked);
  return 0;
}
