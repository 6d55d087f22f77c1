/* epic_reasoning: splits R1-style generated text into reasoning and content.
 *
 * DeepSeek-R1 writes its chain of thought inside <think> ... </think> and the
 * answer after it. R1's chat template opens the block itself (the generation
 * prompt ends with "<think>\n"), so the model's output then starts inside it;
 * older templates leave it to the model to write "<think>" first. The parser
 * handles both: started "open" (the rendered prompt left a block open, see
 * epic_reasoning_prompt_opens) everything up to the first "</think>" is
 * reasoning; started closed, a "<think>" at the very start of the output
 * (after optional whitespace) opens the block. Text after "</think>" is
 * content; the tags themselves are dropped.
 *
 * Tags may arrive split across pushes (token by token): the parser holds back
 * a tail that could still become a tag and releases it once it cannot (or at
 * finish). Text is passed through byte for byte otherwise.
 *
 * Thread contract: thread-compatible (one thread at a time per parser).
 * Ownership: the output buffers belong to the caller (epic_reasoning_out). */
#ifndef EPIC_COORDINATOR_REASONING_H
#define EPIC_COORDINATOR_REASONING_H

#include <stddef.h>

#include "common/status.h"

typedef struct epic_reasoning_out {
  char *p;
  size_t n, cap;
} epic_reasoning_out;

typedef struct epic_reasoning {
  int state;     /* internal: start, thinking, content */
  char held[16]; /* a possible partial tag */
  size_t n_held;
} epic_reasoning;

/* open = 1: the output starts inside a think block. */
void epic_reasoning_init(epic_reasoning *r, int open);
/* Appends what text[0..n) releases to reasoning / content (either may be
 * appended to, or neither). EPIC_ERR_NOMEM. */
epic_status epic_reasoning_push(epic_reasoning *r, const char *text, size_t n,
                                epic_reasoning_out *reasoning, epic_reasoning_out *content);
/* End of output: releases the held tail where it belongs. */
epic_status epic_reasoning_finish(epic_reasoning *r, epic_reasoning_out *reasoning,
                                  epic_reasoning_out *content);
/* 1 when the rendered prompt leaves a think block open: its last "<think>"
 * comes after its last "</think>" and only whitespace follows it. */
int epic_reasoning_prompt_opens(const char *prompt, size_t n);
void epic_reasoning_out_free(epic_reasoning_out *o);

#endif
