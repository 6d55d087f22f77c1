/* Small gRPC core / protobuf-c helpers of the gateway (gateway_impl.h). */
#define _GNU_SOURCE
#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <string.h>

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
