/* Test helper, C89/C99 and C++: is a string valid UTF-8 (RFC 3629), and is a
 * document strict JSON (RFC 8259: no NaN/Infinity, no comments, no trailing
 * commas, no control characters in strings, paired surrogate escapes, one
 * value and only whitespace after it)? Written apart from the library (it
 * shares no code with it), so that it checks the library's output rather
 * than agreeing with it. Header-only: static functions. */
#ifndef TASKMGR_TESTS_STRICT_JSON_H
#define TASKMGR_TESTS_STRICT_JSON_H

#include <stddef.h>

/* The offset of the first byte that breaks UTF-8, or -1. */
static long strict_utf8_error(const char* s, size_t n) {
  const unsigned char* p = (const unsigned char*)s;
  size_t i = 0;
  while (i < n) {
    unsigned char c = p[i];
    size_t len, k;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c < 0x80) {
      ++i;
      continue;
    }
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return (long)i;
    }
    if (i + len > n || p[i + 1] < lo || p[i + 1] > hi) return (long)i;
    for (k = 2; k < len; ++k) {
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return (long)i;
    }
    i += len;
  }
  return -1;
}

typedef struct strict_json_cursor {
  const char* s;
  size_t n, i;
  int depth;
} strict_json_cursor;

static void strict_json_ws(strict_json_cursor* c) {
  while (c->i < c->n &&
         (c->s[c->i] == ' ' || c->s[c->i] == '\t' || c->s[c->i] == '\n' || c->s[c->i] == '\r'))
    ++c->i;
}

static int strict_json_lit(strict_json_cursor* c, const char* word) {
  size_t k = 0;
  while (word[k] != '\0') {
    if (c->i + k >= c->n || c->s[c->i + k] != word[k]) return 0;
    ++k;
  }
  c->i += k;
  return 1;
}

static int strict_json_hex4(strict_json_cursor* c, unsigned* out) {
  unsigned v = 0;
  int k;
  if (c->i + 4 > c->n) return 0;
  for (k = 0; k < 4; ++k) {
    char h = c->s[c->i + (size_t)k];
    v <<= 4;
    if (h >= '0' && h <= '9') {
      v |= (unsigned)(h - '0');
    } else if (h >= 'a' && h <= 'f') {
      v |= (unsigned)(h - 'a' + 10);
    } else if (h >= 'A' && h <= 'F') {
      v |= (unsigned)(h - 'A' + 10);
    } else {
      return 0;
    }
  }
  c->i += 4;
  *out = v;
  return 1;
}

static int strict_json_string(strict_json_cursor* c) {
  if (c->i >= c->n || c->s[c->i] != '"') return 0;
  ++c->i;
  while (c->i < c->n) {
    unsigned char ch = (unsigned char)c->s[c->i];
    if (ch == '"') {
      ++c->i;
      return 1;
    }
    if (ch < 0x20) return 0; /* raw control character */
    if (ch == '\\') {
      char e;
      ++c->i;
      if (c->i >= c->n) return 0;
      e = c->s[c->i++];
      if (e == 'u') {
        unsigned u, lo;
        if (!strict_json_hex4(c, &u)) return 0;
        if (u >= 0xDC00 && u <= 0xDFFF) return 0; /* a lone low surrogate */
        if (u >= 0xD800 && u <= 0xDBFF) {         /* must be followed by a low one */
          if (c->i + 2 > c->n || c->s[c->i] != '\\' || c->s[c->i + 1] != 'u') return 0;
          c->i += 2;
          if (!strict_json_hex4(c, &lo) || lo < 0xDC00 || lo > 0xDFFF) return 0;
        }
      } else if (e != '"' && e != '\\' && e != '/' && e != 'b' && e != 'f' && e != 'n' &&
                 e != 'r' && e != 't') {
        return 0;
      }
      continue;
    }
    ++c->i; /* UTF-8 was checked over the whole text */
  }
  return 0;
}

static int strict_json_digits(strict_json_cursor* c) {
  size_t start = c->i;
  while (c->i < c->n && c->s[c->i] >= '0' && c->s[c->i] <= '9') ++c->i;
  return c->i > start;
}

static int strict_json_number(strict_json_cursor* c) {
  if (c->i < c->n && c->s[c->i] == '-') ++c->i;
  if (c->i < c->n && c->s[c->i] == '0') {
    ++c->i;
  } else if (!strict_json_digits(c)) {
    return 0;
  }
  if (c->i < c->n && c->s[c->i] == '.') {
    ++c->i;
    if (!strict_json_digits(c)) return 0;
  }
  if (c->i < c->n && (c->s[c->i] == 'e' || c->s[c->i] == 'E')) {
    ++c->i;
    if (c->i < c->n && (c->s[c->i] == '+' || c->s[c->i] == '-')) ++c->i;
    if (!strict_json_digits(c)) return 0;
  }
  return 1;
}

static int strict_json_value(strict_json_cursor* c);

static int strict_json_container(strict_json_cursor* c, char close, int object) {
  ++c->i; /* the opening bracket */
  if (++c->depth > 512) return 0;
  strict_json_ws(c);
  if (c->i < c->n && c->s[c->i] == close) {
    ++c->i;
    --c->depth;
    return 1;
  }
  for (;;) {
    strict_json_ws(c);
    if (object) {
      if (!strict_json_string(c)) return 0;
      strict_json_ws(c);
      if (c->i >= c->n || c->s[c->i] != ':') return 0;
      ++c->i;
    }
    if (!strict_json_value(c)) return 0;
    strict_json_ws(c);
    if (c->i < c->n && c->s[c->i] == ',') {
      ++c->i;
      continue;
    }
    if (c->i < c->n && c->s[c->i] == close) {
      ++c->i;
      --c->depth;
      return 1;
    }
    return 0;
  }
}

static int strict_json_value(strict_json_cursor* c) {
  strict_json_ws(c);
  if (c->i >= c->n) return 0;
  switch (c->s[c->i]) {
    case '{': return strict_json_container(c, '}', 1);
    case '[': return strict_json_container(c, ']', 0);
    case '"': return strict_json_string(c);
    case 't': return strict_json_lit(c, "true");
    case 'f': return strict_json_lit(c, "false");
    case 'n': return strict_json_lit(c, "null");
    default: return strict_json_number(c);
  }
}

/* The offset where `s` stops being one strict JSON document, or -1 when it
 * is one. */
static long strict_json_error(const char* s, size_t n) {
  strict_json_cursor c;
  long bad = strict_utf8_error(s, n);
  if (bad >= 0) return bad;
  c.s = s;
  c.n = n;
  c.i = 0;
  c.depth = 0;
  if (!strict_json_value(&c)) return (long)c.i;
  strict_json_ws(&c);
  return c.i == n ? -1 : (long)c.i;
}

#endif /* TASKMGR_TESTS_STRICT_JSON_H */
