/* The C ABI from plain C (C99), linked against the shared library.
 * Every check prints what failed and the test exits non-zero. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "taskmgr.h"

static int failures = 0;
static int checks = 0;

#define CHECK(cond)                                                   \
  do {                                                                \
    ++checks;                                                         \
    if (!(cond)) {                                                    \
      ++failures;                                                     \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                 \
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

static void test_free_null(void) { taskmgr_free(NULL); CHECK(1); }

int main(void) {
  test_version();
  test_status_names();
  test_config_defaults();
  test_config_values();
  test_config_errors();
  test_free_null();
  if (failures != 0) {
    fprintf(stderr, "%d of %d checks failed\n", failures, checks);
    return 1;
  }
  printf("c_api: %d checks passed\n", checks);
  return 0;
}
