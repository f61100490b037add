#include <stdio.h>
#include <taskmgr.h>

int main(void) {
  if (taskmgr_version_number() != TASKMGR_VERSION_NUMBER) return 2;
  printf("pkg-config consumer ok: taskmgr %s\n", taskmgr_version_string());
  return 0;
}
