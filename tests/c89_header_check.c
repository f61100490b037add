/* Compiled as strict C89: the C header must not need C99 or C++. */
#include "taskmgr.h"

int taskmgr_c89_check(void);
int taskmgr_c89_check(void) { return TASKMGR_OK + TASKMGR_VERSION_NUMBER; }
