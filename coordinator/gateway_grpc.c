/* Small gRPC core / protobuf-c helpers of the gateway (gateway_impl.h). */
#define _GNU_SOURCE
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <limits.h>
#include <stdio.h>
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

epic_status epic_gw_front_listen(epic_gw_front *fr, const char *listen, int64_t recv_cap) {
  grpc_arg args[1] = {{.type = GRPC_ARG_INTEGER,
                       .key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH,
                       .value.integer = recv_cap > INT_MAX ? INT_MAX : (int)recv_cap}};
  grpc_channel_args ca = {.num_args = 1, .args = args};
  fr->srv = grpc_server_create(&ca, NULL);
  grpc_server_register_completion_queue(fr->srv, fr->cq, NULL);
  for (int m = 0; m < EPIC_GW_M_UNKNOWN; m++)
    fr->methods[m] = grpc_server_register_method(fr->srv, epic_gw_method_paths[m], NULL,
                                                 GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
  grpc_server_credentials *cr = grpc_insecure_server_credentials_create();
  fr->port = grpc_server_add_http2_port(fr->srv, listen, cr);
  grpc_server_credentials_release(cr);
  if (fr->port <= 0) {
    EPIC_LOG_ERROR("%s: --listen %s: cannot listen on this address (in use, or not a host:port?)",
                   fr->log, listen);
    return EPIC_ERR_IO;
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

int epic_gw_front_accept(epic_gw_front *fr, epic_gw_listener *l, int ok, grpc_call **call,
                         grpc_byte_buffer **payload, char *method, size_t method_len) {
  l->armed = 0;
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

int epic_gw_down_send(epic_gw_down *d, grpc_byte_buffer *bb) {
  grpc_op ops[2];
  memset(ops, 0, sizeof ops);
  size_t n = send_ops(d, ops, bb);
  if (down_batch(d, ops, n, &d->t_send) != 0) {
    d->send_busy = 0;
    grpc_call_cancel(d->call, NULL);
    return -1;
  }
  return 0;
}

void epic_gw_down_finish(epic_gw_down *d, grpc_status_code code, const char *details,
                         grpc_byte_buffer *msg) {
  grpc_op ops[3];
  memset(ops, 0, sizeof ops);
  size_t n = send_ops(d, ops, msg);
  grpc_slice det = grpc_slice_from_copied_string(details ? details : "");
  ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
  ops[n].data.send_status_from_server.status = code;
  ops[n++].data.send_status_from_server.status_details = &det;
  d->status_started = 1;
  if (down_batch(d, ops, n, &d->t_send) != 0) {
    d->send_busy = 0;
    grpc_call_cancel(d->call, NULL);
  }
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
