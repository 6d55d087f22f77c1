// End-to-end test of `epic serve --http` and `epic gateway --http` with the
// unmodified `openai` npm client (v4) on the tiny fixture model.
// usage: node test_http_openai.mjs EPIC MODEL_DIR
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, "node_modules-dir", "package.json"));
const OpenAI = require("openai");
const [EPIC, MODEL] = process.argv.slice(2);
const NAME = MODEL.replace(/\/+$/, "").split("/").pop();
let failures = 0;
function check(name, ok, detail) {
  console.log(`${ok ? "ok  " : "FAIL"} ${name}${ok ? "" : " " + JSON.stringify(detail ?? "")}`);
  if (!ok) failures++;
}

function start(args, wantHttp) {
  const p = spawn(args[0], args.slice(1), { stdio: ["ignore", "pipe", "inherit"] });
  return new Promise((resolve, reject) => {
    let out = "", grpc = null;
    p.stdout.on("data", (d) => {
      out += d;
      const h = out.match(/HTTP \(OpenAI API\) on [^\n]*:(\d+)\n/);
      const g = out.match(/listening on [^\n]*:(\d+) \(pid/);
      if (g) grpc = g[1];
      if (h && g && wantHttp) resolve({ p, http: +h[1], grpc: +grpc });
      if (g && !wantHttp) resolve({ p, grpc: +grpc });
    });
    p.on("exit", (c) => reject(new Error(`${args[1]} exited ${c}: ${out}`)));
  });
}
const stop = (s) => new Promise((r) => { s.p.removeAllListeners("exit"); s.p.on("exit", (c) => r(c)); s.p.kill("SIGTERM"); });

// A strict Prometheus text-format (0.0.4) parser: every line is a comment
// (# HELP / # TYPE with a known type) or `name{labels} value`; a sample's
// family must have been declared; histogram buckets must be cumulative and end
// with le="+Inf" equal to _count.
function parseProm(text) {
  const types = {}, samples = {};
  if (!text.endsWith("\n")) throw new Error("exposition must end with a newline");
  for (const line of text.slice(0, -1).split("\n")) {
    let m;
    if ((m = line.match(/^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) .+$/))) continue;
    if ((m = line.match(/^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$/))) {
      if (types[m[1]]) throw new Error(`TYPE twice for ${m[1]}`);
      types[m[1]] = m[2];
      continue;
    }
    m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})? ([-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|Inf|NaN))$/);
    if (!m) throw new Error(`malformed line: ${line}`);
    const fam = m[1].replace(/_(bucket|sum|count)$/, "");
    if (!types[m[1]] && !(types[fam] === "histogram")) throw new Error(`sample without TYPE: ${line}`);
    if (!m[1].startsWith("epic_")) throw new Error(`name without epic_ prefix: ${m[1]}`);
    samples[m[1] + (m[2] || "")] = Number(m[3]);
  }
  for (const [name, t] of Object.entries(types)) {
    if (t !== "histogram") continue;
    const b = Object.entries(samples).filter(([k]) => k.startsWith(name + "_bucket{")).map(([, v]) => v);
    for (let i = 1; i < b.length; i++) if (b[i] < b[i - 1]) throw new Error(`${name}: buckets not cumulative`);
    if (samples[`${name}_bucket{le="+Inf"}`] !== samples[`${name}_count`]) throw new Error(`${name}: +Inf != count`);
  }
  return { types, samples };
}

async function get(port, path) {
  const r = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: r.status, type: r.headers.get("content-type"), text: await r.text() };
}
async function post(port, path, body) {
  const r = await fetch(`http://127.0.0.1:${port}${path}`, { method: "POST", body, headers: { "content-type": "application/json" } });
  let j = null; const text = await r.text();
  try { j = JSON.parse(text); } catch { /* checked by the caller */ }
  return { status: r.status, j, text };
}

const USER = (t) => [{ role: "user", content: t }];
async function collect(stream) {
  let content = "", reasoning = "", finish = null, usage = null, chunks = 0;
  for await (const c of stream) {
    chunks++;
    if (c.usage) usage = c.usage;
    for (const ch of c.choices) {
      content += ch.delta?.content ?? ch.text ?? "";
      reasoning += ch.delta?.reasoning_content ?? "";
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  return { content, reasoning, finish, usage, chunks };
}

async function serveTests(srv) {
  const client = new OpenAI({ baseURL: `http://127.0.0.1:${srv.http}/v1`, apiKey: "unused", maxRetries: 0 });
  const models = await client.models.list();
  check("models lists the model", models.data.length === 1 && models.data[0].id === NAME, models.data);
  const h = await get(srv.http, "/health");
  check("health 200", h.status === 200 && JSON.parse(h.text).status === "ok", h);
  const m0 = parseProm((await get(srv.http, "/metrics")).text).samples;

  const base = { model: NAME, messages: USER("Hello there"), max_tokens: 12, temperature: 0, ignore_eos: true };
  const full = await client.chat.completions.create(base);
  const c0 = full.choices[0];
  check("chat non-streaming: text, length, usage", typeof c0.message.content === "string" && c0.message.content.length > 0 &&
        c0.finish_reason === "length" && full.usage.completion_tokens === 12 && full.usage.prompt_tokens > 0 &&
        full.usage.total_tokens === full.usage.prompt_tokens + 12 && full.object === "chat.completion", full);
  const st = await collect(await client.chat.completions.create({ ...base, stream: true, stream_options: { include_usage: true } }));
  check("chat streaming equals non-streaming", st.content === c0.message.content && st.finish === "length", [st, c0.message.content]);
  check("stream usage chunk", st.usage && st.usage.completion_tokens === 12 && st.usage.prompt_tokens === full.usage.prompt_tokens, st.usage);

  // Completions with the same rendered prompt as text give the same tokens.
  const cfull = await client.completions.create({ model: NAME, prompt: "Hello", max_tokens: 8, temperature: 0, ignore_eos: true });
  const cst = await collect(await client.completions.create({ model: NAME, prompt: "Hello", max_tokens: 8, temperature: 0, ignore_eos: true, stream: true }));
  check("completions: streaming equals non-streaming", cfull.choices[0].text === cst.content && cfull.usage.completion_tokens === 8, [cfull, cst]);
  const ids = await client.completions.create({ model: NAME, prompt: [0, 5, 6, 7], max_tokens: 4, temperature: 0, logprobs: 3, ignore_eos: true });
  const lp = ids.choices[0].logprobs;
  check("completions: token-id prompt with logprobs", ids.usage.prompt_tokens === 4 && lp.tokens.length === 4 &&
        lp.token_logprobs.every((x) => x <= 0) && lp.top_logprobs.every((t) => Object.keys(t).length >= 1 && Object.keys(t).length <= 3), ids);
  const clp = await client.chat.completions.create({ ...base, max_tokens: 5, logprobs: true, top_logprobs: 3 });
  const ent = clp.choices[0].logprobs.content;
  check("chat logprobs: greedy token is the top alternative", ent.length === 5 && ent.every((e) => e.top_logprobs.length === 3 &&
        e.top_logprobs[0].token === e.token && Math.abs(e.top_logprobs[0].logprob - e.logprob) < 1e-6 &&
        e.top_logprobs[1].logprob <= e.top_logprobs[0].logprob && Array.isArray(e.bytes)), ent);

  // Stop strings: cut before the first occurrence of a piece of the greedy text.
  const text = c0.message.content;
  const stopAt = Math.max(1, Math.floor(text.length / 2));
  const stopStr = text.slice(stopAt, stopAt + 2);
  const idx = text.indexOf(stopStr);
  const sres = await client.chat.completions.create({ ...base, stop: [stopStr] });
  check("stop string ends the text before it", sres.choices[0].message.content === text.slice(0, idx) && sres.choices[0].finish_reason === "stop", [sres.choices[0], stopStr]);
  const sst = await collect(await client.chat.completions.create({ ...base, stop: stopStr, stream: true }));
  check("stop string, streaming", sst.content === text.slice(0, idx) && sst.finish === "stop", sst);

  // n = 2: greedy choices are equal; seeded sampling gives choice i seed + i.
  const n2 = await client.chat.completions.create({ ...base, n: 2 });
  check("n=2 greedy: two equal choices, usage summed", n2.choices.length === 2 && n2.choices.map((c) => c.index).join() === "0,1" &&
        n2.choices.every((c) => c.message.content === text) && n2.usage.completion_tokens === 24, n2);
  const samp = { ...base, temperature: 1, n: 2, seed: 11 };
  const s1 = await client.chat.completions.create(samp);
  const s2 = await client.chat.completions.create({ ...samp, n: 1, seed: 12 });
  check("n=2 sampled: choice 1 uses seed + 1, reproducibly", s1.choices[1].message.content === s2.choices[0].message.content, [s1.choices, s2.choices]);
  const ns = await collect(await client.chat.completions.create({ ...samp, stream: true }));
  check("n=2 streaming: both choices' text", ns.content.length >= s1.choices[0].message.content.length, ns);

  // R1 template: the prompt opens <think>, so the output is reasoning until </think>.
  const r1 = await client.chat.completions.create({ ...base, epic_chat_template: "r1" });
  const r1s = await collect(await client.chat.completions.create({ ...base, epic_chat_template: "r1", stream: true }));
  const m1 = r1.choices[0].message;
  check("R1: reasoning_content + content carry the whole text", typeof m1.reasoning_content === "string" &&
        (m1.reasoning_content.length + m1.content.length) > 0 && !m1.content.includes("</think>"), m1);
  check("R1 streaming: same split", r1s.reasoning === (m1.reasoning_content ?? "") && r1s.content === m1.content, [r1s, m1]);

  // Errors: OpenAI client sees the status and the field.
  const errs = [
    [{ ...base, max_tokens: "5" }, 400, "max_tokens"],
    [{ ...base, temperature: 9 }, 400, "temperature"],
    [{ ...base, messages: [{ role: "robot", content: "x" }] }, 400, "messages[0].role"],
    [{ ...base, n: 0 }, 400, "n"],
    [{ ...base, model: "nope" }, 404, "model"],
    [{ ...base, max_tokens: 1 << 30 }, 400, "max_tokens"],
    [{ ...base, logprobs: true, top_logprobs: 25 }, 400, "top_logprobs"],
  ];
  for (const [body, status, param] of errs) {
    try {
      await client.chat.completions.create(body);
      check(`error ${param}`, false, "no error");
    } catch (e) {
      check(`error ${param}: ${status}`, e.status === status && e.error?.param === param && e.message.includes(param), [e.status, e.error]);
    }
  }
  const raw = await post(srv.http, "/v1/chat/completions", "{not json");
  check("malformed JSON: 400 error object", raw.status === 400 && raw.j?.error?.type === "invalid_request_error", raw);
  const nf = await get(srv.http, "/v1/nothing");
  check("unknown path: 404", nf.status === 404, nf);
  const wm = await get(srv.http, "/v1/chat/completions");
  check("wrong method: 405", wm.status === 405, wm);
  const big = await post(srv.http, "/v1/completions", JSON.stringify({ model: NAME, prompt: "x".repeat(70000) }));
  check("too large: 413", big.status === 413 && big.j?.error, big.status);

  // Metrics moved.
  const mt = await get(srv.http, "/metrics");
  let m1s = null;
  try { m1s = parseProm(mt.text).samples; check("metrics parse strictly", true); } catch (e) { check("metrics parse strictly", false, e.message); }
  if (m1s) {
    check("metrics content type", /^text\/plain; version=0.0.4/.test(mt.type), mt.type);
    check("generation tokens counter moved", m1s.epic_generation_tokens_total > m0.epic_generation_tokens_total, [m0.epic_generation_tokens_total, m1s.epic_generation_tokens_total]);
    check("prompt tokens counter moved", m1s.epic_prompt_tokens_total > m0.epic_prompt_tokens_total);
    check("ttft histogram count moved", m1s.epic_time_to_first_token_seconds_count > m0.epic_time_to_first_token_seconds_count);
    check("e2e and tpot histograms present", m1s.epic_e2e_request_latency_seconds_count > 0 && m1s.epic_time_per_output_token_seconds_count > 0);
    check("kv cache gauges", m1s.epic_kv_cache_pages_total > 0 && m1s.epic_kv_cache_usage_ratio >= 0);
    check("prefix cache gauge", m1s.epic_prefix_cache_pages >= 0 && m1s.epic_prefix_cache_hit_tokens_total >= 0);
    // Greedy requests on a checkpoint with an MTP layer draft by default (--mtp-draft auto).
    check("mtp drafts counted", m1s.epic_mtp_draft_tokens_total > 0 && m1s.epic_mtp_accepted_tokens_total >= 0, m1s.epic_mtp_draft_tokens_total);
    check("a2a families present", 'epic_a2a_bytes_total{backend="none",phase="dispatch"}' in m1s);
    check("http 4xx counted", m1s['epic_http_requests_total{endpoint="/v1/chat/completions",code="4xx"}'] >= errs.length);
    check("process start time", m1s.epic_process_start_time_seconds > 1.6e9);
  }

  // 64 concurrent streams, each equal to its solo greedy result.
  const prompts = Array.from({ length: 64 }, (_, i) => `Question number ${i}: ${"abc".repeat(i % 5)}?`);
  const solo = [];
  for (let i = 0; i < 8; i++) solo.push((await client.chat.completions.create({ ...base, messages: USER(prompts[i]), max_tokens: 6 })).choices[0].message.content);
  const conc = await Promise.all(prompts.map(async (p) => (await collect(await client.chat.completions.create({ ...base, messages: USER(p), max_tokens: 6, stream: true }))).content));
  // Prompts repeat every 5 in shape but differ in the number: compare each with its own solo run.
  const rest = await Promise.all(prompts.slice(8).map(async (p) => (await client.chat.completions.create({ ...base, messages: USER(p), max_tokens: 6 })).choices[0].message.content));
  const soloAll = solo.concat(rest);
  const bad = conc.map((c, i) => (c === soloAll[i] ? -1 : i)).filter((i) => i >= 0);
  check("64 concurrent streams equal their solo results", bad.length === 0, bad.map((i) => [i, conc[i], soloAll[i]]));
  return text;
}

async function main() {
  const serve = await start([EPIC, "serve", "--model", MODEL, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
    "--threads", "1", "--kv-cache", "64MiB", "--max-request-bytes", "65536"], true); // n and top_logprobs on by default
  let gw = null, text = null;
  try {
    text = await serveTests(serve);
    // The gateway's HTTP front goes through its gRPC router to the server.
    gw = await start([EPIC, "gateway", "--upstream", `127.0.0.1:${serve.grpc}`, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"], true);
    const g = new OpenAI({ baseURL: `http://127.0.0.1:${gw.http}/v1`, apiKey: "unused", maxRetries: 0 });
    let models = null;
    // Until the gateway's first health check of its upstream: a deadline, not a
    // count of tries (seconds on a loaded machine).
    for (const end = Date.now() + 60000; !models && Date.now() < end;) {
      try { models = await g.models.list(); } catch { await new Promise((r) => setTimeout(r, 100)); }
    }
    check("gateway: models", models && models.data[0].id === NAME, models?.data);
    const base = { model: NAME, messages: USER("Hello there"), max_tokens: 12, temperature: 0, ignore_eos: true };
    const r = await g.chat.completions.create(base);
    check("gateway: chat equals serve", r.choices[0].message.content === text && r.usage.completion_tokens === 12, r);
    const s = await collect(await g.chat.completions.create({ ...base, stream: true, stream_options: { include_usage: true } }));
    check("gateway: streaming equals serve", s.content === text && s.usage?.completion_tokens === 12, s);
    try { await g.chat.completions.create({ ...base, logprobs: true, top_logprobs: 2 }); check("gateway: top_logprobs refused", false); }
    catch (e) { check("gateway: top_logprobs refused with 400", e.status === 400 && e.error?.param === "top_logprobs", e.error); }
    const gm = await get(gw.http, "/metrics");
    try { const ms = parseProm(gm.text).samples; check("gateway: metrics count its requests", ms.epic_generation_tokens_total >= 24, ms.epic_generation_tokens_total); }
    catch (e) { check("gateway: metrics parse", false, e.message); }
  } finally {
    if (gw) check("gateway exits 0 after SIGTERM", (await stop(gw)) === 0);
    check("serve exits 0 after SIGTERM", (await stop(serve)) === 0);
  }
  console.log(failures ? `${failures} FAILED` : "all passed");
  process.exit(failures ? 1 : 0);
}
main().catch((e) => { console.error(e); process.exit(1); });
