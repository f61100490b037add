"""taskmgr from Python, through the C ABI with ctypes (standard library only).

    import taskmgr
    with taskmgr.Manager(database=":memory:") as tm:
        task = tm.create_task("page.png")           # the built-in "ocr" service
        tm.start_task(task)
        done = tm.wait_task(task, timeout=60)
        print(done["status"], done["result"]["text"])

An "ocr" task's result is the service's JSON as a dict: "text",
"mean_confidence" and "pages", each page with "width" and "height" (the
source image's pixels, in which every box is given: "words"[i]["box"] is
[x, y, w, h], hOCR, ALTO and TSV likewise), "dpi" (the source's) and
"dpi_source" ("file", "estimated" or "assumed"), "preprocess" ({"scale",
"rotated", "deskew_degrees"}: what was done before recognition), "text",
"words" and "orientation" (docs/OCR.md, "Results").

The shared library is found through the TASKMGR_LIBRARY environment variable
(a path), else the system's library path (libtaskmgr.so.0).

Every failure of a call is raised as a TaskmgrError subclass carrying the
library's status code and message (e.g. NotFoundError, QueueFullError).
A *task's* failure is not an exception: it is the task's "status",
"failure_reason" and "failure_message".

Threads: event callbacks run on the manager's event thread, log callbacks and
services on library threads; ctypes takes the GIL for them. Exceptions they
raise are caught: a callback's is kept in Manager.callback_errors (the last
100; Manager.callback_error_count counts them all, and metrics() adds them
to counters.callback_errors), a service's fails its task (KeyboardInterrupt
in a service cancels its task). None of them may close the manager.
"""

import atexit
import collections
import ctypes
import ctypes.util
import json
import os
import threading
import time
import weakref

__all__ = [
    "Manager", "TaskmgrError", "InvalidArgumentError", "NotFoundError", "QueueFullError",
    "OutOfMemoryError", "TimeoutError", "BusyError", "InvalidConfigError", "IoError",
    "DeviceUnavailableError", "MemoryLimitExceededError", "PoolExhaustedError",
    "InvalidStateError", "IncompatibleError", "CancelledError", "UnsupportedError",
    "InternalError", "InvalidInput", "OutOfMemory", "TaskContext", "Event", "version",
    "config_normalize", "describe_document",
]

# ---- errors -------------------------------------------------------------------


class TaskmgrError(Exception):
    """A taskmgr call failed: `status` is the TASKMGR_E_* code, `name` its
    stable name ("not_found"), `message` the library's message."""

    status = None

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message
        self.name = _status_name(status)

    def __str__(self):
        return "%s (%s)" % (self.message, self.name)


def _error_class(name, status):
    return type(name, (TaskmgrError,), {"status": status})


InvalidArgumentError = _error_class("InvalidArgumentError", -1)
NotFoundError = _error_class("NotFoundError", -2)
QueueFullError = _error_class("QueueFullError", -3)
OutOfMemoryError = _error_class("OutOfMemoryError", -4)
TimeoutError = _error_class("TimeoutError", -5)  # noqa: A001 (the library's timeout)
BusyError = _error_class("BusyError", -6)
InvalidConfigError = _error_class("InvalidConfigError", -7)
IoError = _error_class("IoError", -8)
DeviceUnavailableError = _error_class("DeviceUnavailableError", -9)
MemoryLimitExceededError = _error_class("MemoryLimitExceededError", -10)
PoolExhaustedError = _error_class("PoolExhaustedError", -11)
InvalidStateError = _error_class("InvalidStateError", -12)
IncompatibleError = _error_class("IncompatibleError", -13)
CancelledError = _error_class("CancelledError", -14)
UnsupportedError = _error_class("UnsupportedError", -15)
UnpersistedError = _error_class("UnpersistedError", -16)
InternalError = _error_class("InternalError", -99)

_ERRORS = {c.status: c for c in (
    InvalidArgumentError, NotFoundError, QueueFullError, OutOfMemoryError, TimeoutError,
    BusyError, InvalidConfigError, IoError, DeviceUnavailableError, MemoryLimitExceededError,
    PoolExhaustedError, InvalidStateError, IncompatibleError, CancelledError, UnsupportedError,
    UnpersistedError, InternalError)}


class OutOfMemory(Exception):
    """Raised by a Python service's process(): the task ran out of memory and
    is retried per tasks.retry (CPU fallback or a smaller batch)."""


class InvalidInput(Exception):
    """Raised by a Python service's process(): the input is bad (INVALID_INPUT)."""


# ---- the library ------------------------------------------------------------------

_TASK_ID_SIZE = 37
_free_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_log_fn = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _Event(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("sequence", ctypes.c_uint64),
        ("task_id", ctypes.c_char_p),
        ("event", ctypes.c_int32),
        ("event_type", ctypes.c_char_p),
        ("timestamp_ms", ctypes.c_int64),
        ("timestamp", ctypes.c_char_p),
        ("details_json", ctypes.c_char_p),
        ("json", ctypes.c_char_p),
    ]


_event_fn = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Event), ctypes.c_void_p)


class _OpenOptions(ctypes.Structure):
    # The layout of taskmgr_open_options in taskmgr.h, every field (the
    # library's taskmgr_open_options_init writes all of them).
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("config_yaml", ctypes.c_char_p),
        ("config_path", ctypes.c_char_p),
        ("database_path", ctypes.c_char_p),
        ("worker_threads", ctypes.c_int32),
        ("disable_builtin_ocr", ctypes.c_int32),
        ("log_callback", _log_fn),
        ("log_user_data", ctypes.c_void_p),
        ("log_free", _free_fn),
        ("event_callback", _event_fn),
        ("event_user_data", ctypes.c_void_p),
        ("event_free", _free_fn),
        ("database_url", ctypes.c_char_p),
    ]


class _TaskRequest(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("service", ctypes.c_char_p),
        ("input_path", ctypes.c_char_p),
        ("input_data", ctypes.c_void_p),
        ("input_size", ctypes.c_size_t),
        ("media_type", ctypes.c_char_p),
        ("priority", ctypes.c_int32),
        ("batch_size", ctypes.c_int32),
        ("device", ctypes.c_char_p),
        ("options_json", ctypes.c_char_p),
        ("start", ctypes.c_int32),
    ]


class _StartParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("device", ctypes.c_char_p),
        ("set_priority", ctypes.c_int32),
        ("priority", ctypes.c_int32),
        ("batch_size", ctypes.c_int32),
        ("options_json", ctypes.c_char_p),
    ]


class _ListParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("status", ctypes.c_char_p),
        ("service", ctypes.c_char_p),
        ("limit", ctypes.c_size_t),
        ("before", ctypes.c_char_p),
        ("with_results", ctypes.c_int32),
    ]


_create_fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p,
                              ctypes.POINTER(ctypes.c_void_p))
_process_fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_destroy_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_supports_fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p)


class _Service(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("kind", ctypes.c_char_p),
        ("user_data", ctypes.c_void_p),
        ("create_instance", _create_fn),
        ("process", _process_fn),
        ("destroy_instance", _destroy_fn),
        ("supports_device", _supports_fn),
        ("free_user_data", _free_fn),
        ("memory_base_mb", ctypes.c_double),
        ("memory_per_page_mb", ctypes.c_double),
        ("memory_per_mpixel_mb", ctypes.c_double),
        ("memory_per_input_mb", ctypes.c_double),
        ("input_optional", ctypes.c_int32),
    ]


# Set by cmake --install in the installed copy: the library's folder,
# relative to this file's. None in the source tree.
_INSTALLED_LIBDIR = None


def _library_candidates():
    """Where the library is looked for, in order: $TASKMGR_LIBRARY; next to
    this file; the install's libdir (an installed copy); the loader's search
    path (ldconfig, LD_LIBRARY_PATH)."""
    env = os.environ.get("TASKMGR_LIBRARY")
    if env:
        return [env]
    here = os.path.dirname(os.path.abspath(__file__))
    found = []
    for d in [here] + ([os.path.join(here, _INSTALLED_LIBDIR)] if _INSTALLED_LIBDIR else []):
        p = os.path.normpath(os.path.join(d, "libtaskmgr.so.0"))
        if os.path.exists(p):
            found.append(p)
    found.append(ctypes.util.find_library("taskmgr") or "libtaskmgr.so.0")
    return found


def _load():
    tried = []
    lib = None
    for path in _library_candidates():
        try:
            lib = ctypes.CDLL(path)  # CDLL: the GIL is released during every call
            break
        except OSError as e:
            tried.append("%s (%s)" % (path, e))
    if lib is None:
        raise ImportError("taskmgr: cannot load libtaskmgr: tried " + "; ".join(tried) +
                          ". Set TASKMGR_LIBRARY to the library's path.")
    P, I, S, D = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_double
    PS = ctypes.POINTER(ctypes.c_void_p)  # char** (freed with taskmgr_free)
    sigs = {
        "taskmgr_version_string": (S, []),
        "taskmgr_version_number": (I, []),
        "taskmgr_status_name": (S, [I]),
        "taskmgr_last_error": (S, []),
        "taskmgr_free": (None, [P]),
        "taskmgr_config_normalize": (I, [S, PS]),
        "taskmgr_describe_document": (I, [S, I, PS]),
        "taskmgr_open_options_init": (None, [ctypes.POINTER(_OpenOptions)]),
        "taskmgr_open": (I, [ctypes.POINTER(_OpenOptions), PS]),
        "taskmgr_close": (I, [P]),
        "taskmgr_destroy": (I, [P]),
        "taskmgr_task_request_init": (None, [ctypes.POINTER(_TaskRequest)]),
        "taskmgr_create_task": (I, [P, ctypes.POINTER(_TaskRequest), ctypes.c_char_p]),
        "taskmgr_create_tasks": (I, [P, ctypes.POINTER(_TaskRequest), ctypes.c_size_t,
                                     ctypes.c_char_p]),
        "taskmgr_start_params_init": (None, [ctypes.POINTER(_StartParams)]),
        "taskmgr_start_task": (I, [P, S, ctypes.POINTER(_StartParams)]),
        "taskmgr_cancel_task": (I, [P, S, ctypes.POINTER(ctypes.c_int)]),
        "taskmgr_delete_task": (I, [P, S]),
        "taskmgr_retry_task": (I, [P, S, ctypes.POINTER(_StartParams)]),
        "taskmgr_set_task_priority": (I, [P, S, ctypes.c_int32]),
        "taskmgr_pause": (I, [P, I, S, ctypes.POINTER(ctypes.c_int)]),
        "taskmgr_resume": (I, [P, I, S, ctypes.POINTER(ctypes.c_int)]),
        "taskmgr_paused": (I, [P, PS]),
        "taskmgr_resize_pool": (I, [P, S, S, I, I, ctypes.POINTER(ctypes.c_int),
                                    ctypes.POINTER(ctypes.c_int)]),
        "taskmgr_list_params_init": (None, [ctypes.POINTER(_ListParams)]),
        "taskmgr_list_tasks_page": (I, [P, ctypes.POINTER(_ListParams), PS, PS]),
        "taskmgr_get_task": (I, [P, S, PS]),
        "taskmgr_wait_task": (I, [P, S, D, PS]),
        "taskmgr_wait_idle": (I, [P, D]),
        "taskmgr_list_tasks": (I, [P, S, S, ctypes.c_size_t, PS]),
        "taskmgr_get_task_events": (I, [P, S, PS]),
        "taskmgr_get_task_metrics": (I, [P, PS]),
        "taskmgr_get_metrics_prometheus": (I, [P, PS]),
        "taskmgr_get_task_health": (I, [P, S, PS]),
        "taskmgr_list_devices": (I, [P, PS]),
        "taskmgr_cluster": (I, [P, PS]),
        "taskmgr_set_device_available": (I, [P, S, I]),
        "taskmgr_subscribe": (I, [P, _event_fn, P, _free_fn, ctypes.POINTER(ctypes.c_uint64)]),
        "taskmgr_unsubscribe": (I, [P, ctypes.c_uint64]),
        "taskmgr_flush_events": (I, [P]),
        "taskmgr_service_init": (None, [ctypes.POINTER(_Service)]),
        "taskmgr_register_service": (I, [P, ctypes.POINTER(_Service)]),
        "taskmgr_context_task_id": (S, [P]),
        "taskmgr_context_device": (S, [P]),
        "taskmgr_context_service_instance_id": (S, [P]),
        "taskmgr_context_options_json": (S, [P]),
        "taskmgr_context_input_path": (S, [P]),
        "taskmgr_context_input_data": (I, [P, PS, ctypes.POINTER(ctypes.c_size_t)]),
        "taskmgr_context_batch_size": (I, [P]),
        "taskmgr_context_attempt": (I, [P]),
        "taskmgr_context_estimated_memory_mb": (ctypes.c_int64, [P]),
        "taskmgr_context_cancelled": (I, [P]),
        "taskmgr_context_seconds_left": (D, [P]),
        "taskmgr_context_temp_dir": (S, [P]),
        "taskmgr_context_stage": (I, [P, S]),
        "taskmgr_context_report_memory": (I, [P, ctypes.c_int64]),
        "taskmgr_context_set_result": (I, [P, S]),
        "taskmgr_context_set_error": (I, [P, S]),
    }
    for name, (res, args) in sigs.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args
    return lib


_lib = _load()


def _check_layouts():
    """The library's versioned structs must be the size this module thinks:
    their init functions write the library's size (a newer library would
    write past a smaller ctypes struct)."""
    for init, cls in (("taskmgr_open_options_init", _OpenOptions),
                      ("taskmgr_task_request_init", _TaskRequest),
                      ("taskmgr_start_params_init", _StartParams),
                      ("taskmgr_list_params_init", _ListParams),
                      ("taskmgr_service_init", _Service)):
        buf = ctypes.create_string_buffer(4096)  # room for any size
        getattr(_lib, init)(ctypes.cast(buf, ctypes.POINTER(cls)))
        size = ctypes.c_size_t.from_buffer(buf).value
        if size != ctypes.sizeof(cls):
            raise ImportError(f"taskmgr.py does not match the library: {init} fills {size} bytes, "
                              f"this module's struct has {ctypes.sizeof(cls)}")


_check_layouts()


def _status_name(status):
    return _lib.taskmgr_status_name(status).decode()


def _check(status):
    if status != 0:
        message = _lib.taskmgr_last_error().decode("utf-8", "replace")
        raise _ERRORS.get(status, TaskmgrError)(status, message)


def _b(s):
    if s is None:
        return None
    if isinstance(s, str):
        try:
            b = s.encode("utf-8")
        except UnicodeEncodeError as e:  # e.g. os.listdir()'s surrogate-escaped names
            raise InvalidArgumentError(
                -1, "not valid UTF-8 (character %d of %r): the library takes UTF-8 text"
                % (e.start, s)) from None
    else:
        b = bytes(s)
    return b


def _path(p):
    """A file path for the library: UTF-8, no NUL (C strings end there: the
    rest of the path would be dropped silently)."""
    b = _b(os.fspath(p))
    if b is not None and b"\0" in b:
        raise InvalidArgumentError(-1, "embedded NUL character in a path (byte %d)" % b.index(b"\0"))
    return b


def _take_string(ptr):
    """Copies a library-owned char* and frees it."""
    if not ptr:
        return None
    try:
        return ctypes.cast(ptr, ctypes.c_char_p).value.decode("utf-8")
    finally:
        _lib.taskmgr_free(ptr)


def _call_string(fn, *args):
    out = ctypes.c_void_p()
    _check(fn(*args, ctypes.byref(out)))
    return _take_string(out.value)


def _name(s, what):
    """A name or word for the library (an id, a status, a cursor, a device):
    None, or text (str or bytes) of UTF-8 without NUL: a C string ends at
    its first NUL, so "id\\0junk" would name the task "id"."""
    if s is None:
        return None
    if not isinstance(s, (str, bytes)):
        raise TypeError("%s must be text, got %r" % (what, s))
    b = _b(s)
    if b"\0" in b:
        raise InvalidArgumentError(-1, "%s holds a NUL character (byte %d)" % (what, b.index(b"\0")))
    return b


def _task_id(task):
    if isinstance(task, dict):
        task = task["id"]
    if not isinstance(task, str):
        raise TypeError("a task is named by its id (str) or its dict, got %r" % (task,))
    return _name(task, "the task id")


def _start_params(device, priority, batch_size, options):
    """A taskmgr_start_params (start_task and retry_task read it alike)."""
    p = _StartParams()
    _lib.taskmgr_start_params_init(ctypes.byref(p))
    p.device = _name(device, "device")
    if priority is not None:
        p.set_priority = 1
        p.priority = _int32(priority, "priority")
    p.batch_size = _int32(batch_size if batch_size is not None else 0, "batch_size")
    if options is not None:
        p.options_json = _name(options if isinstance(options, str) else json.dumps(options),
                               "options")
    return p


def _int32(value, name):
    """An int32_t argument: an integer (not a float) in range, else
    TypeError / ValueError (ctypes would silently wrap 2**31 to -2**31)."""
    import operator
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError("%s must be an integer, got %r" % (name, value)) from None
    if not -2**31 <= v < 2**31:
        raise ValueError("%s must fit in 32 bits (-2147483648..2147483647), got %d" % (name, v))
    return v


def _size(value, name):
    """A size_t argument: an integer >= 0 (ctypes would wrap -1 to 2**64-1)."""
    import operator
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError("%s must be an integer, got %r" % (name, value)) from None
    if not 0 <= v < 2**63:
        raise ValueError("%s must be >= 0, got %d" % (name, v))
    return v


def _callable(fn, name, optional=False):
    if fn is None and optional:
        return None
    if not callable(fn):
        raise TypeError("%s must be callable, got %r" % (name, fn))
    return fn


class _CallbackErrors:
    """Exceptions raised by Python callbacks: the last `keep`, and a count.
    Held by the callbacks instead of the Manager (no reference cycle)."""

    def __init__(self, keep=100):
        self.items = collections.deque(maxlen=keep)
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, ex):
        with self._lock:
            self.items.append(ex)
            self.count += 1


def _fill_request(r, input=None, data=None, service="ocr", priority=0, batch_size=1,
                  device=None, options=None, media_type=None, start=False):
    """Fills a _TaskRequest (create_task's arguments); returns the buffer the
    request points into, which must outlive the call that reads it."""
    _lib.taskmgr_task_request_init(ctypes.byref(r))
    # This module's layout: also the stride of an array of requests.
    r.struct_size = ctypes.sizeof(_TaskRequest)
    r.service = _name(service, "service")
    r.input_path = _path(input) if input is not None else None
    buf = None
    if data is not None:
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        r.input_data = ctypes.cast(buf, ctypes.c_void_p)
        r.input_size = len(data)
    r.media_type = _name(media_type, "media_type")
    r.priority = _int32(priority, "priority")
    r.batch_size = _int32(batch_size, "batch_size")
    r.device = _name(device, "device")
    if options is not None:
        r.options_json = _name(options if isinstance(options, str) else json.dumps(options),
                               "options")
    r.start = 1 if start else 0
    return buf


def version():
    """The library's version string ("0.4.0")."""
    return _lib.taskmgr_version_string().decode()


def config_normalize(yaml_text=None):
    """Validates a YAML configuration (None: the defaults) and returns it
    with every key in force. InvalidConfigError names the key and line."""
    return _call_string(_lib.taskmgr_config_normalize, _name(yaml_text, "the configuration"))


def describe_document(path, dpi=300):
    """The pages of a document (image, multi-page TIFF or PDF) before any
    task is made: {"media_type": "application/pdf", "pages": [{"page": 1,
    "width": w, "height": h}, ...]}, pixels, PDF pages measured at `dpi`
    (72..1200). NotFoundError for a missing file, InvalidArgumentError for
    one that is not a readable image or PDF (the message names it)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError("path must be a str or os.PathLike, got %r" % (path,))
    return json.loads(_call_string(_lib.taskmgr_describe_document, _path(path),
                                   _int32(dpi, "dpi")))


# ---- events and contexts ---------------------------------------------------------


class Event(dict):
    """One event: sequence, task_id, event_type, timestamp (RFC 3339),
    timestamp_ms and details (a dict). Also readable as attributes."""

    __getattr__ = dict.__getitem__


class TaskContext:
    """What a Python service's process() sees of its task. Valid only during
    process(), on the thread that runs it."""

    def __init__(self, ptr):
        self._p = ptr

    def _s(self, fn):
        v = fn(self._p)
        return None if v is None else v.decode("utf-8")

    @property
    def task_id(self):
        return self._s(_lib.taskmgr_context_task_id)

    @property
    def device(self):
        return self._s(_lib.taskmgr_context_device)

    @property
    def service_instance_id(self):
        return self._s(_lib.taskmgr_context_service_instance_id)

    @property
    def options(self):
        text = self._s(_lib.taskmgr_context_options_json)
        return json.loads(text) if text else {}

    @property
    def input_path(self):
        return self._s(_lib.taskmgr_context_input_path)

    @property
    def input_data(self):
        data = ctypes.c_void_p()
        size = ctypes.c_size_t()
        _check(_lib.taskmgr_context_input_data(self._p, ctypes.byref(data), ctypes.byref(size)))
        return ctypes.string_at(data.value, size.value) if size.value else b""

    @property
    def batch_size(self):
        return _lib.taskmgr_context_batch_size(self._p)

    @property
    def attempt(self):
        return _lib.taskmgr_context_attempt(self._p)

    @property
    def estimated_memory_mb(self):
        return _lib.taskmgr_context_estimated_memory_mb(self._p)

    @property
    def cancelled(self):
        return bool(_lib.taskmgr_context_cancelled(self._p))

    @property
    def seconds_left(self):
        """Seconds before the attempt's deadline (inf when there is none)."""
        return _lib.taskmgr_context_seconds_left(self._p)

    @property
    def temp_dir(self):
        v = _lib.taskmgr_context_temp_dir(self._p)
        if v is None:
            raise IoError(-8, _lib.taskmgr_last_error().decode("utf-8", "replace"))
        return v.decode("utf-8")

    def stage(self, name):
        _check(_lib.taskmgr_context_stage(self._p, _name(name, "the stage")))

    def report_memory(self, mb):
        """Reports memory in use (MB). Raises OutOfMemoryError or
        MemoryLimitExceededError past the limits; the task then fails so."""
        _check(_lib.taskmgr_context_report_memory(self._p, int(mb)))


# ---- the manager -----------------------------------------------------------------------


# Managers still open when the interpreter exits are closed by atexit,
# while threads and the GIL still work: after close no library thread calls
# into Python, so none is ended in the middle of a callback during
# finalization. (Closed, not destroyed: a daemon thread may still be inside
# a call on the manager; close is safe against that, destroy is not.)
_open_managers = weakref.WeakSet()


@atexit.register
def _close_open_managers():
    for m in list(_open_managers):
        try:
            if m._h is not None:
                _lib.taskmgr_close(m._h)
        except Exception:
            pass


class Manager:
    """A task manager (taskmgr_open). Use it as a context manager, or call
    close() and destroy() (destroy() also closes).

    config_yaml / config_path: the configuration (neither: the defaults);
    database: the SQLite file (":memory:" keeps nothing; default per config,
    "taskmgr.db"); database_url: a PostgreSQL connection string instead
    (postgresql://... or key=value pairs; not with database); workers: worker
    threads; builtin_ocr: register "ocr"; log: a callable (level_name,
    message) for the library's log messages.
    """

    def __init__(self, config_yaml=None, config_path=None, database=None, workers=None,
                 builtin_ocr=True, log=None, database_url=None):
        self._keep = []  # ctypes callbacks the library holds: they must outlive it
        self._lock = threading.Lock()
        self._subs = {}
        self._errors = _CallbackErrors()
        self._h = None
        o = _OpenOptions()
        _lib.taskmgr_open_options_init(ctypes.byref(o))
        o.config_yaml = _name(config_yaml, "config_yaml")
        o.config_path = _path(config_path) if config_path is not None else None
        o.database_path = _path(database) if database is not None else None
        o.database_url = _name(database_url, "database_url")
        o.worker_threads = _int32(workers if workers is not None else 0, "workers")
        if o.worker_threads < 0:
            raise ValueError("workers must be >= 0 (0 = as configured), got %d" % o.worker_threads)
        o.disable_builtin_ocr = 0 if builtin_ocr else 1
        if log is not None:
            _callable(log, "log")
            names = {0: "trace", 1: "debug", 2: "info", 3: "warn", 4: "error"}
            errors = self._errors  # not self: no cycle through the callback

            def on_log(level, message, _ud):
                try:
                    log(names.get(level, str(level)), message.decode("utf-8", "replace"))
                except Exception as e:  # a callback must not raise into C
                    errors(e)

            cb = _log_fn(on_log)
            self._keep.append(cb)
            o.log_callback = cb
        h = ctypes.c_void_p()
        _check(_lib.taskmgr_open(ctypes.byref(o), ctypes.byref(h)))
        self._h = h
        _open_managers.add(self)

    @property
    def callback_errors(self):
        """The last 100 exceptions Python callbacks raised (oldest first)."""
        return list(self._errors.items)

    @property
    def callback_error_count(self):
        """How many exceptions Python callbacks raised in all."""
        return self._errors.count

    # -- lifetime
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    def __del__(self):
        try:
            self.destroy()
        except Exception:
            pass

    def _handle(self):
        if self._h is None:
            raise InvalidStateError(-12, "the manager was destroyed")
        return self._h

    def close(self):
        """Stops accepting work and waits for running tasks (taskmgr_close).

        Tasks still running after tasks.close_grace_seconds (30 s) are
        interrupted and stay queued for the next open (docs/C_API.md).
        """
        _check(_lib.taskmgr_close(self._handle()))

    def destroy(self):
        """Closes and frees the manager. Idempotent."""
        if self._h is not None:
            rc = _lib.taskmgr_destroy(self._h)
            if rc in (0, UnpersistedError.status):  # freed, also when writes were unpersisted
                self._h = None
            _check(rc)
            self._keep.clear()
            self._subs.clear()
            _open_managers.discard(self)

    # -- tasks
    def create_task(self, input=None, data=None, service="ocr", priority=0, batch_size=1,
                    device=None, options=None, media_type=None, start=False):
        """Creates a task (pending). `input` is a file path, `data` encoded
        bytes (exactly one); options a dict (or a JSON string). start=True
        queues it in the same step (stored already queued); a full queue
        then raises QueueFullError and no task is created. Returns the
        task's id."""
        r = _TaskRequest()
        keep = _fill_request(r, input, data, service, priority, batch_size, device, options,
                             media_type, start)
        out = ctypes.create_string_buffer(_TASK_ID_SIZE)
        _check(_lib.taskmgr_create_task(self._handle(), ctypes.byref(r), out))
        del keep
        return out.value.decode()

    def create_tasks(self, requests, start=False):
        """Creates many tasks in one step, all stored at once, all or none.
        Each request is a dict of create_task's keyword arguments (input,
        data, service, priority, batch_size, device, options, media_type,
        start); `start` is the default of those that do not say. Requests
        that start are queued; if the queue cannot take all of them,
        QueueFullError and nothing is created. A bad request raises with a
        message naming it by index ("request 3: ..."), and nothing is
        created. Returns the ids in request order ([] for no requests)."""
        requests = list(requests)
        if not requests:
            return []
        array = (_TaskRequest * len(requests))()
        keep = []
        for i, args in enumerate(requests):
            if not isinstance(args, dict):
                raise TypeError("request %d: a dict of create_task's arguments, got %r"
                                % (i, args))
            args = dict(args)
            args.setdefault("start", start)
            try:
                keep.append(_fill_request(array[i], **args))
            except TypeError as e:
                raise TypeError("request %d: %s" % (i, e)) from None
        out = ctypes.create_string_buffer(_TASK_ID_SIZE * len(requests))
        _check(_lib.taskmgr_create_tasks(self._handle(), array, len(requests), out))
        del keep
        raw = out.raw
        return [raw[i * _TASK_ID_SIZE:(i + 1) * _TASK_ID_SIZE].split(b"\0", 1)[0].decode()
                for i in range(len(requests))]

    def start_task(self, task, device=None, priority=None, batch_size=None, options=None):
        """Queues a pending task. QueueFullError leaves it pending."""
        p = _start_params(device, priority, batch_size, options)
        _check(_lib.taskmgr_start_task(self._handle(), _task_id(task), ctypes.byref(p)))

    def retry_task(self, task, device=None, priority=None, batch_size=None, options=None):
        """Runs a failed or cancelled task again (the same id, its events
        kept, the attempt counter going on); InvalidState for any other."""
        p = _start_params(device, priority, batch_size, options)
        _check(_lib.taskmgr_retry_task(self._handle(), _task_id(task), ctypes.byref(p)))

    def submit(self, input=None, **create_args):
        """create_task(input, start=True, **create_args): created and queued in
        one step (one commit); returns the id. A full queue raises
        QueueFullError and nothing is created."""
        create_args["start"] = True
        return self.create_task(input, **create_args)

    def cancel_task(self, task):
        """True when it was cancelled, False when it had already ended."""
        flag = ctypes.c_int()
        _check(_lib.taskmgr_cancel_task(self._handle(), _task_id(task), ctypes.byref(flag)))
        return bool(flag.value)

    def get_task(self, task):
        """The task as a dict with every spec field."""
        return json.loads(_call_string(_lib.taskmgr_get_task, self._handle(), _task_id(task)))

    # Waits run in slices of _WAIT_SLICE_S seconds: Python handles a signal
    # (Ctrl-C: KeyboardInterrupt) only between C calls, so it arrives within
    # a slice, not when the whole wait ends.
    _WAIT_SLICE_S = 0.05

    def _sliced(self, call, timeout):
        """Runs call(seconds) -> status in slices until it is not TIMEOUT or
        the whole timeout (None: none) has passed."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        while True:
            left = self._WAIT_SLICE_S
            if deadline is not None:
                left = min(left, max(0.0, deadline - time.monotonic()))
            rc = call(left)
            if rc != TimeoutError.status or (deadline is not None and time.monotonic() >= deadline):
                _check(rc)
                return

    def wait_task(self, task, timeout=None):
        """Waits for the task to end; returns it. TimeoutError on timeout.
        Ctrl-C interrupts it (KeyboardInterrupt) within ~50 ms."""
        tid = _task_id(task)
        out = ctypes.c_void_p()

        def call(seconds):
            return _lib.taskmgr_wait_task(self._handle(), tid, seconds, ctypes.byref(out))

        self._sliced(call, timeout)
        return json.loads(_take_string(out.value))

    def wait_idle(self, timeout=None):
        """Waits until no task is queued or running. TimeoutError on timeout.
        Ctrl-C interrupts it (KeyboardInterrupt) within ~50 ms."""
        self._sliced(lambda seconds: _lib.taskmgr_wait_idle(self._handle(), seconds), timeout)

    def list_tasks(self, status=None, service=None, limit=0):
        return json.loads(_call_string(_lib.taskmgr_list_tasks, self._handle(),
                                       _name(status, "status"), _name(service, "service"),
                                       _size(limit, "limit")))

    def list_tasks_page(self, status=None, service=None, limit=100, before=None,
                        results=False):
        """One page of tasks, newest first: (tasks, next_cursor). Pass
        next_cursor as `before` for the page after it; it is None after the
        last page. Input bytes are never read (each task's input.bytes says
        how many); results only with results=True."""
        p = _ListParams()
        _lib.taskmgr_list_params_init(ctypes.byref(p))
        p.status = _name(status, "status")
        p.service = _name(service, "service")
        p.limit = _size(limit, "limit")
        p.before = _name(before, "before")
        p.with_results = 1 if results else 0
        out = ctypes.c_void_p()
        cursor = ctypes.c_void_p()
        _check(_lib.taskmgr_list_tasks_page(self._handle(), ctypes.byref(p), ctypes.byref(out),
                                            ctypes.byref(cursor)))
        page = json.loads(_take_string(out.value))
        return page, _take_string(cursor.value)

    def iter_tasks(self, status=None, service=None, page_size=100, results=False):
        """Every task, newest first, read a page at a time."""
        before = None
        while True:
            page, before = self.list_tasks_page(status, service, page_size, before, results)
            yield from page
            if before is None:
                return

    def set_task_priority(self, task, priority):
        """A waiting (pending or queued) task's new priority; a queued one
        moves in its queue at once (InvalidState once it runs or has ended)."""
        _check(_lib.taskmgr_set_task_priority(self._handle(), _task_id(task),
                                              _int32(priority, "priority")))

    def _pause_args(self, device, service):
        if device is not None and service is not None:
            raise InvalidArgumentError(-1, "pause one thing at a time: a device or a service")
        if device is not None:
            return 1, _name(device, "device")
        if service is not None:
            return 2, _name(service, "service")
        return 0, None

    def pause(self, device=None, service=None):
        """Pauses the whole manager (no argument), one device's queue
        (device="cuda:0") or one service kind (service="ocr"): the queued
        tasks it holds do not start (nor time out) until resume(); running
        tasks finish. Kept in the store across a restart. True when it
        changed something (False: paused already)."""
        scope, name = self._pause_args(device, service)
        changed = ctypes.c_int(0)
        _check(_lib.taskmgr_pause(self._handle(), scope, name, ctypes.byref(changed)))
        return bool(changed.value)

    def resume(self, device=None, service=None):
        """Ends a pause made with the same arguments; False when it was
        not in force."""
        scope, name = self._pause_args(device, service)
        changed = ctypes.c_int(0)
        _check(_lib.taskmgr_resume(self._handle(), scope, name, ctypes.byref(changed)))
        return bool(changed.value)

    def paused(self):
        """The pauses in force: [{"scope", "name", "since"}]."""
        return json.loads(_call_string(_lib.taskmgr_paused, self._handle()))

    def cluster(self):
        """The cluster of a shared queue (storage.shared): {"host_id",
        "queued", "pending", "hosts": [{"id", "host_name", "pid", "state"
        ("alive", "lost" or "closed"), "heartbeat_at", "claimed", "running",
        "report", ...}]}, read from the shared tables. TaskmgrError
        (UNSUPPORTED) when the store is not shared."""
        return json.loads(_call_string(_lib.taskmgr_cluster, self._handle()))

    def resize_pool(self, service, device, min_instances, max_instances):
        """Sizes a service kind's pool on a device until the manager
        closes: at most max_instances of its tasks run there at once,
        min_instances are kept warm (made in the background). A smaller max
        retires idle instances at once and running ones as their tasks
        finish. Returns the sizes it replaced: {"min_instances",
        "max_instances"}."""
        before_min, before_max = ctypes.c_int(0), ctypes.c_int(0)
        _check(_lib.taskmgr_resize_pool(
            self._handle(), _name(service, "service"), _name(device, "device"),
            _int32(min_instances, "min_instances"), _int32(max_instances, "max_instances"),
            ctypes.byref(before_min), ctypes.byref(before_max)))
        return {"min_instances": before_min.value, "max_instances": before_max.value}

    def delete_task(self, task):
        """Deletes an ended task with its events, samples and input
        (InvalidState for one that has not ended, NotFound for an unknown
        id)."""
        _check(_lib.taskmgr_delete_task(self._handle(), _task_id(task)))

    def task_events(self, task):
        return [Event(e) for e in json.loads(
            _call_string(_lib.taskmgr_get_task_events, self._handle(), _task_id(task)))]

    # -- metrics, health, devices
    def metrics(self):
        """The spec's get_task_metrics as a dict; counters.callback_errors
        includes the exceptions of this module's Python callbacks."""
        m = json.loads(_call_string(_lib.taskmgr_get_task_metrics, self._handle()))
        counters = m.get("counters")
        if isinstance(counters, dict):
            counters["callback_errors"] = counters.get("callback_errors", 0) + self._errors.count
        return m

    def prometheus(self):
        return _call_string(_lib.taskmgr_get_metrics_prometheus, self._handle())

    def health(self, task):
        """The spec's get_task_health as a dict."""
        return json.loads(_call_string(_lib.taskmgr_get_task_health, self._handle(),
                                       _task_id(task)))

    def devices(self):
        return json.loads(_call_string(_lib.taskmgr_list_devices, self._handle()))

    def set_device_available(self, device, available):
        _check(_lib.taskmgr_set_device_available(self._handle(), _name(device, "device"),
                                                 1 if available else 0))

    # -- events
    def subscribe(self, callback):
        """Calls callback(Event) for every event, on the event thread.
        Returns the subscription id."""
        _callable(callback, "callback")
        errors = self._errors  # not self: no cycle through the callback

        def on_event(ev, _ud):
            e = ev.contents
            try:
                callback(Event(
                    sequence=e.sequence,
                    task_id=e.task_id.decode(),
                    event_type=e.event_type.decode(),
                    timestamp=e.timestamp.decode(),
                    timestamp_ms=e.timestamp_ms,
                    details=json.loads(e.details_json.decode("utf-8")),
                ))
            except Exception as ex:  # never raise into C
                errors(ex)

        cb = _event_fn(on_event)
        sub = ctypes.c_uint64()
        _check(_lib.taskmgr_subscribe(self._handle(), cb, None, _free_fn(), ctypes.byref(sub)))
        with self._lock:
            self._subs[sub.value] = cb  # the library calls it until unsubscribed
        return sub.value

    def unsubscribe(self, subscription):
        _check(_lib.taskmgr_unsubscribe(self._handle(), ctypes.c_uint64(subscription)))
        # Keep the ctypes callback alive: unsubscribing from inside itself
        # returns while it still runs. It goes with the manager.

    def flush_events(self):
        """Waits until every event so far was delivered."""
        _check(_lib.taskmgr_flush_events(self._handle()))

    # -- host services
    def register_service(self, kind, process, create_instance=None, destroy_instance=None,
                         supports_device=None, memory_base_mb=0.0, memory_per_page_mb=0.0,
                         memory_per_mpixel_mb=0.0, memory_per_input_mb=0.0,
                         input_optional=False):
        """Registers a Python service kind.

        process(ctx, instance) does one task: it returns a result (a dict or
        JSON text, or None), or raises OutOfMemory (retried: CPU fallback,
        smaller batch), InvalidInput (INVALID_INPUT) or any other exception
        (PROCESSING_ERROR). create_instance(device) returns the instance
        object (default: None); destroy_instance(instance) disposes of it;
        supports_device(device, kind) -> bool. input_optional=True: its
        tasks may have no input (else create_task refuses one without)."""
        _callable(process, "process")
        _callable(create_instance, "create_instance", optional=True)
        _callable(destroy_instance, "destroy_instance", optional=True)
        _callable(supports_device, "supports_device", optional=True)
        instances = {}
        next_key = [1]
        lock = threading.Lock()
        errors = self._errors  # not self: no cycle through the callbacks

        def c_create(_ud, device, out):
            try:
                inst = create_instance(device.decode()) if create_instance else None
                with lock:
                    key = next_key[0]
                    next_key[0] += 1
                    instances[key] = inst
                out[0] = key
                return 0
            except Exception as ex:
                errors(ex)
                return -99

        def c_process(_ud, key, ctx):
            c = TaskContext(ctx)
            with lock:
                inst = instances.get(key)
            try:
                result = process(c, inst)
                if result is not None:
                    text = result if isinstance(result, str) else json.dumps(result)
                    _check(_lib.taskmgr_context_set_result(ctx, _b(text)))
                return 0
            except OutOfMemory as ex:
                _lib.taskmgr_context_set_error(ctx, _b(str(ex) or "out of memory"))
                return -4
            except OutOfMemoryError:
                return -4  # report_memory: the library already holds the failure
            except MemoryLimitExceededError:
                return -10
            except InvalidInput as ex:
                _lib.taskmgr_context_set_error(ctx, _b(str(ex) or "invalid input"))
                return -1
            except Exception as ex:
                _lib.taskmgr_context_set_error(ctx, _b("%s: %s" % (type(ex).__name__, ex)))
                return -99
            except KeyboardInterrupt:
                # Ctrl-C while a service runs: the task is cancelled, not failed.
                _lib.taskmgr_context_set_error(ctx, b"interrupted (KeyboardInterrupt)")
                return CancelledError.status

        def c_destroy(_ud, key):
            with lock:
                inst = instances.pop(key, None)
            if destroy_instance is not None:
                try:
                    destroy_instance(inst)
                except Exception as ex:
                    errors(ex)

        def c_supports(_ud, device, kind_):
            try:
                return 1 if supports_device(device.decode(), kind_.decode()) else 0
            except Exception as ex:
                errors(ex)
                return 0

        s = _Service()
        _lib.taskmgr_service_init(ctypes.byref(s))
        s.kind = _name(kind, "the service kind")
        fns = [_create_fn(c_create), _process_fn(c_process), _destroy_fn(c_destroy)]
        s.create_instance, s.process, s.destroy_instance = fns
        if supports_device is not None:
            fns.append(_supports_fn(c_supports))
            s.supports_device = fns[-1]
        s.memory_base_mb = memory_base_mb
        s.memory_per_page_mb = memory_per_page_mb
        s.memory_per_mpixel_mb = memory_per_mpixel_mb
        s.memory_per_input_mb = memory_per_input_mb
        s.input_optional = 1 if input_optional else 0
        _check(_lib.taskmgr_register_service(self._handle(), ctypes.byref(s)))
        self._keep.extend(fns)
