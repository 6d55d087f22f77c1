/* R1 reasoning split (coordinator/reasoning.h). */
#include "coordinator/reasoning.h"

#include "common/log.h"

#include <stdlib.h>
#include <string.h>

enum { ST_START, ST_THINK, ST_CONTENT };

static const char OPEN[] = "<think>";
static const char CLOSE[] = "</think>";

static epic_status out_put(epic_reasoning_out *o, const char *p, size_t n) {
  if (!n)
    return EPIC_OK;
  if (o->n + n + 1 > o->cap) {
    size_t cap = o->cap ? o->cap : 64;
    while (cap < o->n + n + 1)
      cap *= 2;
    char *q = realloc(o->p, cap);
    if (!q)
      return EPIC_ERR_NOMEM;
    o->p = q;
    o->cap = cap;
  }
  memcpy(o->p + o->n, p, n);
  o->n += n;
  o->p[o->n] = '\0';
  return EPIC_OK;
}

void epic_reasoning_out_free(epic_reasoning_out *o) {
  free(o->p);
  o->p = NULL;
  o->n = o->cap = 0;
}

void epic_reasoning_init(epic_reasoning *r, int open) {
  memset(r, 0, sizeof *r);
  r->state = open ? ST_THINK : ST_START;
}

static int is_space(char c) {
  return c == ' ' || c == '\n' || c == '\r' || c == '\t';
}

/* Feeds one byte; the held buffer always stays a proper prefix of the tag
 * being looked for, so it never grows beyond the tag's length. */
static epic_status step(epic_reasoning *r, char c, epic_reasoning_out *rs, epic_reasoning_out *ct) {
  switch (r->state) {
  case ST_START:
    /* Leading whitespace is held too: it belongs to the reasoning if a
     * <think> follows, to the content otherwise. */
    if (r->n_held < sizeof r->held - 1) {
      size_t tag = 0; /* bytes of OPEN matched after the whitespace */
      size_t ws = 0;
      while (ws < r->n_held && is_space(r->held[ws]))
        ws++;
      tag = r->n_held - ws;
      if (tag == 0 && is_space(c) && ws < 8) {
        r->held[r->n_held++] = c;
        return EPIC_OK;
      }
      if (c == OPEN[tag]) {
        r->held[r->n_held++] = c;
        if (tag + 1 == sizeof OPEN - 1) {
          r->state = ST_THINK; /* the tag and the whitespace before it are dropped */
          r->n_held = 0;
        }
        return EPIC_OK;
      }
    }
    r->state = ST_CONTENT;
    EPIC_CHECK(out_put(ct, r->held, r->n_held));
    r->n_held = 0;
    return out_put(ct, &c, 1);
  case ST_THINK:
    r->held[r->n_held++] = c;
    for (;;) {
      /* Longest suffix of held that is a prefix of CLOSE stays held. */
      if (r->n_held == sizeof CLOSE - 1 && memcmp(r->held, CLOSE, r->n_held) == 0) {
        r->n_held = 0;
        r->state = ST_CONTENT;
        return EPIC_OK;
      }
      if (memcmp(r->held, CLOSE, r->n_held) == 0)
        return EPIC_OK;
      EPIC_CHECK(out_put(rs, r->held, 1));
      memmove(r->held, r->held + 1, --r->n_held);
      if (r->n_held == 0)
        return EPIC_OK;
    }
  default: return out_put(ct, &c, 1);
  }
}

epic_status epic_reasoning_push(epic_reasoning *r, const char *text, size_t n,
                                epic_reasoning_out *reasoning, epic_reasoning_out *content) {
  size_t i = 0;
  /* Content after the block passes through in one piece. */
  while (i < n && r->state != ST_CONTENT)
    EPIC_CHECK(step(r, text[i++], reasoning, content));
  if (r->state == ST_CONTENT && i < n)
    EPIC_CHECK(out_put(content, text + i, n - i));
  return EPIC_OK;
}

epic_status epic_reasoning_finish(epic_reasoning *r, epic_reasoning_out *reasoning,
                                  epic_reasoning_out *content) {
  epic_status st = EPIC_OK;
  if (r->n_held)
    st = out_put(r->state == ST_THINK ? reasoning : content, r->held, r->n_held);
  r->n_held = 0;
  return st;
}

int epic_reasoning_prompt_opens(const char *p, size_t n) {
  while (n > 0 && is_space(p[n - 1]))
    n--;
  return n >= sizeof OPEN - 1 && memcmp(p + n - (sizeof OPEN - 1), OPEN, sizeof OPEN - 1) == 0;
}
