/* A C host of taskmgr: OCRs the pages given on the command line with the
 * built-in "ocr" service, prints every event as it happens and each page's
 * text, then the metrics. Exit status 0 when every page was read, 1 when
 * some failed, 2 on a usage or library error.
 *
 *   taskmgr-c-example page1.png page2.tif ...
 *
 * Built by the project (examples/c) against the shared library; plain C99. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "taskmgr.h"

/* Runs on the manager's event thread: print and return quickly. */
static void print_event(const taskmgr_event* e, void* user_data) {
  ++*(int*)user_data; /* read after taskmgr_flush_events, which orders it */
  printf("  [event %3llu] ..%s %-18s %s\n", (unsigned long long)e->sequence, e->task_id + 28,
         e->event_type, e->details_json);
  fflush(stdout);
}

static int fail(const char* what, int status) {
  fprintf(stderr, "taskmgr-c-example: %s: %s (%s)\n", what, taskmgr_last_error(),
          taskmgr_status_name(status));
  return 2;
}

int main(int argc, char** argv) {
  taskmgr_open_options options;
  taskmgr_manager* tm = NULL;
  char(*ids)[TASKMGR_TASK_ID_SIZE];
  uint64_t subscription = 0;
  int i, rc, failed = 0, events = 0;
  char* json = NULL;

  if (argc < 2) {
    fprintf(stderr, "usage: %s PAGE...\n", argv[0]);
    return 2;
  }
  if (taskmgr_version_number() / 100 != TASKMGR_VERSION_NUMBER / 100) {
    fprintf(stderr, "taskmgr library %s does not match the header %s\n", taskmgr_version_string(),
            TASKMGR_VERSION_STRING);
    return 2;
  }

  taskmgr_open_options_init(&options);
  options.database_path = ":memory:"; /* a file here makes the tasks durable */
  options.worker_threads = 2;
  rc = taskmgr_open(&options, &tm);
  if (rc != TASKMGR_OK) return fail("open", rc);
  rc = taskmgr_subscribe(tm, print_event, &events, NULL, &subscription);
  if (rc != TASKMGR_OK) return fail("subscribe", rc);

  ids = calloc((size_t)argc, sizeof *ids);
  if (ids == NULL) return 2;
  for (i = 1; i < argc; ++i) {
    taskmgr_task_request request;
    taskmgr_task_request_init(&request);
    request.input_path = argv[i];
    request.options_json = "{\"words\": false}";
    rc = taskmgr_create_task(tm, &request, ids[i]);
    if (rc == TASKMGR_OK) rc = taskmgr_start_task(tm, ids[i], NULL);
    if (rc != TASKMGR_OK) {
      fprintf(stderr, "%s: not submitted: %s\n", argv[i], taskmgr_last_error());
      ids[i][0] = '\0';
      ++failed;
    }
  }

  for (i = 1; i < argc; ++i) {
    int status = 0, reason = 0;
    char* result = NULL;
    if (ids[i][0] == '\0') continue;
    rc = taskmgr_wait_task(tm, ids[i], -1, NULL);
    if (rc == TASKMGR_OK) rc = taskmgr_get_task_status(tm, ids[i], &status, &reason);
    if (rc != TASKMGR_OK) return fail(argv[i], rc);
    if (status != TASKMGR_TASK_COMPLETED) {
      char* task = NULL;
      taskmgr_get_task(tm, ids[i], &task);
      printf("%s: %s (%s)\n  %s\n", argv[i], taskmgr_task_status_name(status),
             taskmgr_failure_reason_name(reason), task ? task : "");
      taskmgr_free(task);
      ++failed;
      continue;
    }
    /* The result is JSON: {"text": ..., "mean_confidence": ..., "pages": [...]}. */
    taskmgr_get_task_result(tm, ids[i], &result);
    printf("%s: completed\n  %s\n", argv[i], result ? result : "");
    taskmgr_free(result);
  }

  taskmgr_flush_events(tm); /* every event delivered */
  printf("events: %d\n", events);
  if (taskmgr_get_task_metrics(tm, &json) == TASKMGR_OK) printf("metrics %s\n", json);
  taskmgr_free(json);
  free(ids);
  rc = taskmgr_destroy(tm); /* closes: waits for running tasks, frees the handle */
  if (rc != TASKMGR_OK) return fail("destroy", rc);
  return failed == 0 ? 0 : 1;
}
