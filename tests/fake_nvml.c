/* A stand-in for libnvidia-ml.so.1 for the device-discovery tests: it
 * exports the few NVML functions taskmgr loads, and answers from a state
 * file the test writes (and rewrites, to change memory in use or to take a
 * device away). The file is named by FAKE_NVML_STATE and read on every call;
 * one line per GPU, in NVML index order:
 *
 *   UUID TOTAL_MB USED_MB MIG     e.g.   GPU-0aa1 16000 1200 0
 *
 * Lines starting with '#' are skipped. FAKE_NVML_INIT=fail makes nvmlInit_v2
 * fail. Plain C, no dependency. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FAKE_MAX 16
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_UNKNOWN 999

typedef struct {
  unsigned long long total;
  unsigned long long free;
  unsigned long long used;
} nvmlMemory_t;

typedef struct {
  char uuid[96];
  unsigned long long total_mb;
  unsigned long long used_mb;
  int mig;
} fake_gpu;

static int fake_initialised = 0;

/* The GPUs the state file lists now; -1 when it cannot be read. */
static int fake_read(fake_gpu* out) {
  const char* path = getenv("FAKE_NVML_STATE");
  FILE* f;
  char line[256];
  int n = 0;
  if (path == NULL) return -1;
  f = fopen(path, "r");
  if (f == NULL) return -1;
  while (n < FAKE_MAX && fgets(line, sizeof line, f) != NULL) {
    fake_gpu g;
    if (line[0] == '#' || line[0] == '\n') continue;
    memset(&g, 0, sizeof g);
    if (sscanf(line, "%95s %llu %llu %d", g.uuid, &g.total_mb, &g.used_mb, &g.mig) != 4) continue;
    out[n++] = g;
  }
  fclose(f);
  return n;
}

/* A handle is the GPU's index + 1 (0 is no handle). */
static int fake_gpu_of(void* device, fake_gpu* g) {
  fake_gpu all[FAKE_MAX];
  const int n = fake_read(all);
  const long i = (long)(size_t)device - 1;
  if (!fake_initialised) return NVML_ERROR_UNINITIALIZED;
  if (n < 0) return NVML_ERROR_UNKNOWN;
  if (i < 0 || i >= n) return NVML_ERROR_GPU_IS_LOST;
  *g = all[i];
  return NVML_SUCCESS;
}

int nvmlInit_v2(void) {
  const char* mode = getenv("FAKE_NVML_INIT");
  if (mode != NULL && strcmp(mode, "fail") == 0) return NVML_ERROR_UNKNOWN;
  fake_initialised = 1;
  return NVML_SUCCESS;
}

int nvmlShutdown(void) {
  fake_initialised = 0;
  return NVML_SUCCESS;
}

int nvmlDeviceGetCount_v2(unsigned int* count) {
  fake_gpu all[FAKE_MAX];
  const int n = fake_read(all);
  if (!fake_initialised) return NVML_ERROR_UNINITIALIZED;
  if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
  if (n < 0) return NVML_ERROR_UNKNOWN;
  *count = (unsigned int)n;
  return NVML_SUCCESS;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void** device) {
  fake_gpu all[FAKE_MAX];
  const int n = fake_read(all);
  if (!fake_initialised) return NVML_ERROR_UNINITIALIZED;
  if (device == NULL) return NVML_ERROR_INVALID_ARGUMENT;
  if (n < 0 || (int)index >= n) return NVML_ERROR_INVALID_ARGUMENT;
  *device = (void*)(size_t)(index + 1);
  return NVML_SUCCESS;
}

int nvmlDeviceGetMemoryInfo(void* device, nvmlMemory_t* memory) {
  fake_gpu g;
  const int rc = fake_gpu_of(device, &g);
  if (rc != NVML_SUCCESS) return rc;
  if (memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
  memory->total = g.total_mb << 20;
  memory->used = g.used_mb << 20;
  memory->free = memory->total - memory->used;
  return NVML_SUCCESS;
}

int nvmlDeviceGetUUID(void* device, char* uuid, unsigned int length) {
  fake_gpu g;
  const int rc = fake_gpu_of(device, &g);
  if (rc != NVML_SUCCESS) return rc;
  if (uuid == NULL) return NVML_ERROR_INVALID_ARGUMENT;
  if (strlen(g.uuid) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
  strcpy(uuid, g.uuid);
  return NVML_SUCCESS;
}

int nvmlDeviceGetMigMode(void* device, unsigned int* current, unsigned int* pending) {
  fake_gpu g;
  const int rc = fake_gpu_of(device, &g);
  if (rc != NVML_SUCCESS) return rc;
  if (current == NULL || pending == NULL) return NVML_ERROR_INVALID_ARGUMENT;
  *current = (unsigned int)g.mig;
  *pending = (unsigned int)g.mig;
  return NVML_SUCCESS;
}
