/* `epic batch`: an OpenAI batch file through the engine, resumable.
 *
 * Threads on rank 0: the main thread drives the engine (epic_engine_run, the
 * thread that initialised MPI, so the comm is used from one thread only); an IO
 * thread reads and tokenizes the input, submits every request it can (up to
 * the engine's queue), and appends each finished request's record to the
 * output with one fsync per group of records written together. The engine's
 * callbacks (driving thread) detokenize and watch for stop strings, and hand
 * finished requests to the IO thread through a mutex-protected list. Other
 * ranks only run epic_engine_run. */
#define _GNU_SOURCE
#include "cmd_batch.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "batch.h"
#include "cli_engine.h"
#include "cli_util.h"
#include "cmd_plan.h"
#include "cluster.h"
#include "comm/comm.h"
#include "common/clock.h"
#include "common/log.h"
#include "coordinator/tokenizer/chat.h"
#include "coordinator/tokenizer/tokenizer.h"
#include "engine.h"

static const char *USAGE_HEAD =
    "usage: epic batch --model DIR --input IN.jsonl --output OUT.jsonl [options]\n"
    "\n"
    "Runs an OpenAI batch file: each input line is\n"
    "  {\"custom_id\": \"...\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\",\n"
    "   \"body\": {\"messages\": [...], \"max_tokens\": N, \"temperature\": T, \"top_p\": P,\n"
    "            \"seed\": S, \"stop\": \"...\" | [...]}}\n"
    "(or url \"/v1/completions\" with a \"prompt\" string or token-id array). All\n"
    "requests run together on the engine; each result is appended to OUT.jsonl as\n"
    "soon as it finishes ({\"id\", \"custom_id\", \"response\": {\"status_code\": 200,\n"
    "\"body\": <chat.completion>}, \"error\": null}) and synced to disk. A malformed\n"
    "line gets an error record ({\"response\": null, \"error\": {\"code\", \"message\"}})\n"
    "and the job goes on. Rerun the same command after a crash or kill: requests\n"
    "whose custom_id is already in OUT.jsonl are skipped, nothing is lost or repeated.\n"
    "Without \"seed\" a seed derived from the line is used, so reruns sample alike.\n"
    "Runs on one process or under mpirun/srun (rank 0 reads and writes the files).\n"
    "\n"
    "files:\n"
    "  --model DIR             checkpoint directory (config.json, safetensors, tokenizer)\n"
    "  --input FILE            batch requests, one JSON object per line\n"
    "  --output FILE           results (appended; created if missing)\n"
    "requests:\n"
    "  --chat-template NAME    auto (from tokenizer_config.json), v3 or r1\n"
    "  --default-max-tokens N  completion tokens when a request gives no max_tokens\n"
    "                          (default 1024, clamped to the context)\n"
    "engine:\n";

static const char *USAGE_TAIL =
    "output:\n"
    "  --stats-json FILE       write the run's counts, tokens and rates as JSON to FILE\n"
    "                          (with MTP drafting: mtp_draft, mtp_drafted, mtp_accepted,\n"
    "                          mtp_acceptance_rate, mtp_mean_accepted per verify step;\n"
    "                          steps, forward_seconds, mtp_forward_seconds,\n"
    "                          graph_record_seconds: where the seconds went)\n"
    "  -q, --quiet             no progress lines (the summary is still printed)\n"
    "  -v, --verbose           engine and load information on stderr\n"
    "  -h, --help              this help\n";

typedef struct batch_opts {
  epic_cli_engine_opts e; /* model loading and engine scheduling */
  const char *input, *output, *template_name, *stats_json;
  int verbose, quiet;
  int64_t default_max_tokens;
  epic_chat_template tmpl;
} batch_opts;

/* One request on its way through the engine. Owned by the IO thread except
 * between submit and on_finish, when the driving thread's callbacks use it. */
typedef struct batch_job {
  struct batch_job *next; /* finished list */
  epic_batch_request *req;
  int32_t *prompt;
  int64_t n_prompt, max_new;
  epic_detok *detok;
  char *text;
  size_t len, cap;
  int stop_hit; /* a stop string ended the text */
  int failed;   /* detokenizing failed: cancelled from on_token */
  epic_engine_result res;
  struct batch_ctx *ctx;
} batch_job;

typedef struct batch_ctx {
  const batch_opts *o;
  epic_engine *engine;
  epic_tokenizer *tok;
  epic_chat_template tmpl;
  epic_batch_limits lim;
  const char *model_name;
  /* files (IO thread after start-up) */
  FILE *in;
  int out_fd;
  epic_batch_resume resume;
  epic_batch_index *seen; /* custom_id -> input line of this input */
  char *line;
  size_t line_cap;
  int64_t line_no, total;
  int eof, dirty;
  /* The engine waits for the input while it is open (epic_engine_set_input_open), so that
   * every step admits what it would with the whole input queued: the same steps, and the
   * same outputs in the GPUs' fast precision, run after run. Closed (IO thread) once every
   * request is submitted, or when feeding stops. */
  int input_open;
  epic_status io_status;
  /* counters (IO thread) */
  int64_t skipped, completed, errors, engine_failed, cancelled, inflight;
  int64_t prompt_tokens, completion_tokens;
  double t0, last_progress;
  int tty;
  /* shared with the driving thread, under mu */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  batch_job *done_head, *done_tail;
  int engine_stopped;
  int interrupted; /* the signal that stopped feeding, or 0 */
} batch_ctx;

/* Signal handlers have no context argument: the one flag they may set. */
static volatile sig_atomic_t g_signal;
static void on_signal(int sig) {
  g_signal = sig;
}

static void usage(const epic_cli_engine_opts *e) {
  fputs(USAGE_HEAD, stdout);
  epic_cli_engine_help(stdout, e, EPIC_CLI_ENGINE_SCHED_ALL, 26, NULL, 0);
  epic_cli_engine_help(stdout, e, EPIC_CLI_ENGINE_LOAD_ALL & ~EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_MODEL),
                       26, NULL, 0);
  fputs(USAGE_TAIL, stdout);
}

static int parse(int argc, char **argv, batch_opts *o) {
  enum { O_INPUT = 256, O_OUTPUT, O_TEMPLATE, O_DEFMAX, O_STATS };
  static const struct option own[] = {{"input", required_argument, 0, O_INPUT},
                                      {"output", required_argument, 0, O_OUTPUT},
                                      {"chat-template", required_argument, 0, O_TEMPLATE},
                                      {"default-max-tokens", required_argument, 0, O_DEFMAX},
                                      {"stats-json", required_argument, 0, O_STATS},
                                      {"quiet", no_argument, 0, 'q'},
                                      {"verbose", no_argument, 0, 'v'},
                                      {"help", no_argument, 0, 'h'},
                                      {0, 0, 0, 0}};
  struct option longopts[64];
  const char *cmd = "batch";
  int c;
  memset(o, 0, sizeof *o);
  /* Scheduling settings left 0 take the engine's defaults (engine.h); no
   * --kv-cache: --kv-pages or the engine's 1 GiB. */
  epic_cli_engine_init(&o->e, cmd,
                       (EPIC_CLI_ENGINE_LOAD_ALL | EPIC_CLI_ENGINE_SCHED_ALL) &
                           ~EPIC_CLI_ENGINE_BIT(EPIC_CLI_ENGINE_KV_CACHE));
  o->default_max_tokens = 1024;
  o->template_name = "auto";
  if (epic_cli_engine_longopts(&o->e, own, longopts, sizeof longopts / sizeof longopts[0]))
    return -1;
  optind = 1;
  while ((c = getopt_long(argc, argv, "qvh", longopts, NULL)) != -1) {
    int bad = epic_cli_engine_parse(&o->e, c, optarg);
    if (bad)
      bad = bad < 0;
    else
      switch (c) {
      case O_INPUT: o->input = optarg; break;
      case O_OUTPUT: o->output = optarg; break;
      case O_TEMPLATE: o->template_name = optarg; break;
      case O_DEFMAX:
        bad = epic_cli_i64(cmd, "--default-max-tokens", optarg, 1, INT32_MAX,
                           &o->default_max_tokens);
        break;
      case O_STATS: o->stats_json = optarg; break;
      case 'q': o->quiet = 1; break;
      case 'v': o->verbose = 1; break;
      case 'h': usage(&o->e); return 1;
      default: fputs("epic batch: see --help\n", stderr); return -1;
      }
    if (bad)
      return -1;
  }
  if (epic_cli_engine_check(&o->e, argc, argv))
    return -1;
  if (!o->input || !o->output) {
    fprintf(stderr, "epic batch: --%s is required (see --help)\n",
            !o->input ? "input FILE" : "output FILE");
    return -1;
  }
  if (epic_chat_template_parse(o->template_name, &o->tmpl) != EPIC_OK) {
    fprintf(stderr, "epic batch: --chat-template: expected auto, v3 or r1, got '%s'\n",
            o->template_name);
    return -1;
  }
  return 0;
}

/* ---- output ------------------------------------------------------------------ */

static void write_record(batch_ctx *c, char *rec, size_t len) {
  if (!rec) {
    if (c->io_status == EPIC_OK)
      c->io_status = EPIC_ERR_NOMEM;
    return;
  }
  /* One write per record on an O_APPEND descriptor: a kill leaves at most the
   * last line cut short, which the next run's scan drops. */
  size_t off = 0;
  while (off < len && c->io_status == EPIC_OK) {
    ssize_t w = write(c->out_fd, rec + off, len - off);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0) {
      EPIC_LOG_ERROR("batch: --output %s: write failed: %s", c->o->output, strerror(errno));
      c->io_status = EPIC_ERR_IO;
      break;
    }
    off += (size_t)w;
  }
  free(rec);
  c->dirty = 1;
}

static void sync_output(batch_ctx *c) {
  if (!c->dirty || c->io_status != EPIC_OK)
    return;
  if (fsync(c->out_fd) != 0) {
    EPIC_LOG_ERROR("batch: --output %s: fsync failed: %s", c->o->output, strerror(errno));
    c->io_status = EPIC_ERR_IO;
  }
  c->dirty = 0;
}

static void write_error(batch_ctx *c, const epic_batch_request *r, const char *code) {
  size_t len = 0;
  char *rec = epic_batch_format_error(r->id, r->custom_id, code, r->error, &len);
  write_record(c, rec, len);
  c->errors++;
}

/* ---- engine callbacks (driving thread) ------------------------------------------- */

/* Appends newly decoded text and cuts it at the first stop string. Returns
 * what on_token returns: 0 go on, 1 stop, -1 cancel. */
static int append_text(batch_job *j, const char *t, size_t n) {
  if (j->stop_hit)
    return 1;
  if (!n)
    return 0;
  if (j->len + n + 1 > j->cap) {
    size_t cap = j->cap ? j->cap : 256;
    while (cap < j->len + n + 1)
      cap *= 2;
    char *p = realloc(j->text, cap);
    if (!p) {
      j->failed = 1;
      return -1;
    }
    j->text = p;
    j->cap = cap;
  }
  size_t from = j->len;
  memcpy(j->text + j->len, t, n);
  j->len += n;
  j->text[j->len] = 0;
  int64_t at = epic_batch_find_stop(j->req, j->text, j->len, from);
  if (at < 0)
    return 0;
  j->len = (size_t)at;
  j->text[j->len] = 0;
  j->stop_hit = 1;
  return 1;
}

static int on_token(void *user, int32_t id, float logprob) {
  batch_job *j = user;
  char *t = NULL;
  size_t n = 0;
  (void)logprob;
  if (epic_detok_push(j->detok, id, &t, &n) != EPIC_OK) {
    j->failed = 1;
    return -1;
  }
  int rc = append_text(j, t, n);
  epic_tokenizer_text_free(t);
  return rc;
}

static void on_finish(void *user, const epic_engine_result *r) {
  batch_job *j = user;
  batch_ctx *c = j->ctx;
  j->res = *r;
  j->next = NULL;
  pthread_mutex_lock(&c->mu);
  if (c->done_tail)
    c->done_tail->next = j;
  else
    c->done_head = j;
  c->done_tail = j;
  pthread_cond_signal(&c->cv);
  pthread_mutex_unlock(&c->mu);
}

/* ---- jobs (IO thread) ---------------------------------------------------------- */

static void job_free(batch_job *j) {
  if (!j)
    return;
  epic_batch_request_free(j->req);
  free(j->prompt);
  epic_detok_destroy(j->detok);
  free(j->text);
  free(j);
}

/* The next line that needs the engine, writing error records for malformed
 * lines and skipping finished ones on the way; *out NULL at the end. */
static epic_status next_job(batch_ctx *c, batch_job **out) {
  ssize_t n;
  *out = NULL;
  while ((n = getline(&c->line, &c->line_cap, c->in)) >= 0) {
    size_t len = (size_t)n;
    c->line_no++;
    while (len && (c->line[len - 1] == '\n' || c->line[len - 1] == '\r'))
      len--;
    size_t k = 0;
    while (k < len && (c->line[k] == ' ' || c->line[k] == '\t'))
      k++;
    if (k == len)
      continue; /* blank lines are not requests */
    epic_batch_request *r = NULL;
    epic_status st = epic_batch_parse_line(c->line, len, c->line_no, &r);
    if (!r)
      return st;
    if (r->custom_id) {
      int64_t first = 0;
      int put = epic_batch_index_put(c->seen, r->custom_id, c->line_no, &first);
      if (put < 0) {
        epic_batch_request_free(r);
        return EPIC_ERR_NOMEM;
      }
      if (put == 0) {
        /* Its record gets custom_id null so that the output keeps one line per custom_id. */
        if (st == EPIC_OK)
          st = epic_batch_request_fail(r, "custom_id: \"%.200s\" was already used on line %lld",
                                       r->custom_id, (long long)first);
        free(r->custom_id);
        r->custom_id = NULL;
      }
    }
    int done = r->custom_id ? epic_batch_index_get(c->resume.custom_ids, r->custom_id, NULL)
                            : epic_batch_index_get(c->resume.ids, r->id, NULL);
    if (done) {
      c->skipped++;
      epic_batch_request_free(r);
      continue;
    }
    batch_job *j = NULL;
    if (st == EPIC_OK) {
      j = calloc(1, sizeof *j);
      if (!j) {
        epic_batch_request_free(r);
        return EPIC_ERR_NOMEM;
      }
      j->req = r;
      j->ctx = c;
      st = epic_batch_encode(r, c->tok, c->tmpl, &c->lim, &j->prompt, &j->n_prompt, &j->max_new);
      if (st == EPIC_OK)
        st = epic_detok_create(c->tok, EPIC_DECODE_GENERATED, &j->detok);
      if (st == EPIC_OK) {
        *out = j;
        return EPIC_OK;
      }
      j->req = NULL;
      job_free(j);
    }
    if (st != EPIC_ERR_INVALID) {
      epic_batch_request_free(r);
      return st;
    }
    write_error(c, r, "invalid_request");
    epic_batch_request_free(r);
    if (c->io_status != EPIC_OK)
      return c->io_status;
  }
  if (ferror(c->in)) {
    EPIC_LOG_ERROR("batch: --input %s: read error at line %lld", c->o->input,
                   (long long)c->line_no + 1);
    return EPIC_ERR_IO;
  }
  c->eof = 1;
  return EPIC_OK;
}

static epic_status submit(batch_ctx *c, batch_job *j) {
  const epic_batch_request *r = j->req;
  epic_engine_request er = {.size = sizeof er,
                            .prompt = j->prompt,
                            .n_prompt = j->n_prompt,
                            .max_new_tokens = j->max_new,
                            .sampling = {.size = sizeof(epic_sampling_params),
                                         .temperature = r->temperature,
                                         .top_p = r->top_p,
                                         .top_k = r->top_k,
                                         .seed = r->seed},
                            .ignore_eos = r->ignore_eos,
                            .on_token = on_token,
                            .on_finish = on_finish,
                            .user = j};
  return epic_engine_submit(c->engine, &er, NULL);
}

/* A request came back from the engine: its record, or nothing when it was
 * cancelled or failed (a rerun then does it again). */
static void finish_job(batch_ctx *c, batch_job *j) {
  c->inflight--;
  if (j->res.finish == EPIC_ENGINE_FINISH_ERROR) {
    c->engine_failed++;
    if (c->engine_failed == 1)
      EPIC_LOG_ERROR(
          "batch: line %lld: the engine failed (%s); no record written, a rerun retries it",
          (long long)j->req->line, epic_status_str(j->res.status));
    job_free(j);
    return;
  }
  if (j->res.finish == EPIC_ENGINE_FINISH_CANCELLED && !j->failed) {
    c->cancelled++; /* shutdown after a signal or an output error */
    job_free(j);
    return;
  }
  if (!j->failed && !j->stop_hit) {
    char *t = NULL;
    size_t n = 0;
    if (epic_detok_flush(j->detok, &t, &n) != EPIC_OK)
      j->failed = 1;
    else
      append_text(j, t, n);
    epic_tokenizer_text_free(t);
  }
  if (j->failed) {
    epic_batch_request_fail(j->req, "the generated tokens could not be decoded");
    write_error(c, j->req, "server_error");
    job_free(j);
    return;
  }
  epic_batch_output out = {.text = j->text,
                           .text_len = j->len,
                           .finish_stop = j->stop_hit || j->res.finish == EPIC_ENGINE_FINISH_STOP,
                           .prompt_tokens = j->res.prompt_tokens,
                           .completion_tokens = j->res.completion_tokens,
                           .created = (int64_t)time(NULL),
                           .model = j->req->model ? j->req->model : c->model_name};
  size_t len = 0;
  char *rec = epic_batch_format_result(j->req, &out, &len);
  write_record(c, rec, len);
  c->completed++;
  c->prompt_tokens += j->res.prompt_tokens;
  c->completion_tokens += j->res.completion_tokens;
  job_free(j);
}

static void fmt_eta(char *buf, size_t n, double s) {
  if (s < 0 || s > 1e8)
    snprintf(buf, n, "?");
  else if (s < 120)
    snprintf(buf, n, "%.0fs", s);
  else if (s < 7200)
    snprintf(buf, n, "%ldm%02lds", (long)s / 60, (long)s % 60);
  else
    snprintf(buf, n, "%.1fh", s / 3600);
}

/* done/total, requests/s and tokens/s of this run, ETA: on a terminal in place
 * every second, otherwise a line every 10 s. */
static void progress(batch_ctx *c, int final) {
  double now = epic_now_seconds();
  if (c->o->quiet || (!final && now - c->last_progress < (c->tty ? 1.0 : 10.0)))
    return;
  if (final && !c->tty)
    return;
  c->last_progress = now;
  double el = now - c->t0;
  int64_t mine = c->completed + c->errors, done = c->skipped + mine;
  double rps = el > 0 ? (double)mine / el : 0, tps = el > 0 ? (double)c->completion_tokens / el : 0;
  char eta[32];
  fmt_eta(eta, sizeof eta, rps > 0 ? (double)(c->total - done) / rps : -1);
  fprintf(stderr, "%sepic batch: %lld/%lld done (%lld errors), %.1f req/s, %.0f tok/s, ETA %s%s",
          c->tty ? "\r" : "", (long long)done, (long long)c->total, (long long)c->errors, rps, tps,
          eta, c->tty ? (final ? "\x1b[K\n" : "\x1b[K") : "\n");
}

static void *io_main(void *arg) {
  batch_ctx *c = arg;
  batch_job *pending = NULL;
  int feeding = 1;
  for (;;) {
    if (feeding && (g_signal || c->io_status != EPIC_OK)) {
      /* stop now: what already finished is written, the rest is for a rerun */
      feeding = 0;
      if (g_signal)
        c->interrupted = g_signal;
      epic_engine_shutdown(c->engine, 0);
    }
    while (feeding && c->io_status == EPIC_OK) {
      if (!pending) {
        epic_status st = next_job(c, &pending);
        if (st != EPIC_OK && c->io_status == EPIC_OK)
          c->io_status = st;
        if (!pending)
          break;
      }
      epic_status st = submit(c, pending);
      if (st == EPIC_OK) {
        c->inflight++;
        pending = NULL;
      } else if (st == EPIC_ERR_BUSY) {
        break; /* the queue is full: retry when a request finishes */
      } else if (st == EPIC_ERR_INVALID) {
        epic_batch_request_fail(pending->req, "the engine rejected the request (see the log)");
        write_error(c, pending->req, "invalid_request");
        job_free(pending);
        pending = NULL;
      } else {
        if (c->io_status == EPIC_OK)
          c->io_status = st;
        break;
      }
    }
    if (c->input_open && (!feeding || c->io_status != EPIC_OK || (c->eof && !pending))) {
      c->input_open = 0;
      epic_engine_set_input_open(c->engine, 0);
    }
    if (feeding && c->eof && !pending && c->inflight == 0)
      break;
    if (!feeding && c->inflight == 0)
      break;
    pthread_mutex_lock(&c->mu);
    if (!c->done_head && !c->engine_stopped && !g_signal && !(feeding && c->io_status != EPIC_OK)) {
      struct timespec ts;
      clock_gettime(CLOCK_REALTIME, &ts);
      /* while the engine may be waiting for the input, come back soon to refill the queue
       * (admissions free its slots without waking this thread) */
      ts.tv_nsec += (c->input_open ? 5 : 250) * 1000 * 1000;
      if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
      }
      pthread_cond_timedwait(&c->cv, &c->mu, &ts);
    }
    batch_job *list = c->done_head;
    c->done_head = c->done_tail = NULL;
    int stopped = c->engine_stopped;
    pthread_mutex_unlock(&c->mu);
    while (list) {
      batch_job *j = list;
      list = j->next;
      finish_job(c, j);
    }
    sync_output(c);
    progress(c, 0);
    if (stopped)
      break; /* epic_engine_run returned: nothing more will finish */
  }
  sync_output(c);
  job_free(pending);
  epic_engine_shutdown(c->engine, 1);
  return NULL;
}

/* ---- start-up (rank 0) --------------------------------------------------------- */

/* Opens and locks the output, drops a line cut short by a kill, indexes the
 * records already there, counts the input's requests and loads the tokenizer. */
static epic_status prepare(batch_ctx *c) {
  const batch_opts *o = c->o;
  struct stat si, so;
  c->in = fopen(o->input, "rb");
  if (!c->in) {
    EPIC_LOG_ERROR("batch: --input %s: %s", o->input, strerror(errno));
    return EPIC_ERR_IO;
  }
  /* the input is read twice (count, then run); the output is scanned, truncated and synced */
  if (fstat(fileno(c->in), &si) != 0 || !S_ISREG(si.st_mode)) {
    EPIC_LOG_ERROR("batch: --input %s: not a regular file", o->input);
    return EPIC_ERR_INVALID;
  }
  c->out_fd = open(o->output, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (c->out_fd < 0) {
    EPIC_LOG_ERROR("batch: --output %s: %s", o->output, strerror(errno));
    return EPIC_ERR_IO;
  }
  if (fstat(c->out_fd, &so) != 0 || !S_ISREG(so.st_mode)) {
    EPIC_LOG_ERROR("batch: --output %s: not a regular file", o->output);
    return EPIC_ERR_INVALID;
  }
  if (si.st_dev == so.st_dev && si.st_ino == so.st_ino) {
    EPIC_LOG_ERROR("batch: --output %s is the input file", o->output);
    return EPIC_ERR_INVALID;
  }
  if (flock(c->out_fd, LOCK_EX | LOCK_NB) != 0) {
    EPIC_LOG_ERROR("batch: --output %s: %s", o->output,
                   errno == EWOULDBLOCK ? "another epic batch is writing it" : strerror(errno));
    return EPIC_ERR_IO;
  }
  EPIC_CHECK(epic_batch_scan_output(o->output, &c->resume));
  if (fstat(c->out_fd, &so) != 0 || so.st_size != c->resume.keep_bytes) {
    if (ftruncate(c->out_fd, c->resume.keep_bytes) != 0 || fsync(c->out_fd) != 0) {
      EPIC_LOG_ERROR("batch: --output %s: cannot drop the unfinished last line: %s", o->output,
                     strerror(errno));
      return EPIC_ERR_IO;
    }
  }
  if (c->resume.dropped_bytes)
    EPIC_LOG_WARN("batch: --output %s: dropped an unfinished last line (%lld bytes) left by an "
                  "interrupted run",
                  o->output, (long long)c->resume.dropped_bytes);
  /* a first pass for the progress total: cheap next to running the requests */
  ssize_t n;
  while ((n = getline(&c->line, &c->line_cap, c->in)) >= 0) {
    ssize_t k = 0;
    while (k < n &&
           (c->line[k] == ' ' || c->line[k] == '\t' || c->line[k] == '\r' || c->line[k] == '\n'))
      k++;
    if (k < n)
      c->total++;
  }
  if (ferror(c->in) || fseek(c->in, 0, SEEK_SET) != 0) {
    EPIC_LOG_ERROR("batch: --input %s: read error", o->input);
    return EPIC_ERR_IO;
  }
  EPIC_CHECK(epic_batch_index_create(&c->seen));
  char path[4096];
  snprintf(path, sizeof path, "%s/tokenizer.json", o->e.model);
  if (access(path, R_OK) != 0) {
    EPIC_LOG_ERROR("batch: --model: %s is needed to encode prompts and decode results", path);
    return EPIC_ERR_IO;
  }
  EPIC_CHECK(epic_tokenizer_load_dir(o->e.model, &c->tok));
  c->tmpl = epic_chat_resolve(c->tok, o->tmpl);
  return EPIC_OK;
}

static void ctx_release(batch_ctx *c) {
  if (c->in)
    fclose(c->in);
  if (c->out_fd >= 0)
    close(c->out_fd);
  epic_batch_resume_free(&c->resume);
  epic_batch_index_destroy(c->seen);
  epic_tokenizer_destroy(c->tok);
  free(c->line);
  pthread_mutex_lock(&c->mu);
  batch_job *list = c->done_head;
  c->done_head = c->done_tail = NULL;
  pthread_mutex_unlock(&c->mu);
  while (list) {
    batch_job *j = list;
    list = j->next;
    job_free(j);
  }
}

static const char *base_name(const char *dir, char *buf, size_t n) {
  size_t len = strlen(dir);
  while (len > 1 && dir[len - 1] == '/')
    len--;
  size_t s = len;
  while (s > 0 && dir[s - 1] != '/')
    s--;
  snprintf(buf, n, "%.*s", (int)(len - s), dir + s);
  return buf;
}

static void summary(const batch_ctx *c, double seconds, epic_status engine_status) {
  double rps =
      seconds > 0 ? (double)c->completed / seconds : 0; /* completions, not error records */
  double tps = seconds > 0 ? (double)c->completion_tokens / seconds : 0;
  fprintf(stderr,
          "epic batch: %lld requests: %lld completed, %lld error records, %lld already in %s; "
          "%lld prompt + %lld completion tokens in %.2f s (%.2f req/s, %.1f completion tok/s, %.1f "
          "tok/s in all)\n",
          (long long)c->total, (long long)c->completed, (long long)c->errors, (long long)c->skipped,
          c->o->output, (long long)c->prompt_tokens, (long long)c->completion_tokens, seconds, rps,
          tps, seconds > 0 ? (double)(c->prompt_tokens + c->completion_tokens) / seconds : 0);
  if (c->interrupted)
    fprintf(stderr,
            "epic batch: interrupted (signal %d): rerun the same command to finish (at most %lld "
            "requests left)\n",
            c->interrupted, (long long)(c->total - c->completed - c->errors - c->skipped));
  else if (c->engine_failed || c->cancelled || c->io_status != EPIC_OK || engine_status != EPIC_OK)
    fprintf(stderr,
            "epic batch: stopped early (%s): rerun the same command to finish (at most %lld "
            "requests left)\n",
            c->io_status != EPIC_OK ? epic_status_str(c->io_status) : "engine error",
            (long long)(c->total - c->completed - c->errors - c->skipped));
  epic_engine_stats es;
  epic_engine_get_stats(c->engine, &es);
  const double acc_rate = es.mtp_drafted ? (double)es.mtp_accepted / (double)es.mtp_drafted : 0;
  const double mean_acc =
      es.mtp_verify_steps ? 1.0 + (double)es.mtp_accepted / (double)es.mtp_verify_steps : 0;
  if (es.mtp_draft > 0)
    fprintf(stderr,
            "epic batch: MTP drafting (%lld per step%s): %lld of %lld drafts accepted (%.1f%%), "
            "%.3f tokens per verify step; %lld sequences stopped drafting\n",
            (long long)es.mtp_draft, es.mtp_auto ? ", auto" : "", (long long)es.mtp_accepted,
            (long long)es.mtp_drafted, 100.0 * acc_rate, mean_acc, (long long)es.mtp_stopped);
  if (!c->o->stats_json)
    return;
  FILE *f = fopen(c->o->stats_json, "w");
  if (!f) {
    EPIC_LOG_ERROR("batch: --stats-json %s: %s", c->o->stats_json, strerror(errno));
    return;
  }
  /* seconds: from the first request read to the last record written (no model load) */
  fprintf(
      f,
      "{\"requests\": %lld, \"completed\": %lld, \"errors\": %lld, \"skipped\": %lld, "
      "\"prompt_tokens\": %lld, \"completion_tokens\": %lld, \"seconds\": %.6f, "
      "\"requests_per_s\": %.3f, \"completion_tokens_per_s\": %.3f, \"tokens_per_s\": %.3f, "
      "\"mtp_draft\": %lld, \"mtp_auto\": %s, \"mtp_verify_steps\": %lld, \"mtp_drafted\": %lld, "
      "\"mtp_accepted\": %lld, \"mtp_acceptance_rate\": %.6f, \"mtp_mean_accepted\": %.6f, "
      "\"mtp_stopped\": %lld, \"steps\": %lld, \"forward_seconds\": %.6f, "
      "\"mtp_forward_seconds\": %.6f, \"graph_record_seconds\": %.6f}\n",
      (long long)c->total, (long long)c->completed, (long long)c->errors, (long long)c->skipped,
      (long long)c->prompt_tokens, (long long)c->completion_tokens, seconds, rps, tps,
      seconds > 0 ? (double)(c->prompt_tokens + c->completion_tokens) / seconds : 0,
      (long long)es.mtp_draft, es.mtp_auto ? "true" : "false", (long long)es.mtp_verify_steps,
      (long long)es.mtp_drafted, (long long)es.mtp_accepted, acc_rate, mean_acc,
      (long long)es.mtp_stopped, (long long)es.steps, es.forward_s, es.mtp_forward_s,
      es.graph_record_s);
  if (fclose(f) != 0)
    EPIC_LOG_ERROR("batch: --stats-json %s: write failed", c->o->stats_json);
}

int epic_cmd_batch(int argc, char **argv) {
  batch_opts o;
  int pr = parse(argc, argv, &o);
  if (pr)
    return pr > 0 ? 0 : 2;
  epic_log_init(o.verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN, -1);

  batch_ctx c;
  memset(&c, 0, sizeof c);
  c.o = &o;
  c.out_fd = -1;
  pthread_mutex_init(&c.mu, NULL);
  pthread_cond_init(&c.cv, NULL);
  epic_cluster *cl = NULL;
  epic_engine *e = NULL;
  int rc = 1, rank = 0, launched = epic_cluster_under_launcher() || o.e.comm != NULL;
  char name[256];

  /* Without a launcher this process is rank 0: check the files before the
   * (possibly long) model load. Under one, rank 0 checks after the collective
   * load and tells the others whether to go on. */
  if (!launched && prepare(&c) != EPIC_OK)
    goto done;
  epic_cluster_params cp;
  epic_cli_engine_cluster_params(&o.e, &cp);
  cp.progress = !o.quiet;
  if (epic_cluster_open(&cp, &cl) != EPIC_OK)
    goto done;
  rank = epic_cluster_rank(cl);
  if (epic_cluster_size(cl) > 1)
    epic_log_init(o.verbose ? EPIC_LOG_LEVEL_INFO : EPIC_LOG_LEVEL_WARN, rank);
  if (launched) {
    int32_t go = rank == 0 ? prepare(&c) == EPIC_OK : 0;
    if (epic_comm_bcast(epic_cluster_comm(cl), &go, sizeof go, 0) != EPIC_OK || !go)
      goto done;
  }
  epic_model *model = epic_cluster_model(cl);
  const epic_model_config *cfg = epic_model_get_config(model);
  epic_engine_params ep;
  epic_cli_engine_engine_params(&o.e, model, epic_cluster_comm(cl), &ep);
  if (epic_engine_create(&ep, &e) != EPIC_OK)
    goto done;
  {
    /* a Ctrl-C or SIGTERM stops cleanly; other ranks follow rank 0's shutdown */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART; /* the engine's and MPI's blocking calls must not see EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
  }
  if (rank != 0) {
    rc = epic_engine_run(e) == EPIC_OK ? 0 : 1;
    goto done;
  }
  epic_engine_stats es;
  epic_engine_get_stats(e, &es);
  c.engine = e;
  c.model_name = base_name(o.e.model, name, sizeof name);
  c.lim = (epic_batch_limits){
      .vocab_size = cfg->vocab_size,
      .max_context = o.e.max_context ? o.e.max_context : cfg->max_position_embeddings,
      .max_seq_tokens = es.nranks > 0 ? es.kv_pages_total / es.nranks * o.e.page_size : 0,
      .default_max_tokens = o.default_max_tokens};
  c.tty = isatty(STDERR_FILENO);
  c.t0 = c.last_progress = epic_now_seconds();
  if (!o.quiet)
    fprintf(stderr, "epic batch: %lld requests in %s, %lld records already in %s%s\n",
            (long long)c.total, o.input, (long long)c.resume.records, o.output,
            c.resume.records ? " (resuming)" : "");
  pthread_t io;
  c.input_open = 1;
  epic_engine_set_input_open(e, 1);
  int started = pthread_create(&io, NULL, io_main, &c) == 0;
  if (!started) {
    EPIC_LOG_ERROR("batch: cannot start the IO thread");
    epic_engine_shutdown(e, 0);
  }
  epic_status st = epic_engine_run(e); /* returns once the IO thread shut the engine down */
  pthread_mutex_lock(&c.mu);
  c.engine_stopped = 1;
  pthread_cond_broadcast(&c.cv);
  pthread_mutex_unlock(&c.mu);
  if (started)
    pthread_join(io, NULL);
  progress(&c, 1);
  summary(&c, epic_now_seconds() - c.t0, st);
  if (c.interrupted)
    rc = 128 + c.interrupted;
  else
    rc = started && st == EPIC_OK && c.io_status == EPIC_OK && !c.engine_failed && !c.cancelled ? 0
                                                                                                : 1;
done:
  epic_engine_destroy(e); /* unfinished requests come back through on_finish: freed below */
  ctx_release(&c);
  epic_cluster_close(cl);
  pthread_mutex_destroy(&c.mu);
  pthread_cond_destroy(&c.cv);
  return rc;
}
