#include "test_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

const char *epic_test_fixtures(void) {
  const char *e = getenv("EPIC_FIXTURES");
  return (e && *e) ? e : "../shared/fixtures";
}

char *epic_test_path(char *buf, size_t n, const char *rel) {
  snprintf(buf, n, "%s/%s", epic_test_fixtures(), rel);
  return buf;
}

char *epic_test_read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  char *buf = NULL;
  long sz;
  if (!f) return NULL;
  if (fseek(f, 0, SEEK_END) != 0 || (sz = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) goto out;
  buf = malloc((size_t)sz + 1);
  if (!buf) goto out;
  if (fread(buf, 1, (size_t)sz, f) != (size_t)sz) {
    free(buf);
    buf = NULL;
    goto out;
  }
  buf[sz] = 0;
  if (len) *len = (size_t)sz;
out:
  fclose(f);
  return buf;
}

static int32_t *json_ids(const cJSON *a, int64_t *n) {
  int32_t *ids = malloc((size_t)cJSON_GetArraySize(a) * sizeof *ids + 1);
  int64_t k = 0;
  const cJSON *it;
  if (!ids) return NULL;
  cJSON_ArrayForEach(it, a) ids[k++] = (int32_t)it->valuedouble;
  *n = k;
  return ids;
}

static void json_name(char *dst, size_t n, const cJSON *s) {
  snprintf(dst, n, "%s", cJSON_IsString(s) ? s->valuestring : "");
}

int epic_test_load_cases(const char *model, epic_test_case *out, int max) {
  char rel[512], path[1024];
  const cJSON *it;
  int n = 0, ok = 1;
  snprintf(rel, sizeof rel, "%s/cases/cases.json", model);
  char *txt = epic_test_read_file(epic_test_path(path, sizeof path, rel), NULL);
  cJSON *root = txt ? cJSON_Parse(txt) : NULL;
  free(txt);
  if (!root) return -1;
  cJSON_ArrayForEach(it, cJSON_GetObjectItem(root, "cases")) {
    if (n == max) {
      ok = 0;
      break;
    }
    epic_test_case *c = &out[n++];
    memset(c, 0, sizeof *c);
    json_name(c->name, sizeof c->name, cJSON_GetObjectItem(it, "name"));
    c->prompt = json_ids(cJSON_GetObjectItem(it, "prompt_ids"), &c->n_prompt);
    c->gen = json_ids(cJSON_GetObjectItem(it, "gen_ids"), &c->n_gen);
    json_name(c->prompt_logits, sizeof c->prompt_logits, cJSON_GetObjectItem(it, "prompt_logits"));
    json_name(c->gen_logits, sizeof c->gen_logits, cJSON_GetObjectItem(it, "gen_logits"));
    json_name(c->mtp_logits, sizeof c->mtp_logits,
              cJSON_GetObjectItem(cJSON_GetObjectItem(it, "mtp"), "logits"));
    if (!c->prompt || !c->gen) ok = 0;
  }
  cJSON_Delete(root);
  if (!ok) {
    epic_test_free_cases(out, n);
    return -1;
  }
  return n;
}

int epic_test_case_copy(const epic_test_case *c, int32_t *prompt, int64_t max_prompt, int32_t *gen,
                        int64_t max_gen) {
  if (c->n_prompt > max_prompt || c->n_gen > max_gen) return 0;
  memcpy(prompt, c->prompt, (size_t)c->n_prompt * sizeof *prompt);
  memcpy(gen, c->gen, (size_t)c->n_gen * sizeof *gen);
  return 1;
}

void epic_test_free_cases(epic_test_case *c, int n) {
  for (int i = 0; i < n; i++) {
    free(c[i].prompt);
    free(c[i].gen);
    c[i].prompt = c[i].gen = NULL;
  }
}
