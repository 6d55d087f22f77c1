/* Byte-level BPE tokenizer (the DeepSeek-V3 / R1 tokenizer.json family) and an
 * incremental detokenizer for streaming output.
 *
 * Loading reads everything from tokenizer.json, nothing is hard-coded for one
 * vocabulary: normalizer (only the empty one), pre_tokenizer (Split steps with
 * Regex/String patterns and any Split behaviour, then ByteLevel; a lone ByteLevel
 * with use_regex uses the GPT-2 regex), model BPE (vocab, merges as "a b" or
 * ["a","b"], rank = order), added_tokens (matched on the raw text before
 * pre-tokenization, leftmost-longest, honouring lstrip/rstrip/single_word and the
 * two HF passes: normalized=false tokens first, then normalized=true ones) and
 * decoder ByteLevel. Anything else is rejected with EPIC_ERR_UNSUPPORTED and an
 * error line naming the field. The post_processor is ignored: BOS is added only
 * when the caller asks (add_bos), as the chat template writes BOS itself.
 *
 * Text is bytes: encode accepts any byte string (invalid UTF-8 included; every
 * byte still round-trips through byte-level BPE). Decode converts the byte
 * stream to UTF-8 lossily (each maximal invalid subpart becomes U+FFFD, like
 * Rust's String::from_utf8_lossy, which the HF library uses).
 *
 * Thread contract: an epic_tokenizer is immutable after load; every const
 * function may run concurrently from any number of threads. An epic_detok is
 * thread-compatible (one thread at a time per handle).
 * Ownership: buffers handed out (ids, text) belong to the caller and go back
 * through epic_tokenizer_ids_free / epic_tokenizer_text_free. */
#ifndef EPIC_TOKENIZER_H
#define EPIC_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

typedef struct epic_tokenizer epic_tokenizer;
typedef struct epic_detok epic_detok;

/* Loads tokenizer.json and, when config_path is not NULL, tokenizer_config.json
 * (bos_token, eos_token, chat_template). Without a config bos/eos are -1 and the
 * chat template is NULL. Blocks on file IO (the V3 file is ~8 MB, ~0.2 s).
 * Errors: EPIC_ERR_IO (unreadable file), EPIC_ERR_INVALID (malformed JSON or
 * inconsistent vocab/merges), EPIC_ERR_UNSUPPORTED (a component this loader does
 * not implement), EPIC_ERR_NOMEM. On error *out is NULL. */
epic_status epic_tokenizer_load(const char *tokenizer_json_path, const char *tokenizer_config_json_path,
                                epic_tokenizer **out);
/* model_dir/tokenizer.json plus model_dir/tokenizer_config.json if that file exists. */
epic_status epic_tokenizer_load_dir(const char *model_dir, epic_tokenizer **out);
/* NULL-safe. */
void epic_tokenizer_destroy(epic_tokenizer *tok);

/* Encodes len bytes of text (need not be NUL-terminated, may contain NUL and
 * invalid UTF-8). Added tokens written in the text become their ids. With
 * add_bos != 0, BOS is prepended (EPIC_ERR_INVALID if the tokenizer has none).
 * On success *ids is malloc'd (free with epic_tokenizer_ids_free; may be NULL
 * when *n == 0). Runs in time linear in len (up to log factors). */
epic_status epic_tokenizer_encode(const epic_tokenizer *tok, const char *text, size_t len, int add_bos,
                                  int32_t **ids, size_t *n);
/* Flags of epic_tokenizer_decode and epic_detok_create. */
enum {
  /* drop added tokens flagged special (BOS/EOS/pad, not the role tokens) */
  EPIC_DECODE_SKIP_SPECIAL = 1,
  /* ids without a token decode to nothing instead of failing, as Hugging Face's
   * decode does: a model's vocabulary is padded past its tokenizer's (DeepSeek-V3:
   * 129280 rows, 128815 tokens), and a sampled padding id must not fail a request */
  EPIC_DECODE_SKIP_UNKNOWN = 2,
  /* generated text: what serve, batch and generate decode a completion with */
  EPIC_DECODE_GENERATED = EPIC_DECODE_SKIP_SPECIAL | EPIC_DECODE_SKIP_UNKNOWN,
};

/* Decodes ids to UTF-8 text (lossy for invalid byte sequences); flags are
 * EPIC_DECODE_*. Without EPIC_DECODE_SKIP_UNKNOWN an id that has no token is
 * EPIC_ERR_INVALID (logged with the id and its index). *text is malloc'd and
 * NUL-terminated (free with epic_tokenizer_text_free). */
epic_status epic_tokenizer_decode(const epic_tokenizer *tok, const int32_t *ids, size_t n,
                                  int flags, char **text, size_t *len);
void epic_tokenizer_ids_free(int32_t *ids);
void epic_tokenizer_text_free(char *text);

/* Id of a token string as written in tokenizer.json (byte-level form for the
 * vocabulary, e.g. "Ġworld"; content for added tokens), or -1. */
int32_t epic_tokenizer_token_to_id(const epic_tokenizer *tok, const char *token);
/* The token string of id (borrowed from tok, valid until destroy; NUL-terminated),
 * or NULL for an id without token. */
const char *epic_tokenizer_id_to_token(const epic_tokenizer *tok, int32_t id);
/* The raw bytes id decodes to (borrowed, *len bytes, may be invalid UTF-8 on
 * their own: byte-level tokens can end inside a character), or NULL for an id
 * without token. Concatenating them for an encoding reproduces the input bytes
 * exactly; useful for OpenAI-style logprob "bytes". */
const char *epic_tokenizer_token_bytes(const epic_tokenizer *tok, int32_t id, size_t *len);
/* Highest id + 1 (ids without token inside that range count as holes). */
int32_t epic_tokenizer_vocab_size(const epic_tokenizer *tok);
/* From tokenizer_config bos_token / eos_token; -1 when unknown. */
int32_t epic_tokenizer_bos_id(const epic_tokenizer *tok);
int32_t epic_tokenizer_eos_id(const epic_tokenizer *tok);
/* 1 if id is an added token flagged special, else 0. */
int epic_tokenizer_is_special(const epic_tokenizer *tok, int32_t id);
/* tokenizer_config chat_template (borrowed), or NULL. */
const char *epic_tokenizer_chat_template(const epic_tokenizer *tok);

/* Runs only the added-token split and the pre-tokenizer, calling cb for every
 * piece in order: added tokens come with their id and the matched bytes, other
 * pieces with id -1 and their raw bytes (before the byte-level mapping). Used by
 * benchmarks and debugging; cb returning non-zero stops early (EPIC_ERR_CANCELLED). */
typedef int (*epic_tokenizer_piece_cb)(void *user, const char *piece, size_t len, int32_t added_id);
epic_status epic_tokenizer_pretokenize(const epic_tokenizer *tok, const char *text, size_t len,
                                       epic_tokenizer_piece_cb cb, void *user);

/* Incremental detokenizer. Pushing ids one at a time returns only complete
 * UTF-8 characters and holds back an incomplete trailing sequence; flush emits
 * the rest (an incomplete leftover as U+FFFD). The concatenation of all outputs
 * equals epic_tokenizer_decode of the whole id sequence with the same flags
 * (EPIC_DECODE_*). tok is borrowed and must outlive the detok. */
epic_status epic_detok_create(const epic_tokenizer *tok, int flags, epic_detok **out);
void epic_detok_destroy(epic_detok *d);
/* *out_text (malloc'd, NUL-terminated, possibly empty; free with
 * epic_tokenizer_text_free) holds the newly completed text. Unknown id without
 * EPIC_DECODE_SKIP_UNKNOWN: EPIC_ERR_INVALID, the detok state is unchanged. */
epic_status epic_detok_push(epic_detok *d, int32_t id, char **out_text, size_t *out_len);
/* Emits what is held back and resets the detok for a new sequence. */
epic_status epic_detok_flush(epic_detok *d, char **out_text, size_t *out_len);

#endif
