/* DeepSeek-V3 and DeepSeek-R1 chat templates, implemented natively (no Jinja).
 *
 * The rules are those of the chat_template strings in tokenizer_config.json
 * (ARCHITECTURE.md §14.3), reproduced quirks included:
 * - V3: BOS, then all system messages joined with "\n\n", then the turns with no
 *   separators; R1: only the last system message.
 * - user: "<｜User｜>" + content.
 * - assistant with content: "<｜Assistant｜>" + content + "<｜end▁of▁sentence｜>",
 *   or "<｜tool▁outputs▁end｜>" + content + EOS right after tool output. R1 keeps
 *   only the text after the last "</think>" (not after tool output, as R1's template).
 * - assistant with content NULL: its tool_calls; the first call of the whole
 *   conversation opens "<｜Assistant｜><｜tool▁calls▁begin｜>", every later call
 *   is "\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
 *   (so a single call is never closed; the flag is never reset).
 * - tool: the first tool message of the conversation opens
 *   "<｜tool▁outputs▁begin｜>", later ones start with "\n"; a conversation ending
 *   on tool output gets "<｜tool▁outputs▁end｜>" and no generation prompt.
 * - generation prompt: "<｜Assistant｜>" (V3) / "<｜Assistant｜><think>\n" (R1).
 * The rendered text is tokenized with added-token matching and no extra BOS.
 *
 * Thread-safe: all functions are pure apart from their outputs. */
#ifndef EPIC_CHAT_H
#define EPIC_CHAT_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "coordinator/tokenizer/tokenizer.h"

typedef enum { EPIC_CHAT_AUTO = 0, EPIC_CHAT_V3 = 1, EPIC_CHAT_R1 = 2 } epic_chat_template;

typedef enum { EPIC_ROLE_SYSTEM = 0, EPIC_ROLE_USER, EPIC_ROLE_ASSISTANT, EPIC_ROLE_TOOL } epic_chat_role;

typedef struct {
  const char *type;      /* "function" */
  const char *name;      /* function name */
  const char *arguments; /* JSON text, inserted verbatim */
} epic_chat_tool_call;

typedef struct {
  epic_chat_role role;
  const char *content; /* NULL = none (only meaningful for assistant tool calls) */
  const epic_chat_tool_call *tool_calls;
  size_t n_tool_calls;
} epic_chat_message;

/* "v3" / "r1" / "auto" (case-insensitive) -> *out; EPIC_ERR_INVALID otherwise. */
epic_status epic_chat_template_parse(const char *name, epic_chat_template *out);
const char *epic_chat_template_name(epic_chat_template t);
/* R1 when the template string carries R1's reasoning stripping ("</think>"), V3
 * otherwise (also for NULL). */
epic_chat_template epic_chat_detect(const char *chat_template);
/* want unless AUTO; AUTO -> epic_chat_detect(tokenizer's chat_template). */
epic_chat_template epic_chat_resolve(const epic_tokenizer *tok, epic_chat_template want);

/* Renders msgs[0..n) to *text (malloc'd, NUL-terminated; free with
 * epic_tokenizer_text_free). bos_token is the BOS string (NULL = none). tmpl
 * must be V3 or R1 (resolve AUTO first). Errors: EPIC_ERR_INVALID naming the
 * message index for NULL content on system/user/tool messages or a tool call
 * with a missing field. */
epic_status epic_chat_render(epic_chat_template tmpl, const char *bos_token, const epic_chat_message *msgs,
                             size_t n, int add_generation_prompt, char **text, size_t *len);

/* Resolves tmpl (AUTO allowed) against tok, renders with tok's BOS string and
 * encodes the result (no extra BOS). *ids: free with epic_tokenizer_ids_free.
 * text/text_len may be NULL; otherwise *text receives the rendered string. */
epic_status epic_chat_encode(const epic_tokenizer *tok, epic_chat_template tmpl, const epic_chat_message *msgs,
                             size_t n, int add_generation_prompt, int32_t **ids, size_t *n_ids, char **text,
                             size_t *text_len);

/* Messages parsed from an OpenAI-style JSON array
 * [{"role": "system"|"user"|"assistant"|"tool", "content": str|null|[{"type":"text","text":str},...],
 *   "tool_calls": [{"type": "function", "function": {"name": str, "arguments": str|object}}]}].
 * Text parts of an array content are joined with "\n"; non-text parts and unknown
 * roles are EPIC_ERR_INVALID (logged with the message index). Object arguments are
 * serialised compactly. The list owns copies of all strings. */
typedef struct epic_chat_messages epic_chat_messages;
epic_status epic_chat_messages_from_json(const cJSON *array, epic_chat_messages **out);
/* Same from JSON text. */
epic_status epic_chat_messages_parse(const char *json, size_t len, epic_chat_messages **out);
const epic_chat_message *epic_chat_messages_items(const epic_chat_messages *m);
size_t epic_chat_messages_count(const epic_chat_messages *m);
/* NULL-safe. */
void epic_chat_messages_free(epic_chat_messages *m);

#endif
