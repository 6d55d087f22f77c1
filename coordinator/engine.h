/* epic_engine: the serving engine of one EPIC cluster (DESIGN §2-§3).
 *
 * Every rank of the job creates one engine over the same model and comm. Rank 0
 * hosts the coordinator: it queues submitted requests, admits them while KV cache
 * and batch slots allow, assigns each sequence to one worker rank (data-parallel
 * attention: the sequence's latent KV cache stays on that rank), forms each
 * forward step with continuous batching (new sequences' prefill chunks join the
 * running sequences' decode tokens, under a per-step token budget), broadcasts
 * the step plan, lets every rank run its part (the MoE layers exchange tokens
 * with all ranks), and gathers the sampled ids back. Ranks other than 0 only run
 * epic_engine_run, which follows rank 0's plans until rank 0 shuts down.
 * A single-process engine (comm == NULL) is a cluster of one.
 *
 * Scheduling policy. A request is admitted when a worker has KV pages for its
 * whole prompt + max_new_tokens (reserved up front, so a running sequence is
 * never preempted) and the cluster runs fewer than max_batch sequences; the
 * worker with the most free pages takes it. Each step gives every running
 * sequence in decode one token, then fills the rest of the worker's step_tokens
 * budget with prefill chunks (at most prefill_chunk tokens of one sequence) in
 * admission order. With the prefix cache (on by default), a request goes
 * preferably to the worker that holds the longest cached prefix of its prompt
 * and computes only the rest. Results do not depend on this placement: each sequence's
 * tokens are a function of its own prompt and sampling parameters only.
 *
 * Thread contract: epic_engine_submit, epic_engine_cancel, epic_engine_get_stats
 * and epic_engine_shutdown may be called from any thread of rank 0 (gateway
 * threads); exactly one thread per rank drives the engine (epic_engine_run or
 * epic_engine_step). Request callbacks run on the driving thread, must not block
 * for long and must not call back into the engine except epic_engine_cancel /
 * epic_engine_submit. */
#ifndef EPIC_COORDINATOR_ENGINE_H
#define EPIC_COORDINATOR_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "coordinator/metrics.h"
#include "worker/model.h"
#include "worker/sampler.h"

typedef struct epic_engine epic_engine;
typedef struct epic_comm epic_comm; /* comm/comm.h */

typedef struct epic_engine_params {
  size_t size;            /* sizeof(epic_engine_params) */
  epic_model *model;      /* borrowed; loaded with the same comm */
  epic_comm *comm;        /* borrowed; NULL = single process */
  int64_t page_size;      /* KV cache tokens per page (default 64) */
  int64_t kv_pages;       /* KV pages per worker; 0 = from kv_bytes */
  size_t kv_bytes;        /* KV cache bytes per worker when kv_pages == 0 (default 1 GiB) */
  int64_t max_batch;      /* running sequences in the whole cluster (default 256) */
  int64_t max_queue;      /* waiting requests before submit answers EPIC_ERR_BUSY (default 1024) */
  int64_t step_tokens;    /* per-worker token budget of one step (default: the backend's,
                             epic_ops_step_tokens: 8192 on a GPU, 2048 on the CPU) */
  int64_t prefill_chunk;  /* prompt tokens of one sequence per step (default step_tokens) */
  int64_t max_context;    /* prompt + new tokens of one sequence; 0 = the model's max_position_embeddings */
  int micro_batches;      /* 1 or 2 (two-micro-batch pipelining); same on every rank */
  /* Most likely tokens computed per sampled token, for requests that ask for
   * top logprobs (0..EPIC_ENGINE_MAX_TOP_LOGPROBS; 0 = none may ask). Every
   * rank computes them for every sample of the step and sends them back with
   * its reply, so the cost (a pass over the logits row, 8 bytes per entry) is
   * paid only when enabled. Same on every rank. */
  int top_logprobs;
  /* Prefix cache (per worker): full KV pages of prompts are kept after their
   * sequence ends and reused by later requests whose prompt starts with the
   * same tokens (their prefill starts after the cached pages; outputs are
   * identical with and without). Budget: the most idle cached pages a worker
   * keeps; they are given back whenever a sequence needs the pages. -1 = off;
   * 0 = prefix_cache_bytes worth, or half of kv_pages when that is 0 too.
   * Same on every rank. */
  int64_t prefix_cache_pages;
  size_t prefix_cache_bytes;
  /* MTP speculative decoding (worker/spec.h, scheduler.h): every decoding
   * sequence's step verifies the drafts the MTP layer made for it in the
   * previous step, in the same batched forward as everyone else. Greedy output
   * is identical to plain decoding; sampled output has the same distribution.
   * 0 = auto (the default): one draft per step for greedy requests when the
   * model was loaded with an MTP layer (sampled ones decode plainly, so a
   * seeded request keeps its tokens), each sequence stopping for good when its acceptance is below
   * break-even (scheduler.h); -1 = off; K in 1..16: K drafts per step for every
   * sequence, always (needs the MTP layer). Same on every rank. */
  int64_t mtp_draft;
  /* Expert load balancing at run time (EPLB, coordinator/eplb.h): every
   * eplb_interval steps the routed experts are re-placed from the tokens each
   * expert got since the last round, with eplb_redundant extra copies of hot
   * experts per MoE layer, when that lowers the predicted max/mean rank load by at
   * least 5%. Outputs do not change. eplb_redundant: 0 = auto (as many copies as
   * ranks, i.e. one more expert per rank and layer, on clusters of 2+ CPU ranks;
   * off on GPU ranks until validated there; a single process has nothing to balance), -1 = off, R > 0 = R copies.
   * eplb_interval: 0 = 256 steps. eplb_policy: 0 global, 1 hierarchical
   * (epic_eplb_policy). Same on every rank. */
  int64_t eplb_redundant, eplb_interval;
  int eplb_policy;
  /* Host threads computing a step's top logprobs (epic_executor_params): 0 = the
   * online CPUs, at most 8; 1 = the engine's thread. Results do not depend on it. */
  int sampler_threads;
} epic_engine_params;

#define EPIC_ENGINE_MAX_MTP_DRAFT 16

#define EPIC_ENGINE_MAX_TOP_LOGPROBS 20

typedef enum {
  EPIC_ENGINE_FINISH_LENGTH = 0,    /* max_new_tokens reached */
  EPIC_ENGINE_FINISH_STOP = 1,      /* EOS, a stop id, or on_token asked to stop */
  EPIC_ENGINE_FINISH_CANCELLED = 2, /* epic_engine_cancel, or on_token returned < 0 */
  EPIC_ENGINE_FINISH_ERROR = 3      /* the step failed (status in the result) */
} epic_engine_finish;

typedef struct epic_engine_result {
  epic_engine_finish finish;
  epic_status status;     /* EPIC_OK unless finish == ERROR */
  int64_t prompt_tokens, completion_tokens;
  double queue_seconds;   /* submit -> admitted */
  double ttft_seconds;    /* submit -> first token */
  double total_seconds;   /* submit -> finish */
} epic_engine_result;

/* One generated token as on_token_top sees it. */
typedef struct epic_engine_token {
  int32_t id;
  float logprob;             /* of id under the raw logits' softmax */
  int n_top;                 /* the request's top_logprobs */
  const int32_t *top_ids;    /* n_top most likely ids, most likely first (borrowed for the call) */
  const float *top_logprobs; /* their logprobs */
} epic_engine_token;

typedef struct epic_engine_request {
  size_t size;              /* sizeof(epic_engine_request) */
  const int32_t *prompt;    /* n_prompt >= 1 ids in [0, vocab) (copied by submit) */
  int64_t n_prompt;
  int64_t max_new_tokens;   /* >= 1; prompt + max_new_tokens <= max_context */
  epic_sampling_params sampling;
  int ignore_eos;           /* do not stop at the config's EOS ids */
  const int32_t *stop_ids;  /* extra ids that end the sequence (copied by submit) */
  int n_stop_ids;
  /* Called on the driving thread for every generated token, in order. Return 0
   * to go on, 1 to finish with STOP after this token (stop strings), < 0 to
   * cancel. May be NULL. */
  int (*on_token)(void *user, int32_t id, float logprob);
  /* Called exactly once per accepted request, after its last on_token, when the
   * sequence's KV pages and batch slot are already free. May be NULL. */
  void (*on_finish)(void *user, const epic_engine_result *r);
  void *user;
  /* Optional, instead of on_token (same return contract): the token with the
   * top_logprobs most likely alternatives of the same logits row. */
  int (*on_token_top)(void *user, const epic_engine_token *t);
  int top_logprobs; /* 0..params.top_logprobs (EPIC_ERR_INVALID beyond) */
} epic_engine_request;

typedef struct epic_engine_stats {
  int64_t queued, running;            /* requests waiting / sequences admitted */
  int64_t kv_pages_used, kv_pages_total; /* summed over workers */
  int64_t steps;                      /* forward steps run */
  int64_t prompt_tokens, generated_tokens; /* processed since creation */
  int64_t finished, cancelled;        /* requests ended */
  /* Prefix cache: prompts that started from cached pages, the prompt tokens
   * those pages covered (included in prompt_tokens; not computed), idle cached
   * pages now and their budget (summed over workers), pages evicted so far. */
  int64_t prefix_hits, prefix_hit_tokens, prefix_cached_pages, prefix_cache_pages,
      prefix_evictions;
  int nranks;
  /* Latencies of requests that produced tokens: submit -> first token,
   * seconds per output token after the first, submit -> finish. */
  epic_hist ttft, tpot, e2e;
  /* All-to-all traffic of the MoE layers, summed over ranks as of the last
   * step (epic_model_stats of each rank, sent back with its reply). */
  int64_t a2a_dispatch_bytes, a2a_combine_bytes, a2a_calls;
  double a2a_dispatch_wait_s, a2a_combine_wait_s;
  /* Decode steps recorded as graphs and replayed (epic_model_set_step_graphs), summed over
   * ranks as of the last step; 0 on backends without graphs. */
  int64_t graph_captures, graph_replays;
  /* Seconds in model forwards (main model and MTP layer, from embedding to picks on the
   * host), in the MTP layer's alone, and in recording step graphs (part of the first),
   * summed over ranks as of the last step. The rest of a run's time is host work between
   * forwards (scheduling, drafting bookkeeping, replies, detokenizing). */
  double forward_s, mtp_forward_s, graph_record_s;
  /* MTP drafting: drafts per step (0 = off) and whether auto; verify steps
   * that carried drafts, drafts verified and accepted (mean accepted length
   * per verify step = 1 + accepted / verify_steps); sequences drafting now and
   * those that stopped (auto). */
  int64_t mtp_draft;
  int mtp_auto;
  int64_t mtp_verify_steps, mtp_drafted, mtp_accepted, mtp_running, mtp_stopped;
  /* EPLB: rounds run, placements applied, predicted max/mean rank load of the
   * placement in force on the last round's counts (0 before any round or off). */
  int64_t eplb_rounds, eplb_rebalances;
  double eplb_imbalance;
} epic_engine_stats;

/* Collective: every rank calls it with equal parameters (model loaded with the
 * same comm). Creates the rank's KV cache. EPIC_ERR_INVALID names a bad field. */
epic_status epic_engine_create(const epic_engine_params *p, epic_engine **out);
/* NULL-safe. On rank 0 after epic_engine_run returned (or never started);
 * unfinished requests get on_finish(CANCELLED). */
void epic_engine_destroy(epic_engine *e);

/* Rank 0, any thread. Validates and queues the request; *id (may be NULL)
 * identifies it for epic_engine_cancel. EPIC_ERR_INVALID (logged, naming the
 * field: prompt, max_new_tokens, sampling.temperature, ...), EPIC_ERR_BUSY when
 * max_queue requests wait, EPIC_ERR_CANCELLED after shutdown began. On error
 * no callback is ever called. */
epic_status epic_engine_submit(epic_engine *e, const epic_engine_request *r, uint64_t *id);
/* Rank 0, any thread: end the request (queued or running) with CANCELLED; its
 * pages are released in the next step. Unknown or finished ids are ignored. */
void epic_engine_cancel(epic_engine *e, uint64_t id);
void epic_engine_get_stats(epic_engine *e, epic_engine_stats *out);
/* Rank 0, any thread: tokens routed to each routed expert, summed over MoE
 * layers and ranks, as of the last step, into counts[0..n) (n = the config's
 * n_routed_experts). EPIC_ERR_UNSUPPORTED while the model cannot count them
 * (see model_expert_tokens in engine.c); EPIC_ERR_INVALID for a wrong n. */
epic_status epic_engine_expert_tokens(epic_engine *e, int64_t *counts, int64_t n);

/* Rank 0: run one step if there is work. *idle = 1 when nothing was queued or
 * running (no step ran). Other ranks must be inside epic_engine_run. */
epic_status epic_engine_step(epic_engine *e, int *idle);
/* Every rank: drive the engine until shutdown. Rank 0 steps while there is
 * work and sleeps otherwise (woken by submit); after epic_engine_shutdown it
 * either finishes every admitted and queued request (drain) or cancels them,
 * then releases the other ranks and returns. Other ranks follow rank 0's steps
 * and return when rank 0 does. Returns the first step error (all ranks). */
epic_status epic_engine_run(epic_engine *e);
/* Rank 0, any thread: stop admitting new requests (submit answers
 * EPIC_ERR_CANCELLED) and make epic_engine_run return once drained (drain = 1)
 * or at once after cancelling everything (drain = 0). */
void epic_engine_shutdown(epic_engine *e, int drain);
/* Rank 0, any thread: a job's input not read to its end yet (open = 1), or read (0; the
 * default). While it is open, epic_engine_run forms a step only once the queue holds as
 * many requests as could start (max_batch minus the running ones) or is full: admission
 * takes the queue's head in order, so every step's admissions are then what they would be
 * with the whole input queued, whenever its requests arrive. A batch job's steps, and so
 * its outputs where a row's rounding follows its step's shape (the GPUs' fast precision),
 * are then the same run after run. The caller must close it at the input's end (or on
 * error); a shutdown stops the waiting too. */
void epic_engine_set_input_open(epic_engine *e, int open);

#endif
