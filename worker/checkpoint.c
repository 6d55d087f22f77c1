/* Safetensors checkpoints (memory-mapped shards behind one name -> tensor hash
 * map) and the synthetic "dummy" checkpoint. The parser treats every header as
 * hostile: every size is overflow-checked and every range bounds-checked before
 * a pointer into the mapping is formed. */
#define _GNU_SOURCE
#include "checkpoint.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../common/log.h"

/* safetensors' own reader refuses headers above 100 MB. */
#define ST_MAX_HEADER 100000000ull
/* 2^53: larger JSON numbers are not exact integers. */
#define ST_INT_MAX 9007199254740992.0

/* ---------------------------------------------------------------- parser */

typedef struct st_dtype {
  const char *name;
  size_t size;
  epic_dtype dt;
} st_dtype;

static const st_dtype st_dtypes[] = {
    {"BOOL", 1, EPIC_DT_OTHER},    {"U8", 1, EPIC_DT_U8},          {"I8", 1, EPIC_DT_OTHER},
    {"F8_E5M2", 1, EPIC_DT_OTHER}, {"F8_E4M3", 1, EPIC_DT_F8E4M3}, {"I16", 2, EPIC_DT_OTHER},
    {"U16", 2, EPIC_DT_OTHER},     {"F16", 2, EPIC_DT_F16},        {"BF16", 2, EPIC_DT_BF16},
    {"I32", 4, EPIC_DT_I32},       {"U32", 4, EPIC_DT_OTHER},      {"F32", 4, EPIC_DT_F32},
    {"F64", 8, EPIC_DT_OTHER},     {"I64", 8, EPIC_DT_I64},        {"U64", 8, EPIC_DT_OTHER},
};

/* Element size of a safetensors dtype name; 0 (and EPIC_DT_OTHER) if unknown,
 * in which case the byte count cannot be cross-checked, only bounded. */
static size_t st_dtype_lookup(const char *s, epic_dtype *dt) {
  for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++) {
    if (strcmp(s, st_dtypes[i].name) == 0) {
      *dt = st_dtypes[i].dt;
      return st_dtypes[i].size;
    }
  }
  *dt = EPIC_DT_OTHER;
  return 0;
}

static int json_uint(const cJSON *v, uint64_t *out) {
  if (!cJSON_IsNumber(v)) return 0;
  double d = v->valuedouble;
  if (!(d >= 0.0) || d > ST_INT_MAX || d != floor(d)) return 0;
  *out = (uint64_t)d;
  return 1;
}

void epic_safetensors_free(epic_tensor_info *t, size_t n) {
  if (!t) return;
  for (size_t i = 0; i < n; i++)
    free((char *)t[i].name);
  if (n > 0) free((char *)t[0].file);
  free(t);
}

static const char *base_name(const char *path) {
  const char *s = strrchr(path, '/');
  return s ? s + 1 : path;
}

typedef struct st_range {
  uint64_t b, e;
  size_t idx;
} st_range;

static int cmp_range(const void *a, const void *b) {
  const st_range *x = a, *y = b;
  if (x->b != y->b) return x->b < y->b ? -1 : 1;
  if (x->e != y->e) return x->e < y->e ? -1 : 1;
  return 0;
}

static int cmp_name_ptr(const void *a, const void *b) {
  const epic_tensor_info *const *x = a, *const *y = b;
  return strcmp((*x)->name, (*y)->name);
}

epic_status epic_safetensors_parse(const uint8_t *buf, size_t len, const char *src,
                                   epic_tensor_info **out, size_t *n_out) {
  epic_status st = EPIC_ERR_INVALID;
  char *hdr = NULL;
  cJSON *root = NULL;
  epic_tensor_info *t = NULL;
  st_range *ranges = NULL;
  const epic_tensor_info **byname = NULL;
  size_t n = 0, cap = 0;
  uint64_t hlen = 0, data_len;

  if (!src) src = "(safetensors)";
  if (!out || !n_out || (!buf && len)) return EPIC_ERR_INVALID;
  *out = NULL;
  *n_out = 0;
  if (len < 8) {
    EPIC_LOG_ERROR("%s: file too short for a safetensors header (%zu bytes)", src, len);
    return EPIC_ERR_INVALID;
  }
  for (int i = 7; i >= 0; i--)
    hlen = (hlen << 8) | buf[i];
  if (hlen > ST_MAX_HEADER) {
    EPIC_LOG_ERROR("%s: safetensors header length %llu exceeds the %llu-byte limit", src,
                   (unsigned long long)hlen, ST_MAX_HEADER);
    return EPIC_ERR_INVALID;
  }
  if (hlen > len - 8) {
    EPIC_LOG_ERROR("%s: safetensors header length %llu points past the end of the file "
                   "(%zu bytes; truncated?)",
                   src, (unsigned long long)hlen, len);
    return EPIC_ERR_INVALID;
  }
  data_len = len - 8 - hlen;

  /* A NUL-terminated private copy: cJSON never reads past it, whatever the bytes. */
  hdr = malloc(hlen + 1);
  if (!hdr) return EPIC_ERR_NOMEM;
  memcpy(hdr, buf + 8, hlen);
  hdr[hlen] = '\0';
  root = cJSON_ParseWithLength(hdr, hlen);
  if (!root || !cJSON_IsObject(root)) {
    EPIC_LOG_ERROR("%s: safetensors header is not a valid JSON object", src);
    goto fail;
  }
  const cJSON *e;
  cJSON_ArrayForEach(e, root) cap++;
  t = calloc(cap ? cap : 1, sizeof *t);
  if (!t) {
    st = EPIC_ERR_NOMEM;
    goto fail;
  }
  cJSON_ArrayForEach(e, root) {
    const char *name = e->string;
    if (!name) {
      EPIC_LOG_ERROR("%s: safetensors header entry without a name", src);
      goto fail;
    }
    if (strcmp(name, "__metadata__") == 0) continue;
    if (!cJSON_IsObject(e)) {
      EPIC_LOG_ERROR("%s: tensor %s: header entry is not an object", src, name);
      goto fail;
    }
    epic_tensor_info *ti = &t[n];
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt) || !dt->valuestring) {
      EPIC_LOG_ERROR("%s: tensor %s: \"dtype\" missing or not a string", src, name);
      goto fail;
    }
    size_t esize = st_dtype_lookup(dt->valuestring, &ti->dtype);
    if (!cJSON_IsArray(shape) || cJSON_GetArraySize(shape) > EPIC_MAX_DIMS) {
      EPIC_LOG_ERROR("%s: tensor %s: \"shape\" missing, not an array or more than %d dims", src,
                     name, EPIC_MAX_DIMS);
      goto fail;
    }
    uint64_t numel = 1;
    const cJSON *d;
    int nd = 0;
    cJSON_ArrayForEach(d, shape) {
      uint64_t v;
      if (!json_uint(d, &v)) {
        EPIC_LOG_ERROR("%s: tensor %s: shape has a non-integer or negative dimension", src, name);
        goto fail;
      }
      if (__builtin_mul_overflow(numel, v, &numel)) {
        EPIC_LOG_ERROR("%s: tensor %s: shape element count overflows", src, name);
        goto fail;
      }
      ti->shape[nd++] = (int64_t)v;
    }
    ti->ndim = nd;
    uint64_t b, en, nbytes;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
        !json_uint(cJSON_GetArrayItem(offs, 0), &b) ||
        !json_uint(cJSON_GetArrayItem(offs, 1), &en) || b > en) {
      EPIC_LOG_ERROR("%s: tensor %s: \"data_offsets\" must be [begin, end] with 0 <= begin <= "
                     "end",
                     src, name);
      goto fail;
    }
    if (en > data_len) {
      EPIC_LOG_ERROR("%s: tensor %s: data_offsets [%llu, %llu] run past the end of the data "
                     "(%llu bytes; truncated file?)",
                     src, name, (unsigned long long)b, (unsigned long long)en,
                     (unsigned long long)data_len);
      goto fail;
    }
    if (esize) {
      if (__builtin_mul_overflow(numel, (uint64_t)esize, &nbytes) || nbytes != en - b) {
        EPIC_LOG_ERROR("%s: tensor %s: %llu bytes in data_offsets but shape x %s needs %llu", src,
                       name, (unsigned long long)(en - b), dt->valuestring,
                       (unsigned long long)numel * esize);
        goto fail;
      }
    }
    ti->name = strdup(name);
    if (!ti->name) {
      st = EPIC_ERR_NOMEM;
      goto fail;
    }
    ti->data = buf + 8 + hlen + b;
    ti->nbytes = (size_t)(en - b);
    n++;
  }

  if (n > 0) {
    /* Overlapping byte ranges would let one tensor alias another. */
    ranges = malloc(n * sizeof *ranges);
    byname = malloc(n * sizeof *byname);
    if (!ranges || !byname) {
      st = EPIC_ERR_NOMEM;
      goto fail;
    }
    const uint8_t *d0 = buf + 8 + hlen;
    for (size_t i = 0; i < n; i++) {
      ranges[i].b = (uint64_t)((const uint8_t *)t[i].data - d0);
      ranges[i].e = ranges[i].b + t[i].nbytes;
      ranges[i].idx = i;
      byname[i] = &t[i];
    }
    qsort(ranges, n, sizeof *ranges, cmp_range);
    uint64_t end = 0;
    size_t last = 0;
    for (size_t i = 0; i < n; i++) {
      if (ranges[i].b == ranges[i].e) continue;
      if (ranges[i].b < end) {
        EPIC_LOG_ERROR("%s: tensors %s and %s have overlapping data ranges", src, t[last].name,
                       t[ranges[i].idx].name);
        goto fail;
      }
      end = ranges[i].e;
      last = ranges[i].idx;
    }
    qsort(byname, n, sizeof *byname, cmp_name_ptr);
    for (size_t i = 1; i < n; i++) {
      if (strcmp(byname[i - 1]->name, byname[i]->name) == 0) {
        EPIC_LOG_ERROR("%s: tensor %s appears twice in the header", src, byname[i]->name);
        goto fail;
      }
    }
    char *file = strdup(base_name(src));
    if (!file) {
      st = EPIC_ERR_NOMEM;
      goto fail;
    }
    for (size_t i = 0; i < n; i++)
      t[i].file = file;
  }
  *out = t;
  *n_out = n;
  t = NULL;
  st = EPIC_OK;
fail:
  if (t) {
    for (size_t i = 0; i < n; i++)
      free((char *)t[i].name);
    free(t);
  }
  free(ranges);
  free(byname);
  cJSON_Delete(root);
  free(hdr);
  return st;
}

/* ------------------------------------------------------------ checkpoint */

typedef struct ck_shard {
  char *path;
  void *map;
  size_t len;
  epic_tensor_info *t;
  size_t n;
} ck_shard;

typedef struct ck_entry {
  epic_tensor_info *t;
  unsigned char used;  /* written with relaxed atomics: lookups may run concurrently */
  unsigned char owned; /* dummy tensor: t, its name and data are heap blocks */
} ck_entry;

struct epic_checkpoint {
  epic_model_config cfg;
  char *dir;
  ck_shard *shards;
  size_t n_shards;
  ck_entry *ents;
  size_t n_ents, cap_ents;
  int64_t *slots; /* open addressing into ents, -1 = empty; size is a power of two */
  size_t n_slots;
  size_t bytes;
  int dummy;
  uint64_t seed;
  float successor;    /* epic_checkpoint_set_mtp_successor's alpha; 0 = off */
  pthread_mutex_t mu; /* dummy only: on-demand creation mutates the map */
};

static uint64_t hash_name(const char *s) {
  uint64_t h = 1469598103934665603ull; /* FNV-1a */
  for (; *s; s++)
    h = (h ^ (uint8_t)*s) * 1099511628211ull;
  return h;
}

static ck_entry *ck_lookup(const epic_checkpoint *ck, const char *name) {
  if (!ck->n_slots) return NULL;
  size_t mask = ck->n_slots - 1;
  for (size_t i = hash_name(name) & mask;; i = (i + 1) & mask) {
    int64_t k = ck->slots[i];
    if (k < 0) return NULL;
    if (strcmp(ck->ents[k].t->name, name) == 0) return &ck->ents[k];
  }
}

static epic_status ck_rehash(epic_checkpoint *ck, size_t n_slots) {
  int64_t *s = malloc(n_slots * sizeof *s);
  if (!s) return EPIC_ERR_NOMEM;
  for (size_t i = 0; i < n_slots; i++)
    s[i] = -1;
  for (size_t k = 0; k < ck->n_ents; k++) {
    size_t i = hash_name(ck->ents[k].t->name) & (n_slots - 1);
    while (s[i] >= 0)
      i = (i + 1) & (n_slots - 1);
    s[i] = (int64_t)k;
  }
  free(ck->slots);
  ck->slots = s;
  ck->n_slots = n_slots;
  return EPIC_OK;
}

/* Insert t (name must be new). */
static epic_status ck_insert(epic_checkpoint *ck, epic_tensor_info *t, int owned) {
  if (ck->n_ents == ck->cap_ents) {
    size_t cap = ck->cap_ents ? 2 * ck->cap_ents : 256;
    ck_entry *e = realloc(ck->ents, cap * sizeof *e);
    if (!e) return EPIC_ERR_NOMEM;
    ck->ents = e;
    ck->cap_ents = cap;
  }
  if (2 * (ck->n_ents + 1) > ck->n_slots) {
    size_t ns = ck->n_slots ? 2 * ck->n_slots : 512;
    while (2 * (ck->n_ents + 1) > ns)
      ns *= 2;
    EPIC_CHECK(ck_rehash(ck, ns));
  }
  ck->ents[ck->n_ents] = (ck_entry){.t = t, .used = 0, .owned = (unsigned char)owned};
  size_t i = hash_name(t->name) & (ck->n_slots - 1);
  while (ck->slots[i] >= 0)
    i = (i + 1) & (ck->n_slots - 1);
  ck->slots[i] = (int64_t)ck->n_ents++;
  return EPIC_OK;
}

static epic_checkpoint *ck_new(void) {
  epic_checkpoint *ck = calloc(1, sizeof *ck);
  if (!ck) return NULL;
  pthread_mutex_init(&ck->mu, NULL);
  return ck;
}

void epic_checkpoint_close(epic_checkpoint *ck) {
  if (!ck) return;
  for (size_t k = 0; k < ck->n_ents; k++) {
    if (!ck->ents[k].owned) continue;
    epic_tensor_info *t = ck->ents[k].t;
    free((char *)t->name);
    free((void *)t->data);
    free(t);
  }
  for (size_t i = 0; i < ck->n_shards; i++) {
    epic_safetensors_free(ck->shards[i].t, ck->shards[i].n);
    if (ck->shards[i].map) munmap(ck->shards[i].map, ck->shards[i].len);
    free(ck->shards[i].path);
  }
  free(ck->shards);
  free(ck->ents);
  free(ck->slots);
  free(ck->dir);
  pthread_mutex_destroy(&ck->mu);
  free(ck);
}

/* Whole small file (index.json) into a NUL-terminated buffer. */
static epic_status read_small_file(const char *path, char **out, size_t *len) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  struct stat sb;
  char *buf = NULL;
  size_t got = 0;
  if (fd < 0) {
    EPIC_LOG_ERROR("%s: cannot open: %s", path, strerror(errno));
    return EPIC_ERR_IO;
  }
  if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size > (off_t)1 << 30) {
    EPIC_LOG_ERROR("%s: not a regular file of sane size", path);
    close(fd);
    return EPIC_ERR_IO;
  }
  buf = malloc((size_t)sb.st_size + 1);
  if (!buf) {
    close(fd);
    return EPIC_ERR_NOMEM;
  }
  while (got < (size_t)sb.st_size) {
    ssize_t r = read(fd, buf + got, (size_t)sb.st_size - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      EPIC_LOG_ERROR("%s: read failed: %s", path, r < 0 ? strerror(errno) : "short file");
      free(buf);
      close(fd);
      return EPIC_ERR_IO;
    }
    got += (size_t)r;
  }
  close(fd);
  buf[got] = '\0';
  *out = buf;
  *len = got;
  return EPIC_OK;
}

/* Map and parse DIR/file, then add its tensors to the map. Returns the shard index. */
static epic_status ck_add_shard(epic_checkpoint *ck, const char *file, size_t *idx_out) {
  char path[4096];
  struct stat sb;
  epic_status st;
  if (snprintf(path, sizeof path, "%s/%s", ck->dir, file) >= (int)sizeof path) {
    EPIC_LOG_ERROR("%s/%s: path too long", ck->dir, file);
    return EPIC_ERR_INVALID;
  }
  ck_shard *ns = realloc(ck->shards, (ck->n_shards + 1) * sizeof *ns);
  if (!ns) return EPIC_ERR_NOMEM;
  ck->shards = ns;
  ck_shard *s = &ck->shards[ck->n_shards];
  memset(s, 0, sizeof *s);
  s->path = strdup(path);
  if (!s->path) return EPIC_ERR_NOMEM;
  ck->n_shards++; /* from here close() releases whatever s holds */

  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    EPIC_LOG_ERROR("%s: cannot open checkpoint shard: %s", path, strerror(errno));
    return EPIC_ERR_IO;
  }
  if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
    EPIC_LOG_ERROR("%s: not a regular file", path);
    close(fd);
    return EPIC_ERR_IO;
  }
  if (sb.st_size < 8) {
    EPIC_LOG_ERROR("%s: file too short for a safetensors header (%lld bytes)", path,
                   (long long)sb.st_size);
    close(fd);
    return EPIC_ERR_INVALID;
  }
  void *map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) {
    EPIC_LOG_ERROR("%s: mmap failed: %s", path, strerror(errno));
    return EPIC_ERR_IO;
  }
  s->map = map;
  s->len = (size_t)sb.st_size;
  ck->bytes += s->len;
  EPIC_CHECK(epic_safetensors_parse(map, s->len, path, &s->t, &s->n));
  for (size_t i = 0; i < s->n; i++) {
    ck_entry *prev = ck_lookup(ck, s->t[i].name);
    if (prev) {
      EPIC_LOG_ERROR("%s: tensor %s is also in %s", path, s->t[i].name, prev->t->file);
      return EPIC_ERR_INVALID;
    }
    st = ck_insert(ck, &s->t[i], 0);
    if (st < 0) return st;
  }
  *idx_out = ck->n_shards - 1;
  return EPIC_OK;
}

static epic_status ck_open_index(epic_checkpoint *ck, const char *ipath) {
  char *txt = NULL;
  size_t len = 0;
  cJSON *root = NULL;
  epic_status st;
  EPIC_CHECK(read_small_file(ipath, &txt, &len));
  st = EPIC_ERR_INVALID;
  root = cJSON_ParseWithLength(txt, len);
  if (!root || !cJSON_IsObject(root)) {
    EPIC_LOG_ERROR("%s: malformed JSON", ipath);
    goto fail;
  }
  const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
  if (!cJSON_IsObject(wm)) {
    EPIC_LOG_ERROR("%s: \"weight_map\" missing or not an object", ipath);
    goto fail;
  }
  const cJSON *e;
  /* Pass 1: open every distinct shard once (the map lists them many times). */
  cJSON_ArrayForEach(e, wm) {
    if (!cJSON_IsString(e) || !e->valuestring || !e->string) {
      EPIC_LOG_ERROR("%s: weight_map entry %s is not a file name string", ipath,
                     e->string ? e->string : "?");
      goto fail;
    }
    const char *f = e->valuestring;
    if (!*f || strchr(f, '/') || strcmp(f, "..") == 0 || strcmp(f, ".") == 0) {
      EPIC_LOG_ERROR("%s: weight_map entry %s names an invalid shard file \"%s\"", ipath, e->string,
                     f);
      goto fail;
    }
    int seen = 0;
    for (size_t i = ck->n_shards; i-- > 0 && !seen;)
      seen = strcmp(base_name(ck->shards[i].path), f) == 0;
    if (!seen) {
      size_t idx;
      EPIC_CHECK_GOTO(ck_add_shard(ck, f, &idx), st, fail);
    }
  }
  /* Pass 2: every mapped name must live in the file the map says. */
  cJSON_ArrayForEach(e, wm) {
    ck_entry *ent = ck_lookup(ck, e->string);
    if (!ent || strcmp(ent->t->file, e->valuestring) != 0) {
      if (!ent)
        EPIC_LOG_ERROR("%s: weight_map says tensor %s is in %s, but that file does not "
                       "contain it",
                       ipath, e->string, e->valuestring);
      else
        EPIC_LOG_ERROR("%s: weight_map says tensor %s is in %s, but it is in %s", ipath, e->string,
                       e->valuestring, ent->t->file);
      st = EPIC_ERR_INVALID;
      goto fail;
    }
  }
  if (ck->n_shards == 0) {
    EPIC_LOG_ERROR("%s: weight_map is empty", ipath);
    goto fail;
  }
  st = EPIC_OK;
fail:
  cJSON_Delete(root);
  free(txt);
  return st;
}

epic_status epic_checkpoint_open(const char *dir, epic_checkpoint **out) {
  char ipath[4096];
  epic_status st;
  epic_checkpoint *ck;
  if (!dir || !out) return EPIC_ERR_INVALID;
  *out = NULL;
  ck = ck_new();
  if (!ck) return EPIC_ERR_NOMEM;
  ck->dir = strdup(dir);
  if (!ck->dir) {
    st = EPIC_ERR_NOMEM;
    goto fail;
  }
  EPIC_CHECK_GOTO(epic_config_load_dir(dir, &ck->cfg), st, fail);
  if (snprintf(ipath, sizeof ipath, "%s/model.safetensors.index.json", dir) >= (int)sizeof ipath) {
    EPIC_LOG_ERROR("%s: path too long", dir);
    st = EPIC_ERR_INVALID;
    goto fail;
  }
  if (access(ipath, F_OK) == 0) {
    EPIC_CHECK_GOTO(ck_open_index(ck, ipath), st, fail);
  } else {
    size_t idx;
    char spath[4096];
    snprintf(spath, sizeof spath, "%s/model.safetensors", dir);
    if (access(spath, F_OK) != 0) {
      EPIC_LOG_ERROR("%s: no model.safetensors.index.json or model.safetensors", dir);
      st = EPIC_ERR_IO;
      goto fail;
    }
    EPIC_CHECK_GOTO(ck_add_shard(ck, "model.safetensors", &idx), st, fail);
  }
  EPIC_LOG_INFO("checkpoint %s: %zu tensors in %zu shard(s), %.2f GB", dir, ck->n_ents,
                ck->n_shards, (double)ck->bytes / 1e9);
  *out = ck;
  return EPIC_OK;
fail:
  epic_checkpoint_close(ck);
  return st;
}

epic_status epic_checkpoint_open_dummy(const epic_model_config *cfg, uint64_t seed,
                                       epic_checkpoint **out) {
  if (!cfg || !out) return EPIC_ERR_INVALID;
  *out = NULL;
  epic_checkpoint *ck = ck_new();
  if (!ck) return EPIC_ERR_NOMEM;
  ck->cfg = *cfg;
  ck->dummy = 1;
  ck->seed = seed;
  ck->dir = strdup("dummy");
  if (!ck->dir) {
    epic_checkpoint_close(ck);
    return EPIC_ERR_NOMEM;
  }
  *out = ck;
  return EPIC_OK;
}

epic_status epic_checkpoint_set_mtp_successor(epic_checkpoint *ck, float alpha) {
  if (!ck || !ck->dummy || !(alpha > 0.0f && alpha <= 1.0f) || ck->n_ents)
    return EPIC_ERR_INVALID;
  ck->successor = alpha;
  return EPIC_OK;
}

const epic_model_config *epic_checkpoint_config(const epic_checkpoint *ck) { return &ck->cfg; }
epic_model_config *epic_checkpoint_config_mut(epic_checkpoint *ck) { return &ck->cfg; }
size_t epic_checkpoint_bytes(const epic_checkpoint *ck) { return ck ? ck->bytes : 0; }

const epic_tensor_info *epic_checkpoint_find(const epic_checkpoint *ck, const char *name) {
  if (!ck || !name) return NULL;
  if (ck->dummy) {
    epic_checkpoint *m = (epic_checkpoint *)ck; /* the lock is not part of the value */
    pthread_mutex_lock(&m->mu);
    ck_entry *e = ck_lookup(ck, name);
    pthread_mutex_unlock(&m->mu);
    return e ? e->t : NULL;
  }
  ck_entry *e = ck_lookup(ck, name);
  return e ? e->t : NULL;
}

/* ------------------------------------------------------------ dummy data */

static uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* Word i of the stream keyed by `key`: splitmix64 in counter form, so chunks
 * can be generated in parallel and the result never depends on thread count. */
static inline uint64_t stream_word(uint64_t key, uint64_t i) {
  return mix64(key + (i + 1) * 0x9e3779b97f4a7c15ull);
}

static int ends_with(const char *s, const char *suffix) {
  size_t n = strlen(s), m = strlen(suffix);
  return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Uniform in [-1, 1) from 16 bits. */
static inline float u16_signed(uint64_t bits) {
  return ((float)(int)(bits & 0xffff) - 32768.0f) * (1.0f / 32768.0f);
}

/* Truncating fp32 -> bf16 is fine for random data and much cheaper than RNE. */
static inline uint16_t bf16_trunc(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

static void fill_bf16(uint16_t *d, int64_t n, uint64_t key, float center, float amp) {
  const int64_t words = n / 4;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t w = 0; w < words; w++) {
    const uint64_t r = stream_word(key, (uint64_t)w);
    uint16_t *o = d + 4 * w;
    o[0] = bf16_trunc(center + amp * u16_signed(r));
    o[1] = bf16_trunc(center + amp * u16_signed(r >> 16));
    o[2] = bf16_trunc(center + amp * u16_signed(r >> 32));
    o[3] = bf16_trunc(center + amp * u16_signed(r >> 48));
  }
  const uint64_t r = stream_word(key, (uint64_t)words);
  for (int64_t i = 4 * words; i < n; i++)
    d[i] = bf16_trunc(center + amp * u16_signed(r >> (16 * (i - 4 * words))));
}

static void fill_f32(float *d, int64_t n, uint64_t key, float center, float amp) {
  for (int64_t i = 0; i < n; i++)
    d[i] = center + amp * u16_signed(stream_word(key, (uint64_t)i));
}

/* e4m3 code from 8 random bits: exponent field 5..8 (|v| in [0.25, 3.75], rms ~1.6),
 * so never NaN (0x7f/0xff) and a well-conditioned spread for dequantisation tests. */
static inline uint8_t fp8_code(unsigned b) {
  return (uint8_t)((b & 0x80u) | ((5u + (b & 3u)) << 3) | ((b >> 2) & 7u));
}

static void fill_fp8(uint8_t *d, int64_t n, uint64_t key) {
  const int64_t words = n / 8;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t w = 0; w < words; w++) {
    const uint64_t r = stream_word(key, (uint64_t)w);
    uint8_t *o = d + 8 * w;
    for (int k = 0; k < 8; k++)
      o[k] = fp8_code((unsigned)(r >> (8 * k)) & 0xffu);
  }
  const uint64_t r = stream_word(key, (uint64_t)words);
  for (int64_t i = 8 * words; i < n; i++)
    d[i] = fp8_code((unsigned)(r >> (8 * (i - 8 * words))) & 0xffu);
}

static epic_status dummy_add(epic_checkpoint *ck, const char *name, epic_dtype dt, int ndim,
                             int64_t d0, int64_t d1, epic_tensor_info **out) {
  int64_t numel = d0 * (ndim == 2 ? d1 : 1);
  size_t nbytes = (size_t)numel * epic_dtype_size(dt);
  epic_tensor_info *t = calloc(1, sizeof *t);
  char *nm = strdup(name);
  void *data = NULL;
  if (t && nm && posix_memalign(&data, 64, nbytes ? nbytes : 64) != 0) data = NULL;
  if (!t || !nm || !data) {
    free(t);
    free(nm);
    free(data);
    EPIC_LOG_ERROR("dummy checkpoint: out of memory creating %s (%zu bytes)", name, nbytes);
    return EPIC_ERR_NOMEM;
  }
  t->name = nm;
  t->file = "dummy";
  t->dtype = dt;
  t->ndim = ndim;
  t->shape[0] = d0;
  if (ndim == 2) t->shape[1] = d1;
  t->data = data;
  t->nbytes = nbytes;
  epic_status st = ck_insert(ck, t, 1);
  if (st < 0) {
    free(nm);
    free(data);
    free(t);
    return st;
  }
  ck->bytes += nbytes;
  *out = t;
  return EPIC_OK;
}

static const char *const dummy_bf16_suffixes[] = {
    "embed_tokens.weight", "lm_head.weight",          "mlp.gate.weight",
    "eh_proj.weight",      "shared_head.head.weight",
};

/* The tensor whose dummy values `name` takes (the successor mode's copies), and the
 * factor on them (its scaled output projections). */
static const char *dummy_source(const epic_checkpoint *ck, const char *name, float *scale) {
  *scale = 1.0f;
  if (!ck->successor)
    return name;
  if (ends_with(name, "self_attn.o_proj.weight") ||
      (strstr(name, ".mlp.") && ends_with(name, "down_proj.weight")))
    *scale = ck->successor;
  if (ends_with(name, "shared_head.head.weight"))
    return "lm_head.weight";
  if (ends_with(name, "shared_head.norm.weight"))
    return "model.norm.weight";
  if (ends_with(name, ".embed_tokens.weight"))
    return "model.embed_tokens.weight";
  return name;
}

static epic_status dummy_make_weight(epic_checkpoint *ck, const char *name, int64_t rows,
                                     int64_t cols) {
  float scale;
  const uint64_t key = mix64(ck->seed ^ hash_name(dummy_source(ck, name, &scale)));
  const float amp = sqrtf(3.0f / (float)cols) * scale; /* uniform, std scale / sqrt(cols) */
  int fp8 = ck->cfg.quant.fp8;
  epic_tensor_info *t;
  if (rows <= 0 || cols <= 0 || rows > ((int64_t)1 << 40) / cols) {
    EPIC_LOG_ERROR("dummy checkpoint: tensor %s: bad shape [%lld, %lld]", name, (long long)rows,
                   (long long)cols);
    return EPIC_ERR_INVALID;
  }
  for (size_t i = 0; i < sizeof dummy_bf16_suffixes / sizeof dummy_bf16_suffixes[0]; i++)
    if (ends_with(name, dummy_bf16_suffixes[i])) fp8 = 0;
  if (fp8 && !ends_with(name, "weight")) fp8 = 0;
  if (!fp8) {
    EPIC_CHECK(dummy_add(ck, name, EPIC_DT_BF16, 2, rows, cols, &t));
    if (ck->successor && ends_with(name, "eh_proj.weight") && cols == 2 * rows) {
      /* [I | 0]: the MTP layer takes enorm(embedding) alone */
      uint16_t *w = (uint16_t *)(uintptr_t)t->data; /* made here, so writable */
      memset(w, 0, t->nbytes);
      for (int64_t r = 0; r < rows; r++)
        w[r * cols + r] = 0x3F80; /* bf16 1.0 */
    } else {
      fill_bf16((uint16_t *)t->data, rows * cols, key, 0.0f, amp);
    }
    return EPIC_OK;
  }
  const int64_t br = ck->cfg.quant.weight_block_size[0], bc = ck->cfg.quant.weight_block_size[1];
  const int64_t sr = (rows + br - 1) / br, sc = (cols + bc - 1) / bc;
  char sname[1024];
  if (snprintf(sname, sizeof sname, "%s_scale_inv", name) >= (int)sizeof sname) {
    EPIC_LOG_ERROR("dummy checkpoint: tensor name too long: %s", name);
    return EPIC_ERR_INVALID;
  }
  if (ck_lookup(ck, sname)) {
    EPIC_LOG_ERROR("dummy checkpoint: %s exists without its weight %s", sname, name);
    return EPIC_ERR_INVALID;
  }
  EPIC_CHECK(dummy_add(ck, name, EPIC_DT_F8E4M3, 2, rows, cols, &t));
  fill_fp8((uint8_t *)t->data, rows * cols, key);
  EPIC_CHECK(dummy_add(ck, sname, EPIC_DT_F32, 2, sr, sc, &t));
  /* Codes have rms ~1.6; vary the block scale +-25% so a wrong block shows. */
  fill_f32((float *)t->data, sr * sc, mix64(key ^ 0x5ca1e), amp / sqrtf(3.0f) / 1.6f,
           0.25f * amp / sqrtf(3.0f) / 1.6f);
  return EPIC_OK;
}

static epic_status dummy_make_vector(epic_checkpoint *ck, const char *name, int64_t n) {
  float unused;
  const uint64_t key = mix64(ck->seed ^ hash_name(dummy_source(ck, name, &unused)));
  epic_tensor_info *t;
  if (n <= 0 || n > ((int64_t)1 << 36)) {
    EPIC_LOG_ERROR("dummy checkpoint: tensor %s: bad length %lld", name, (long long)n);
    return EPIC_ERR_INVALID;
  }
  if (ends_with(name, "e_score_correction_bias")) {
    EPIC_CHECK(dummy_add(ck, name, EPIC_DT_F32, 1, n, 0, &t));
    fill_f32((float *)t->data, n, key, 0.0f, 0.01f);
  } else {
    EPIC_CHECK(dummy_add(ck, name, EPIC_DT_BF16, 1, n, 0, &t));
    /* the successor mode's enorm: ones */
    fill_bf16((uint16_t *)t->data, n, key, 1.0f,
              ck->successor && ends_with(name, ".enorm.weight") ? 0.0f : 0.05f);
  }
  return EPIC_OK;
}

/* ----------------------------------------------------------- weight access */

static void mark_used(ck_entry *e) { __atomic_store_n(&e->used, 1, __ATOMIC_RELAXED); }

static void shape_str(const epic_tensor_info *t, char *buf, size_t n) {
  size_t o = 0;
  o += (size_t)snprintf(buf, n, "[");
  for (int i = 0; i < t->ndim && o < n; i++)
    o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
  if (o < n) snprintf(buf + o, n - o, "]");
}

static int aligned_for(const epic_tensor_info *t) {
  size_t es = epic_dtype_size(t->dtype);
  return es == 0 || ((uintptr_t)t->data % es) == 0;
}

static epic_status weight_locked(epic_checkpoint *ck, const char *name, int64_t rows, int64_t cols,
                                 epic_weight *out) {
  char found[128];
  ck_entry *e = ck_lookup(ck, name);
  if (!e && ck->dummy) {
    EPIC_CHECK(dummy_make_weight(ck, name, rows, cols));
    e = ck_lookup(ck, name);
  }
  if (!e) {
    EPIC_LOG_ERROR("checkpoint %s: tensor %s not found (expected [%lld, %lld])", ck->dir, name,
                   (long long)rows, (long long)cols);
    return EPIC_ERR_INVALID;
  }
  const epic_tensor_info *t = e->t;
  if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols) {
    shape_str(t, found, sizeof found);
    EPIC_LOG_ERROR("checkpoint %s: tensor %s in %s has shape %s, expected [%lld, %lld]", ck->dir,
                   name, t->file, found, (long long)rows, (long long)cols);
    return EPIC_ERR_INVALID;
  }
  if (t->dtype != EPIC_DT_BF16 && t->dtype != EPIC_DT_F16 && t->dtype != EPIC_DT_F32 &&
      t->dtype != EPIC_DT_F8E4M3) {
    EPIC_LOG_ERROR("checkpoint %s: tensor %s in %s has dtype %s, expected BF16, F16, F32 or "
                   "F8_E4M3",
                   ck->dir, name, t->file, epic_dtype_name(t->dtype));
    return EPIC_ERR_INVALID;
  }
  if (!aligned_for(t)) {
    EPIC_LOG_ERROR("checkpoint %s: tensor %s in %s is not aligned to its element size", ck->dir,
                   name, t->file);
    return EPIC_ERR_INVALID;
  }
  memset(out, 0, sizeof *out);
  out->dtype = t->dtype;
  out->rows = rows;
  out->cols = cols;
  out->data = t->data;
  if (t->dtype == EPIC_DT_F8E4M3) {
    char sname[1024];
    size_t nl = strlen(name);
    if (!ends_with(name, "weight") || nl + 10 >= sizeof sname) {
      EPIC_LOG_ERROR("checkpoint %s: FP8 tensor %s in %s: name does not end in \"weight\", "
                     "cannot find its weight_scale_inv",
                     ck->dir, name, t->file);
      return EPIC_ERR_INVALID;
    }
    snprintf(sname, sizeof sname, "%s_scale_inv", name);
    const int64_t br = ck->cfg.quant.weight_block_size[0];
    const int64_t bc = ck->cfg.quant.weight_block_size[1];
    const int64_t sr = (rows + br - 1) / br, sc = (cols + bc - 1) / bc;
    ck_entry *se = ck_lookup(ck, sname);
    if (!se) {
      EPIC_LOG_ERROR("checkpoint %s: FP8 tensor %s in %s has no %s", ck->dir, name, t->file, sname);
      return EPIC_ERR_INVALID;
    }
    const epic_tensor_info *s = se->t;
    if (s->dtype != EPIC_DT_F32 || s->ndim != 2 || s->shape[0] != sr || s->shape[1] != sc ||
        !aligned_for(s)) {
      shape_str(s, found, sizeof found);
      EPIC_LOG_ERROR("checkpoint %s: tensor %s in %s is %s %s, expected F32 [%lld, %lld] "
                     "(blocks of %lldx%lld)",
                     ck->dir, sname, s->file, epic_dtype_name(s->dtype), found, (long long)sr,
                     (long long)sc, (long long)br, (long long)bc);
      return EPIC_ERR_INVALID;
    }
    out->scale_inv = (const float *)s->data;
    out->block_rows = br;
    out->block_cols = bc;
    mark_used(se);
  }
  mark_used(e);
  return EPIC_OK;
}

epic_status epic_checkpoint_weight(epic_checkpoint *ck, const char *name, int64_t rows,
                                   int64_t cols, epic_weight *out) {
  if (!ck || !name || !out) return EPIC_ERR_INVALID;
  if (!ck->dummy) return weight_locked(ck, name, rows, cols, out);
  pthread_mutex_lock(&ck->mu);
  epic_status st = weight_locked(ck, name, rows, cols, out);
  pthread_mutex_unlock(&ck->mu);
  return st;
}

static epic_status vector_locked(epic_checkpoint *ck, const char *name, int64_t n, float *out) {
  char found[128];
  ck_entry *e = ck_lookup(ck, name);
  if (!e && ck->dummy) {
    EPIC_CHECK(dummy_make_vector(ck, name, n));
    e = ck_lookup(ck, name);
  }
  if (!e) {
    EPIC_LOG_ERROR("checkpoint %s: tensor %s not found (expected [%lld])", ck->dir, name,
                   (long long)n);
    return EPIC_ERR_INVALID;
  }
  const epic_tensor_info *t = e->t;
  if (t->ndim != 1 || t->shape[0] != n) {
    shape_str(t, found, sizeof found);
    EPIC_LOG_ERROR("checkpoint %s: tensor %s in %s has shape %s, expected [%lld]", ck->dir, name,
                   t->file, found, (long long)n);
    return EPIC_ERR_INVALID;
  }
  const uint8_t *p = t->data;
  switch (t->dtype) {
  case EPIC_DT_F32: memcpy(out, p, (size_t)n * sizeof(float)); break;
  case EPIC_DT_BF16:
  case EPIC_DT_F16:
    for (int64_t i = 0; i < n; i++) {
      uint16_t v;
      memcpy(&v, p + 2 * i, 2); /* safetensors does not promise alignment */
      out[i] = t->dtype == EPIC_DT_BF16 ? epic_bf16_to_f32(v) : epic_f16_to_f32(v);
    }
    break;
  default:
    EPIC_LOG_ERROR("checkpoint %s: tensor %s in %s has dtype %s, expected BF16, F16 or F32",
                   ck->dir, name, t->file, epic_dtype_name(t->dtype));
    return EPIC_ERR_INVALID;
  }
  mark_used(e);
  return EPIC_OK;
}

epic_status epic_checkpoint_vector(epic_checkpoint *ck, const char *name, int64_t n, float *out) {
  if (!ck || !name || (!out && n)) return EPIC_ERR_INVALID;
  if (!ck->dummy) return vector_locked(ck, name, n, out);
  pthread_mutex_lock(&ck->mu);
  epic_status st = vector_locked(ck, name, n, out);
  pthread_mutex_unlock(&ck->mu);
  return st;
}

size_t epic_checkpoint_skip(epic_checkpoint *ck, int (*skip)(void *user, const char *name),
                            void *user) {
  size_t n = 0;
  for (size_t k = 0; k < ck->n_ents; k++)
    if (skip(user, ck->ents[k].t->name)) {
      mark_used(&ck->ents[k]);
      n++;
    }
  return n;
}

size_t epic_checkpoint_report_unused(const epic_checkpoint *ck) {
  size_t unused = 0, shown = 0;
  if (!ck || ck->dummy) return 0;
  for (size_t k = 0; k < ck->n_ents; k++)
    if (!__atomic_load_n(&ck->ents[k].used, __ATOMIC_RELAXED)) unused++;
  if (!unused) return 0;
  EPIC_LOG_WARN("checkpoint %s: %zu of %zu tensors were never used by the model", ck->dir, unused,
                ck->n_ents);
  for (size_t k = 0; k < ck->n_ents && shown < 5; k++) {
    if (__atomic_load_n(&ck->ents[k].used, __ATOMIC_RELAXED)) continue;
    EPIC_LOG_WARN("  unused: %s (%s)", ck->ents[k].t->name, ck->ents[k].t->file);
    shown++;
  }
  if (unused > shown) EPIC_LOG_WARN("  ... and %zu more", unused - shown);
  return unused;
}
