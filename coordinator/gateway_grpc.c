/* Small gRPC core / protobuf-c helpers of the gateway (gateway_impl.h). */
#define _GNU_SOURCE
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "coordinator/gateway_impl.h"

grpc_byte_buffer *epic_gw_pack(const ProtobufCMessage *m) {
  size_t n = protobuf_c_message_get_packed_size(m);
  grpc_slice s = grpc_slice_malloc(n);
  protobuf_c_message_pack(m, GRPC_SLICE_START_PTR(s));
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  return bb;
}

static size_t put_varint(uint8_t *out, uint64_t v) {
  size_t n = 0;
  do {
    out[n++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
    v >>= 7;
  } while (v);
  return n;
}

grpc_byte_buffer *epic_gw_pack_text(const ProtobufCMessage *m, uint32_t field, const char *text,
                                    size_t n) {
  uint8_t hdr[20];
  size_t h = 0;
  if (n) {
    h = put_varint(hdr, (uint64_t)field << 3 | 2); /* wire type 2: length-delimited */
    h += put_varint(hdr + h, n);
  }
  size_t base = protobuf_c_message_get_packed_size(m);
  grpc_slice s = grpc_slice_malloc(base + h + n);
  uint8_t *p = GRPC_SLICE_START_PTR(s);
  protobuf_c_message_pack(m, p);
  memcpy(p + base, hdr, h);
  if (n)
    memcpy(p + base + h, text, n);
  grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
  grpc_slice_unref(s);
  return bb;
}

ProtobufCMessage *epic_gw_unpack(const ProtobufCMessageDescriptor *d, grpc_byte_buffer *bb) {
  grpc_byte_buffer_reader r;
  if (!bb || !grpc_byte_buffer_reader_init(&r, bb))
    return NULL;
  grpc_slice all = grpc_byte_buffer_reader_readall(&r);
  ProtobufCMessage *m =
      protobuf_c_message_unpack(d, NULL, GRPC_SLICE_LENGTH(all), GRPC_SLICE_START_PTR(all));
  grpc_slice_unref(all);
  grpc_byte_buffer_reader_destroy(&r);
  return m;
}

grpc_byte_buffer *epic_gw_copy(grpc_byte_buffer *bb) {
  return bb ? grpc_byte_buffer_copy(bb) : NULL;
}

void epic_gw_format_addr(const char *listen, int port, char *out, size_t n) {
  const char *colon = strrchr(listen, ':');
  size_t host = colon ? (size_t)(colon - listen) : strlen(listen);
  if (host == 0)
    snprintf(out, n, "0.0.0.0:%d", port);
  else
    snprintf(out, n, "%.*s:%d", (int)host, listen, port);
}

gpr_timespec epic_gw_deadline(double seconds) {
  return gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
                      gpr_time_from_micros((int64_t)(seconds * 1e6), GPR_TIMESPAN));
}

/* ---- the listening side ------------------------------------------------------------ */

const char *const epic_gw_method_paths[EPIC_GW_M_UNKNOWN] = {
    EPIC_GW_PATH_GENERATE, EPIC_GW_PATH_TOKENIZE, EPIC_GW_PATH_MODELINFO, EPIC_GW_PATH_HEALTH};

const char *epic_gw_method_name(int method, const char *unknown_path) {
  return method >= 0 && method < EPIC_GW_M_UNKNOWN ? epic_gw_method_paths[method] : unknown_path;
}

void epic_gw_front_init(epic_gw_front *fr, const char *log) {
  memset(fr, 0, sizeof *fr);
  fr->log = log;
  fr->t_shutdown = (epic_gw_tag){EPIC_GW_TAG_SHUTDOWN, fr};
  fr->cq = grpc_completion_queue_create_for_next(NULL);
}

static void arm(epic_gw_front *fr, epic_gw_listener *l) {
  grpc_call_error e;
  l->call = NULL;
  l->payload = NULL;
  grpc_metadata_array_init(&l->md);
  if (l->method == EPIC_GW_M_UNKNOWN) {
    grpc_call_details_init(&l->details);
    e = grpc_server_request_call(fr->srv, &l->call, &l->details, &l->md, fr->cq, fr->cq, &l->tag);
  } else {
    e = grpc_server_request_registered_call(fr->srv, fr->methods[l->method], &l->call, &l->deadline,
                                            &l->md, &l->payload, fr->cq, fr->cq, &l->tag);
  }
  if (e != GRPC_CALL_OK) {
    EPIC_LOG_ERROR("%s: cannot wait for calls: %s", fr->log, grpc_call_error_to_string(e));
    grpc_metadata_array_destroy(&l->md);
    if (l->method == EPIC_GW_M_UNKNOWN)
      grpc_call_details_destroy(&l->details);
    return;
  }
  l->armed = 1;
}

char *epic_gw_read_pem(const char *flag, const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    EPIC_LOG_ERROR("%s %s: %s", flag, path, strerror(errno));
    return NULL;
  }
  char *buf = NULL;
  size_t n = 0, cap = 0;
  for (;;) {
    if (n + 4096 + 1 > cap) {
      cap = cap ? 2 * cap : 8192;
      char *p = cap <= (1u << 24) ? realloc(buf, cap) : NULL;
      if (!p) {
        EPIC_LOG_ERROR("%s %s: larger than 16 MiB or out of memory", flag, path);
        free(buf);
        fclose(f);
        return NULL;
      }
      buf = p;
    }
    size_t got = fread(buf + n, 1, cap - n - 1, f);
    n += got;
    if (got == 0)
      break;
  }
  int err = ferror(f);
  fclose(f);
  buf[n] = '\0';
  if (err || !strstr(buf, "-----BEGIN ")) {
    EPIC_LOG_ERROR("%s %s: %s", flag, path, err ? "read error" : "not a PEM file");
    free(buf);
    return NULL;
  }
  return buf;
}

/* Server credentials per sec: TLS (optionally requiring client certificates)
 * or, where the plaintext policy allows it, insecure. NULL after a message. */
static grpc_server_credentials *server_credentials(const char *log, const char *listen,
                                                   const epic_gw_security *sec) {
  int tls = sec && sec->tls_cert;
  if (epic_listen_check_plaintext(log, "--listen", listen, tls, sec && sec->plaintext) != EPIC_OK)
    return NULL;
  if (!tls)
    return grpc_insecure_server_credentials_create();
  if (!sec->tls_key) {
    EPIC_LOG_ERROR("%s: --tls-cert needs --tls-key", log);
    return NULL;
  }
  grpc_server_credentials *cr = NULL;
  char *cert = epic_gw_read_pem("--tls-cert", sec->tls_cert);
  char *key = cert ? epic_gw_read_pem("--tls-key", sec->tls_key) : NULL;
  char *ca = key && sec->tls_client_ca ? epic_gw_read_pem("--tls-client-ca", sec->tls_client_ca)
                                       : NULL;
  if (key && (!sec->tls_client_ca || ca)) {
    grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
    cr = grpc_ssl_server_credentials_create_ex(
        ca, &pair, 1,
        ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
           : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
        NULL);
    if (!cr)
      EPIC_LOG_ERROR("%s: gRPC refused the TLS credentials (--tls-cert/--tls-key/--tls-client-ca)",
                     log);
  }
  if (key)
    memset(key, 0, strlen(key)); /* private key material: do not leave it in freed memory */
  free(cert);
  free(key);
  free(ca);
  return cr;
}

grpc_channel_credentials *epic_gw_upstream_credentials(const epic_gw_security *sec) {
  if (!sec || !sec->upstream_ca) {
    if (sec && (sec->upstream_cert || sec->upstream_key)) {
      EPIC_LOG_ERROR("gateway: --upstream-cert/--upstream-key need --upstream-tls-ca");
      return NULL;
    }
    return grpc_insecure_credentials_create();
  }
  if (!sec->upstream_cert != !sec->upstream_key) {
    EPIC_LOG_ERROR("gateway: --upstream-cert and --upstream-key go together");
    return NULL;
  }
  grpc_channel_credentials *cc = NULL;
  char *ca = epic_gw_read_pem("--upstream-tls-ca", sec->upstream_ca);
  char *cert = ca && sec->upstream_cert ? epic_gw_read_pem("--upstream-cert", sec->upstream_cert)
                                        : NULL;
  char *key = cert ? epic_gw_read_pem("--upstream-key", sec->upstream_key) : NULL;
  if (ca && (!sec->upstream_cert || key)) {
    grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
    cc = grpc_ssl_credentials_create(ca, key ? &pair : NULL, NULL, NULL);
    if (!cc)
      EPIC_LOG_ERROR("gateway: gRPC refused the upstream TLS credentials");
  }
  if (key)
    memset(key, 0, strlen(key));
  free(ca);
  free(cert);
  free(key);
  return cc;
}

epic_status epic_gw_front_listen(epic_gw_front *fr, const char *listen, int64_t recv_cap,
                                 const epic_gw_security *sec) {
  grpc_arg args[1] = {{.type = GRPC_ARG_INTEGER,
                       .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
                       .value.integer = recv_cap > INT_MAX ? INT_MAX : (int)recv_cap}};
  grpc_channel_args ca = {.num_args = 1, .args = args};
  fr->srv = grpc_server_create(&ca, NULL);
  grpc_server_register_completion_queue(fr->srv, fr->cq, NULL);
  for (int m = 0; m < EPIC_GW_M_UNKNOWN; m++)
    fr->methods[m] = grpc_server_register_method(fr->srv, epic_gw_method_paths[m], NULL,
                                                 GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
  /* After the server exists, so that a refusal tears down like a bind failure. */
  grpc_server_credentials *cr = server_credentials(fr->log, listen, sec);
  if (!cr)
    return EPIC_ERR_INVALID;
  fr->port = grpc_server_add_http2_port(fr->srv, listen, cr);
  grpc_server_credentials_release(cr);
  if (fr->port <= 0) {
    EPIC_LOG_ERROR("%s: --listen %s: cannot listen on this address (in use, or not a host:port?)",
                   fr->log, listen);
    return EPIC_ERR_IO;
  }
  if (sec && sec->internal_listen) {
    grpc_server_credentials *in = grpc_insecure_server_credentials_create();
    int ip = grpc_server_add_http2_port(fr->srv, sec->internal_listen, in);
    grpc_server_credentials_release(in);
    if (ip <= 0) {
      EPIC_LOG_ERROR("%s: cannot listen on the internal socket %s", fr->log, sec->internal_listen);
      return EPIC_ERR_IO;
    }
  }
  grpc_server_start(fr->srv);
  fr->started = 1;
  for (int m = 0; m < EPIC_GW_M_COUNT; m++)
    for (int i = 0; i < EPIC_GW_LISTENERS; i++) {
      epic_gw_listener *l = &fr->listeners[m][i];
      l->tag = (epic_gw_tag){EPIC_GW_TAG_NEW, l};
      l->method = m;
      arm(fr, l);
    }
  return EPIC_OK;
}

/* Copies the authorization metadata out of md (gRPC owns md's slices). */
static void take_authz(grpc_metadata_array *md, epic_gw_authz *a) {
  a->len = 0;
  a->present = a->too_long = 0;
  a->value[0] = '\0';
  a->internal_len = 0;
  for (size_t i = 0; i < md->count; i++) {
    grpc_slice k = md->metadata[i].key, v = md->metadata[i].value;
    if (GRPC_SLICE_LENGTH(k) == 15 && memcmp(GRPC_SLICE_START_PTR(k), "x-epic-internal", 15) == 0 &&
        GRPC_SLICE_LENGTH(v) < sizeof a->internal) {
      a->internal_len = GRPC_SLICE_LENGTH(v);
      memcpy(a->internal, GRPC_SLICE_START_PTR(v), a->internal_len);
      continue;
    }
    if (GRPC_SLICE_LENGTH(k) != 13 || memcmp(GRPC_SLICE_START_PTR(k), "authorization", 13) != 0)
      continue;
    a->present = 1;
    size_t n = GRPC_SLICE_LENGTH(v);
    if (n >= sizeof a->value) {
      a->too_long = 1;
      a->len = 0;
    } else {
      memcpy(a->value, GRPC_SLICE_START_PTR(v), n);
      a->value[n] = '\0';
      a->len = n;
    }
  }
}

epic_auth_verdict epic_gw_admit(epic_auth *auth, const epic_gw_authz *authz, int stream,
                                epic_auth_grant *g, epic_auth_result *r) {
  if (!auth) {
    memset(g, 0, sizeof *g);
    memset(r, 0, sizeof *r);
    snprintf(r->principal, sizeof r->principal, "-");
    return EPIC_AUTH_OK;
  }
  if (authz->internal_len && epic_auth_is_internal(auth, authz->internal, authz->internal_len)) {
    /* This process's HTTP front admitted (and counts) the client already. */
    memset(g, 0, sizeof *g);
    memset(r, 0, sizeof *r);
    snprintf(r->principal, sizeof r->principal, "internal");
    return EPIC_AUTH_OK;
  }
  if (authz->too_long) {
    memset(g, 0, sizeof *g);
    memset(r, 0, sizeof *r);
    r->verdict = EPIC_AUTH_DENIED;
    snprintf(r->principal, sizeof r->principal, "-");
    snprintf(r->message, sizeof r->message, "authorization: invalid API key (too long)");
    return r->verdict;
  }
  return epic_auth_admit(auth, authz->present ? authz->value : NULL, authz->len, stream, g, r);
}

int epic_gw_front_accept(epic_gw_front *fr, epic_gw_listener *l, int ok, grpc_call **call,
                         grpc_byte_buffer **payload, char *method, size_t method_len,
                         epic_gw_authz *authz) {
  l->armed = 0;
  take_authz(&l->md, authz);
  *call = l->call;
  *payload = l->payload;
  if (method_len)
    method[0] = '\0';
  if (l->method == EPIC_GW_M_UNKNOWN && ok)
    snprintf(method, method_len, "%.*s", (int)GRPC_SLICE_LENGTH(l->details.method),
             (const char *)GRPC_SLICE_START_PTR(l->details.method));
  grpc_metadata_array_destroy(&l->md);
  if (l->method == EPIC_GW_M_UNKNOWN)
    grpc_call_details_destroy(&l->details);
  if (!fr->shutdown_started)
    arm(fr, l);
  if (ok && *call)
    return 1;
  if (*payload)
    grpc_byte_buffer_destroy(*payload);
  if (*call)
    grpc_call_unref(*call);
  *call = NULL;
  *payload = NULL;
  return 0;
}

void epic_gw_front_shutdown(epic_gw_front *fr) {
  if (fr->shutdown_started)
    return;
  fr->shutdown_started = 1;
  grpc_server_shutdown_and_notify(fr->srv, fr->cq, &fr->t_shutdown);
}

void epic_gw_front_cancel_all(epic_gw_front *fr) {
  if (fr->cancel_all_done)
    return;
  fr->cancel_all_done = 1;
  grpc_server_cancel_all_calls(fr->srv);
}

void epic_gw_front_poll(epic_gw_front *fr, gpr_timespec until, epic_gw_handler handle, void *user) {
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(fr->cq, until, NULL);
    if (ev.type != GRPC_OP_COMPLETE)
      return;
    handle(user, ev);
    until = gpr_inf_past(GPR_CLOCK_REALTIME);
  }
}

void epic_gw_front_wait(epic_gw_front *fr, epic_gw_busy_fn busy, epic_gw_handler handle,
                        void *user) {
  while (!fr->shutdown_done || busy(user)) {
    grpc_event ev = grpc_completion_queue_next(fr->cq, epic_gw_deadline(1.0), NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT) {
      EPIC_LOG_WARN("%s: waiting for gRPC calls to end", fr->log);
      continue;
    }
    if (ev.type == GRPC_QUEUE_SHUTDOWN)
      return;
    handle(user, ev);
  }
}

void epic_gw_front_drain_cq(epic_gw_front *fr, epic_gw_handler handle, void *user) {
  grpc_completion_queue_shutdown(fr->cq);
  for (;;) {
    grpc_event ev = grpc_completion_queue_next(fr->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    if (ev.type == GRPC_QUEUE_SHUTDOWN)
      return;
    handle(user, ev);
  }
}

/* ---- the server side of a call ------------------------------------------------------ */

void epic_gw_down_init(epic_gw_down *d, grpc_call *call, const char *log, int close_kind,
                       int send_kind, void *obj) {
  memset(d, 0, sizeof *d);
  d->call = call;
  d->log = log;
  d->t_close = (epic_gw_tag){close_kind, obj};
  d->t_send = (epic_gw_tag){send_kind, obj};
}

static int down_batch(epic_gw_down *d, const grpc_op *ops, size_t n, epic_gw_tag *tag) {
  grpc_call_error e = grpc_call_start_batch(d->call, ops, n, tag, NULL);
  if (e != GRPC_CALL_OK) {
    EPIC_LOG_ERROR("%s: %s", d->log, grpc_call_error_to_string(e));
    return -1;
  }
  d->pending++;
  return 0;
}

int epic_gw_down_recv_close(epic_gw_down *d) {
  grpc_op op;
  memset(&op, 0, sizeof op);
  op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
  op.data.recv_close_on_server.cancelled = &d->cancelled;
  return down_batch(d, &op, 1, &d->t_close);
}

/* Fills ops with the initial metadata (the first time) and msg, if any. */
static size_t send_ops(epic_gw_down *d, grpc_op *ops, grpc_byte_buffer *msg) {
  size_t n = 0;
  if (!d->md_sent) {
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    d->md_sent = 1;
  }
  if (msg) {
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = msg;
  }
  d->send_bb = msg;
  d->send_busy = 1;
  return n;
}

/* gRPC refused a send batch: no completion will come for it, so its message is freed
 * here (a later send would overwrite send_bb), and the call is cancelled. */
static void refused(epic_gw_down *d) {
  d->send_busy = 0;
  if (d->send_bb)
    grpc_byte_buffer_destroy(d->send_bb);
  d->send_bb = NULL;
  grpc_call_cancel(d->call, NULL);
}

int epic_gw_down_send(epic_gw_down *d, grpc_byte_buffer *bb) {
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  size_t n = send_ops(d, ops, bb);
  if (down_batch(d, ops, n, &d->t_send) != 0) {
    refused(d);
    return -1;
  }
  return 0;
}

void epic_gw_down_finish(epic_gw_down *d, grpc_status_code code, const char *details,
                         grpc_byte_buffer *msg) {
  epic_gw_down_finish_md(d, code, details, msg, NULL, 0);
}

void epic_gw_down_refuse(epic_gw_down *d, const epic_auth_result *r) {
  if (r->verdict == EPIC_AUTH_DENIED) {
    epic_gw_down_finish(d, GRPC_STATUS_UNAUTHENTICATED, r->message, NULL);
    return;
  }
  char ms[32];
  snprintf(ms, sizeof ms, "%lld", (long long)r->retry_after_ms);
  grpc_metadata md;
  memset(&md, 0, sizeof md);
  md.key = grpc_slice_from_static_string("retry-after-ms");
  md.value = grpc_slice_from_copied_string(ms);
  epic_gw_down_finish_md(d, GRPC_STATUS_RESOURCE_EXHAUSTED, r->message, NULL, &md, 1);
  grpc_slice_unref(md.value);
}

void epic_gw_down_finish_md(epic_gw_down *d, grpc_status_code code, const char *details,
                            grpc_byte_buffer *msg, const grpc_metadata *trail, size_t n_trail) {
  grpc_op ops[3];
  memset(ops, 0, sizeof ops);
  size_t n = send_ops(d, ops, msg);
  grpc_slice det = grpc_slice_from_copied_string(details ? details : "");
  ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[n].data.send_status_from_server.status = code;
  ops[n].data.send_status_from_server.trailing_metadata_count = n_trail;
  ops[n].data.send_status_from_server.trailing_metadata = (grpc_metadata *)trail;
  ops[n++].data.send_status_from_server.status_details = &det;
  d->status_started = 1;
  if (down_batch(d, ops, n, &d->t_send) != 0)
    refused(d);
  grpc_slice_unref(det);
}

void epic_gw_down_on_close(epic_gw_down *d) {
  d->pending--;
  d->closed = 1;
}

void epic_gw_down_on_send(epic_gw_down *d) {
  d->pending--;
  d->send_busy = 0;
  if (d->send_bb)
    grpc_byte_buffer_destroy(d->send_bb);
  d->send_bb = NULL;
}
