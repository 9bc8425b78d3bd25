// The ferrotune dashboard: jobs, a job's live charts / metrics / log / artifacts, a playground, a start form.
// Plain JavaScript served by `ferrotune serve` (no build step, nothing fetched from elsewhere).
'use strict';
const $ = (s, el = document) => el.querySelector(s);
const view = $('#view');
let live = null; // aborts the current page's timers and streams when the page changes

async function api(path, opts = {}) {
  const r = await fetch('/api/' + path, opts);
  const ct = r.headers.get('content-type') || '';
  const body = ct.includes('json') ? await r.json() : await r.text();
  if (!r.ok) throw new Error(body.error || body);
  return body;
}

// Reads a server-sent-event response, calling onData with each `data:` message (JSON).
async function stream(path, opts, onData, signal) {
  const r = await fetch('/api/' + path, { ...opts, signal });
  if (!r.ok) {
    const b = await r.json().catch(() => ({}));
    throw new Error(b.error || r.statusText);
  }
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const msg = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (msg.startsWith('data: ')) onData(JSON.parse(msg.slice(6)));
    }
  }
}

const esc = s => String(s ?? '').replace(/[&<>"]/g, c => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]);
const fmt = (x, d = 4) =>
  x == null ? '' : Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x != 0) ? x.toExponential(2) : (+x).toFixed(d);
function eta(s) {
  if (!s) return '';
  s = Math.round(s);
  if (s >= 3600) return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
  return s >= 60 ? `${Math.floor(s / 60)}m${s % 60}s` : `${s}s`;
}

// A line chart of series {name: [[step, value], …]} drawn into an <svg>; data-points counts the points.
const COLORS = ['#3b82c4', '#e67e22', '#27ae60', '#8e44ad', '#c0392b', '#16a085'];
function chart(svg, title, series) {
  const W = 540, H = 240, L = 56, R = 12, T = 24, B = 28;
  const pts = Object.values(series).flat();
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  svg.setAttribute('width', W);
  svg.setAttribute('height', H);
  svg.dataset.points = pts.length;
  if (!pts.length) {
    svg.innerHTML = `<text x="${L}" y="${T}" font-size="13">${esc(title)}: no points yet</text>`;
    return;
  }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) { y1 += 1; y0 -= 1; }
  const sx = x => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = y => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  let s = `<text x="${L}" y="15" font-size="13" font-weight="600">${esc(title)}</text>`;
  s += `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#999"/>`;
  s += `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#999"/>`;
  for (const [v, y] of [[y1, T], [y0, H - B]]) s += `<text x="${L - 4}" y="${y + 4}" font-size="10" text-anchor="end">${fmt(v, 3)}</text>`;
  s += `<text x="${L}" y="${H - 10}" font-size="10">${x0}</text>`;
  s += `<text x="${W - R}" y="${H - 10}" font-size="10" text-anchor="end">step ${x1}</text>`;
  Object.entries(series).forEach(([name, p], i) => {
    const c = COLORS[i % COLORS.length];
    const line = p.map(q => sx(q[0]).toFixed(1) + ',' + sy(q[1]).toFixed(1)).join(' ');
    if (p.length > 1) s += `<polyline class="series" fill="none" stroke="${c}" stroke-width="1.6" points="${line}"/>`;
    if (p.length == 1) s += `<circle cx="${sx(p[0][0])}" cy="${sy(p[0][1])}" r="2.5" fill="${c}"/>`;
    s += `<text x="${W - R - 4}" y="${T + 12 + i * 13}" font-size="11" fill="${c}" text-anchor="end">${esc(name)}</text>`;
  });
  svg.innerHTML = s;
}

async function jobsPage() {
  view.innerHTML = `<h1>Jobs</h1><table id="jobs"><thead><tr><th>job</th><th>kind</th><th>state</th><th>progress</th>
    <th>loss</th><th>ETA</th><th>output</th></tr></thead><tbody></tbody></table><p id="unreachable" class="error"></p>`;
  const row = j => `<tr data-id="${esc(j.id)}"><td><a href="#/job/${encodeURIComponent(j.id)}">${esc(j.id)}</a></td>
    <td>${esc(j.kind)}</td><td><span class="state ${esc(j.state)}">${esc(j.state)}</span></td>
    <td>${j.total ? `<span class="bar"><i style="width:${(100 * j.step) / j.total}%"></i></span> ${j.step}/${j.total}` : ''}</td>
    <td>${fmt(j.loss)}</td><td>${j.state == 'running' ? eta(j.eta_s) : ''}</td><td>${esc(j.output_dir)}</td></tr>`;
  const tick = async () => {
    try {
      const r = await api('jobs');
      $('#jobs tbody').innerHTML = r.jobs.map(row).join('') || '<tr><td colspan="7">no jobs yet</td></tr>';
      $('#unreachable').textContent = r.unreachable.map(u => `${u.service}: ${u.error}`).join('; ');
    } catch (e) {
      $('#unreachable').textContent = e.message;
    }
  };
  await tick();
  const t = setInterval(tick, 2000);
  live.signal.addEventListener('abort', () => clearInterval(t));
}

async function jobPage(id) {
  const q = encodeURIComponent(id);
  view.innerHTML = `<h1>Job <code>${esc(id)}</code></h1>
    <p class="meta"><span>kind <b id="kind"></b></span><span>state <span id="state" class="state"></span></span>
    <span id="progress"></span><span id="eta"></span><button id="cancel" class="danger">Cancel</button></p>
    <p id="error" class="error"></p>
    <div class="charts"><svg id="chart-loss" class="chart"></svg><svg id="chart-reward" class="chart"></svg>
    <svg id="chart-kl" class="chart"></svg></div>
    <h2>Metrics</h2><table id="metrics"><thead><tr><th>metric</th><th>last</th><th>step</th></tr></thead><tbody></tbody></table>
    <h2>Artifacts</h2><ul id="artifacts"><li>listed when the job has finished</li></ul><h2>Log</h2><pre id="log"></pre>`;
  const S = { loss: [], eval_loss: [], other: {} };
  const last = {};
  const pick = re => Object.fromEntries(Object.entries(S.other).filter(([k]) => re.test(k)));
  const redraw = () => {
    chart($('#chart-loss'), 'loss', { loss: S.loss, eval_loss: S.eval_loss });
    chart($('#chart-reward'), 'reward', pick(/reward|margin|score/i));
    chart($('#chart-kl'), 'KL', pick(/kl/i));
    $('#metrics tbody').innerHTML = Object.entries(last)
      .sort()
      .map(([k, [s, v]]) => `<tr><td>${esc(k)}</td><td>${fmt(v)}</td><td>${s}</td></tr>`)
      .join('');
  };
  const setJob = j => {
    $('#kind').textContent = j.kind;
    $('#state').textContent = j.state;
    $('#state').className = 'state ' + j.state;
    $('#cancel').disabled = !['queued', 'running'].includes(j.state);
    $('#error').textContent = j.error || '';
    if (j.artifacts && j.artifacts.length)
      $('#artifacts').innerHTML = j.artifacts
        .map(a => `<li>${esc(a.kind)}: <a href="/api/files?path=${encodeURIComponent(a.path)}">${esc(a.path)}</a></li>`)
        .join('');
  };
  $('#cancel').onclick = async () => {
    $('#cancel').disabled = true;
    try {
      setJob(await api(`jobs/${q}/cancel`, { method: 'POST' }));
    } catch (e) {
      $('#error').textContent = e.message;
    }
  };
  try {
    setJob(await api('jobs/' + q));
  } catch (e) {
    $('#error').textContent = e.message;
    return;
  }
  redraw();
  const onEvent = ev => {
    if (ev.progress) {
      const p = ev.progress;
      S.loss.push([p.step, p.loss]);
      if (p.eval_loss != null) S.eval_loss.push([p.step, p.eval_loss]);
      for (const k of ['loss', 'eval_loss', 'lr', 'grad_norm', 'tokens_per_s']) if (p[k] != null) last[k] = [p.step, p[k]];
      for (const [k, v] of Object.entries(p.metrics || {})) {
        (S.other[k] ||= []).push([p.step, v]);
        last[k] = [p.step, v];
      }
      $('#progress').textContent = `step ${p.step}/${p.total}`;
      $('#eta').textContent = p.eta_s ? 'ETA ' + eta(p.eta_s) : '';
      redraw();
    }
    if (ev.log) {
      const l = $('#log');
      l.textContent += ev.log + '\n';
      l.scrollTop = l.scrollHeight;
    }
    if (ev.job) setJob(ev.job);
    if (ev.error) $('#error').textContent = ev.error;
  };
  stream(`jobs/${q}/events`, {}, onEvent, live.signal).catch(e => {
    if (e.name != 'AbortError') $('#error').textContent = e.message;
  });
}

function playground() {
  view.innerHTML = `<h1>Playground</h1>
    <label>Model (a known name, or a model directory under the artifact root)</label>
    <input id="pg-model" size="50" value="${esc(localStorage.pgModel || '')}">
    <label>Adapter (optional)</label><input id="pg-adapter" size="50" value="${esc(localStorage.pgAdapter || '')}">
    <label>Message</label><textarea id="pg-prompt" rows="3" cols="70"></textarea>
    <label>Max new tokens <input id="pg-max" type="number" value="128" min="1" max="4096">
    temperature <input id="pg-temp" type="number" value="0" step="0.1" min="0"></label>
    <p><button id="pg-send">Send</button></p><div id="pg-out" class="out" data-chunks="0"></div><p id="pg-info" class="meta"></p>`;
  $('#pg-send').onclick = async () => {
    const out = $('#pg-out');
    out.textContent = '';
    out.dataset.chunks = 0;
    out.dataset.done = '';
    $('#pg-info').textContent = '';
    $('#pg-send').disabled = true;
    localStorage.pgModel = $('#pg-model').value;
    localStorage.pgAdapter = $('#pg-adapter').value;
    const body = {
      model: $('#pg-model').value,
      adapter: $('#pg-adapter').value,
      messages: [{ role: 'user', content: $('#pg-prompt').value }],
      max_new_tokens: +$('#pg-max').value,
      temperature: +$('#pg-temp').value,
    };
    const opts = { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) };
    try {
      await stream('generate', opts, m => {
        if (m.error) throw new Error(m.error);
        if (m.done) {
          out.dataset.done = '1';
          $('#pg-info').textContent = `${m.tokens} tokens, ${m.finish_reason}`;
        } else {
          out.textContent += m.text;
          out.dataset.chunks = +out.dataset.chunks + 1;
        }
      }, live.signal);
    } catch (e) {
      $('#pg-info').innerHTML = `<span class="error">${esc(e.message)}</span>`;
    }
    $('#pg-send').disabled = false;
  };
}

function startPage() {
  const kinds = ['sft', 'reward', 'dpo', 'orpo', 'simpo', 'kto', 'ppo', 'grpo', 'rloo'];
  view.innerHTML = `<h1>Start a job</h1><label>Kind</label>
    <select id="st-kind">${kinds.map(k => `<option>${k}</option>`).join('')}</select>
    <label>Recipe (a YAML file under the artifact root)</label><input id="st-recipe" size="60" placeholder="recipes/lora-sft.yaml">
    <label>Overrides (key=value, one per line)</label><textarea id="st-overrides" rows="3" cols="60"></textarea>
    <p><button id="st-submit">Start</button></p><p id="st-result"></p>`;
  $('#st-submit').onclick = async () => {
    const res = $('#st-result');
    res.className = '';
    res.textContent = 'starting…';
    const overrides = $('#st-overrides').value.split('\n').map(s => s.trim()).filter(Boolean);
    const body = JSON.stringify({ kind: $('#st-kind').value, recipe: $('#st-recipe').value, overrides });
    try {
      const j = await api('start', { method: 'POST', headers: { 'content-type': 'application/json' }, body });
      res.innerHTML = `started <a id="st-job" href="#/job/${encodeURIComponent(j.id)}">${esc(j.id)}</a>`;
    } catch (e) {
      res.className = 'error';
      res.textContent = e.message;
    }
  };
}

async function pipelinesPage() {
  view.innerHTML = `<h1>Pipelines</h1><div id="pipelines">loading…</div>`;
  const out = v => Object.entries(v.outputs || {})
    .map(([k, x]) => (k == 'job_id' ? `job <a href="#/job/${encodeURIComponent(x)}">${esc(x)}</a>` : `${esc(k)}: ${esc(x)}`))
    .join('<br>');
  const tick = async () => {
    try {
      const r = await api('pipelines');
      $('#pipelines').innerHTML = r.pipelines.map(p => {
        const rows = (p.order || Object.keys(p.stages)).map(n => {
          const st = p.stages[n] ? 'succeeded' : p.running == n ? 'running' : p.failed && p.failed[0] == n ? 'failed' : 'queued';
          return `<tr class="stage" data-stage="${esc(n)}"><td>${esc(n)}</td><td><span class="state ${st}">${st}</span></td>
            <td>${p.stages[n] ? out(p.stages[n]) : p.failed && p.failed[0] == n ? esc(p.failed[1]) : ''}</td></tr>`;
        }).join('');
        return `<h2>${esc(p.name)} <small>${esc(p.path)}</small></h2>
          <table class="pipeline" data-name="${esc(p.name)}"><thead><tr><th>stage</th><th>state</th><th>outputs</th></tr></thead>
          <tbody>${rows}</tbody></table>`;
      }).join('') || 'no pipelines under the artifact root yet (ferrotune pipeline run P.yaml)';
    } catch (e) {
      $('#pipelines').textContent = e.message;
    }
  };
  await tick();
  const t = setInterval(tick, 3000);
  live.signal.addEventListener('abort', () => clearInterval(t));
}

function route() {
  if (live) live.abort();
  live = new AbortController();
  const h = location.hash.slice(1) || '/';
  if (h.startsWith('/job/')) jobPage(decodeURIComponent(h.slice(5)));
  else if (h == '/playground') playground();
  else if (h == '/start') startPage();
  else if (h == '/pipelines') pipelinesPage();
  else jobsPage();
}

window.addEventListener('hashchange', route);
// A token given once as ?token=… is now a cookie: keep it out of the address bar.
if (location.search.includes('token=')) history.replaceState(null, '', location.pathname + location.hash);
route();
