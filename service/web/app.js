// wbmri web page: upload a study, follow its job, show the overlay and the lesion table, download, delete.
// Plain JavaScript, no dependencies; every value from the server is inserted as text, never as HTML.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const state = { token: sessionStorage.getItem('wbmri-token') || '', job: null, urls: [], pollTimer: null };
  const STAGES = {
    queued: 'Queued', starting: 'Starting', read: 'Reading the study', preprocess: 'Preparing',
    network: 'Segmenting', postprocess: 'Measuring lesions', saving: 'Writing results', done: 'Done',
  };
  const FILES = [
    ['report', 'report.json', 'Report (JSON)'],
    ['overlay', 'overlay.png', 'Overlay picture (PNG)'],
    ['lesions', 'lesions.nii.gz', 'Lesion labels (NIfTI)'],
    ['sites', 'sites.nii.gz', 'Site labels (NIfTI)'],
  ];

  function authHeaders() {
    return state.token ? { Authorization: 'Bearer ' + state.token } : {};
  }

  async function api(path, options) {
    const opts = options || {};
    const res = await fetch(path, { ...opts, headers: { ...authHeaders(), ...(opts.headers || {}) }, cache: 'no-store' });
    if (res.status === 401) {
      askForKey();
      throw new Error('This server requires an API key.');
    }
    return res;
  }

  async function detail(res) {
    try {
      const body = await res.json();
      if (typeof body.detail === 'string') return body.detail;
      if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join('; ');
    } catch (e) { /* not JSON */ }
    return 'The server answered ' + res.status + '.';
  }

  // ------------------------------------------------------------------------------------------ small helpers
  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return '–';
    return Number(v).toFixed(digits);
  }

  function words(code) {
    return String(code || '').replace(/_(left|right)$/, '').replace(/_/g, ' ');
  }

  function subregion(s) {
    if (!s) return '–';
    const m = /^(epiphysis|metaphysis)_(proximal|distal)$/.exec(s);
    return m ? m[1] + ' (' + m[2] + ')' : words(s);
  }

  function features(l) {
    const f = [];
    if (l.juxtaphyseal) f.push('juxtaphyseal');
    else if (l.juxtaphyseal == null && /^(epiphysis|metaphysis)/.test(l.subregion || '')) f.push('growth plate not found');
    if (l.soft_tissue_extension) f.push('soft tissue');
    return f.length ? f.join(', ') : '–';
  }

  function show(id, on) { $(id).hidden = !on; }

  function setError(msg) {
    $('error').textContent = msg || '';
    show('error', Boolean(msg));
  }

  function setProgress(stage, percent) {
    show('progress', true);
    $('progress-stage').textContent = stage;
    const p = Math.max(0, Math.min(100, percent));
    $('bar-fill').style.width = p + '%';
    $('bar').setAttribute('aria-valuenow', String(Math.round(p)));
  }

  function releaseUrls() {
    state.urls.forEach((u) => URL.revokeObjectURL(u));
    state.urls = [];
  }

  function resetResult() {
    releaseUrls();
    show('result', false);
    $('overlay').removeAttribute('src');
    $('overlay-link').removeAttribute('href');
    $('lesions').querySelector('tbody').replaceChildren();
    $('downloads').replaceChildren();
    $('summary').replaceChildren();
    $('warnings').replaceChildren();
    show('failed-actions', false);
    ['delete', 'delete-failed'].forEach((id) => { $(id).textContent = 'Delete study'; $(id).dataset.armed = ''; });
  }

  // ------------------------------------------------------------------------------------------------- key
  function askForKey() {
    show('key-card', true);
    $('key-input').focus();
  }

  $('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    state.token = $('key-input').value.trim();
    sessionStorage.setItem('wbmri-token', state.token);
    show('key-card', false);
    setError('');
    loadModel();
    resumeFromAddress();
  });

  async function loadModel() {
    try {
      const res = await api('/v1/model');
      if (!res.ok) return;
      const card = await res.json();
      const rt = card.runtime || {};
      $('model-info').textContent = 'Model ' + (card.name || rt.name || '?') + ' ' + (card.version || rt.version || '') +
        (rt.device ? ' · ' + rt.device : '');
      $('model-caution').textContent = rt.caution || '';
      show('model-caution', Boolean(rt.caution));
    } catch (e) {  // the page still works without it; a key that was given and refused is said so
      if (state.token && e.message.includes('API key')) setError('That API key was not accepted.');
    }
  }

  // ----------------------------------------------------------------------------------------------- upload
  function upload(file) {
    if (!file) return;
    clearTimeout(state.pollTimer);
    resetResult();
    setError('');
    state.job = null;
    remember(null);
    $('file').value = '';  // so that choosing the same file again (a retry) uploads it again
    $('progress-name').textContent = file.name;
    setProgress('Uploading', 0);
    const xhr = new XMLHttpRequest();
    xhr.open('POST', '/v1/studies');
    Object.entries(authHeaders()).forEach(([k, v]) => xhr.setRequestHeader(k, v));
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) setProgress('Uploading ' + Math.round((100 * e.loaded) / e.total) + '%', (30 * e.loaded) / e.total);
    };
    xhr.onerror = () => { show('progress', false); setError('The upload failed: the server could not be reached.'); };
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText || '{}'); } catch (e) { body = {}; }
      if (xhr.status === 401) { show('progress', false); askForKey(); setError('This server requires an API key.'); return; }
      if (xhr.status === 202 || xhr.status === 200) { follow(body); return; }
      show('progress', false);
      let msg = typeof body.detail === 'string' ? body.detail : 'The server answered ' + xhr.status + '.';
      const retry = xhr.getResponseHeader('Retry-After');
      if (retry) msg += ' Try again in about ' + retry + ' s.';
      setError('The study was not accepted: ' + msg);
    };
    const form = new FormData();
    form.append('file', file, file.name);
    xhr.send(form);
  }

  // the job followed is kept in the address (#job=ID), so a reload or a bookmark finds the study again
  function remember(id) {
    const url = id ? '#job=' + encodeURIComponent(id) : window.location.pathname + window.location.search;
    history.replaceState(null, '', url);
  }

  async function resumeFromAddress() {
    const m = /^#job=([0-9a-f]{32})$/.exec(window.location.hash);
    if (!m || (state.job && state.job.id === m[1])) return;
    try {
      const res = await api('/v1/jobs/' + m[1]);
      if (!res.ok) { remember(null); setError('That study is no longer on the server: ' + await detail(res)); return; }
      const job = await res.json();
      $('progress-name').textContent = job.filename || '';
      follow(job);
    } catch (e) { setError(e.message); }
  }

  function follow(job) {
    state.job = job;
    remember(job.id);
    if (job.state === 'done') { showResult(job); return; }
    if (job.state === 'failed') {
      show('progress', false);
      const name = job.filename || $('progress-name').textContent;
      setError('The analysis' + (name ? ' of ' + name : '') + ' failed: ' + (job.error || 'unknown error'));
      show('failed-actions', true);
      return;
    }
    let stage = STAGES[job.stage] || job.stage || 'Working';
    if (job.state === 'queued') stage = 'Queued' + (job.queue_position ? ' (position ' + job.queue_position + ')' : '');
    setProgress(stage, 30 + 70 * (job.progress || 0));
    state.pollTimer = setTimeout(poll, 600);
  }

  async function poll() {
    const id = state.job && state.job.id;
    if (!id) return;
    try {
      const res = await api('/v1/jobs/' + id);
      if (!res.ok) { show('progress', false); setError(await detail(res)); return; }
      if (!state.job || state.job.id !== id) return;
      state.misses = 0;
      setError('');
      follow(await res.json());
    } catch (e) {
      // the server may be restarting: accepted jobs survive it, so keep asking (every 2 s, after 2 minutes every 15 s)
      if (e.message.includes('API key')) { setError(e.message); return; }
      state.misses = (state.misses || 0) + 1;
      setError(state.misses > 60
        ? 'The server has not answered for over 2 minutes; still trying every 15 s (the study is kept on the server).'
        : 'The server is not answering; still trying…');
      state.pollTimer = setTimeout(poll, state.misses > 60 ? 15000 : 2000);
    }
  }

  // ----------------------------------------------------------------------------------------------- result
  async function fetchBlob(path) {
    const res = await api(path);
    if (!res.ok) throw new Error(await detail(res));
    return res.blob();
  }

  function stem(name) {
    return String(name || 'study').replace(/\.nii(\.gz)?$/i, '') || 'study';
  }

  async function showResult(job) {
    setProgress('Done', 100);
    try {
      const res = await api(job.links.report);
      if (!res.ok) throw new Error(await detail(res));
      const report = await res.json();
      renderReport(job, report);
      const img = await fetchBlob(job.links.overlay);
      const url = URL.createObjectURL(img);
      state.urls.push(url);
      $('overlay').src = url;
      $('overlay-link').href = url;  // the full-size picture, whose legend the page shrinks
    } catch (e) {
      setError('The result could not be shown: ' + e.message);
    }
  }

  // the spine in words, as the overlay says it (models/viz.py spine_finding)
  function spineFinding(s) {
    if (s.spine_involved) return 'yes';
    if (s.spine_in_view === false) return 'not in view';
    const weak = (s.low_sensitivity_regions || []).some((r) => String(r).startsWith('spine_'));
    return weak ? 'no lesion found (the model finds few spine lesions)' : 'no lesion found';
  }

  function chip(label, value) {
    const c = el('div', null, 'chip');
    c.append(el('span', value, 'chip-value'), el('span', label, 'chip-label'));
    return c;
  }

  function renderReport(job, report) {
    const s = report.summary || {};
    $('result-name').textContent = '· ' + job.filename;
    const study = report.study || {};
    const model = report.model || {};
    $('result-meta').textContent = [
      study.shape ? study.shape.join(' × ') + ' voxels' : '',
      study.spacing_mm ? study.spacing_mm.map((v) => fmt(v, 2)).join(' × ') + ' mm' : '',
      model.name ? 'model ' + model.name + ' ' + (model.version || '') : '',
      job.timings_s && job.timings_s.run !== undefined ? 'analysed in ' + fmt(job.timings_s.run, 1) + ' s' : '',
    ].filter(Boolean).join(' · ');

    $('summary').replaceChildren(
      chip('lesions', s.lesion_count ?? 0),
      chip('affected sites', s.affected_sites ?? 0),
      chip('total volume (mL)', fmt(s.total_volume_ml, 1)),
      chip('largest lesion (mL)', fmt(s.largest_lesion_ml, 1)),
      chip('spine involved', spineFinding(s)),
      chip('soft tissue involved', s.soft_tissue_involved ? 'yes' : 'none flagged'),
      chip((s.symmetric_pairs || []).length === 1 ? 'symmetric pair' : 'symmetric pairs', (s.symmetric_pairs || []).length),
    );

    const warnings = report.warnings || [];
    $('warnings').replaceChildren(...warnings.map((w) => el('li', w)));
    show('warnings', warnings.length > 0);

    const tbody = $('lesions').querySelector('tbody');
    const rows = (report.lesions || []).map((l) => {
      const tr = el('tr');
      tr.append(
        el('td', l.id),
        el('td', words(l.site)),
        el('td', l.side),
        el('td', [l.subregion, ...(l.subregions || []).slice(1)].map(subregion).join(' + '), 'wrap'),
        el('td', fmt(l.volume_ml, 1), 'num'),
        el('td', fmt(l.max_diameter_mm, 0), 'num'),
        el('td', l.extension_grade || '–'),
        el('td', features(l), 'wrap'),
        el('td', fmt(l.signal_ratio_marrow, 2), 'num'),
        el('td', fmt(l.confidence, 2), 'num'),
      );
      return tr;
    });
    if (rows.length === 0) {
      const tr = el('tr');
      const td = el('td', 'No lesions detected.', 'empty');
      td.colSpan = $('lesions').querySelectorAll('thead th').length;
      tr.append(td);
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);

    $('downloads').replaceChildren(...FILES.map(([key, file, label]) => {
      const li = el('li');
      const a = el('a', label);
      a.href = job.links[key];
      a.dataset.file = file;
      a.addEventListener('click', (ev) => { ev.preventDefault(); download(job.links[key], stem(job.filename) + '_' + file); });
      li.append(a, el('span', file, 'muted small'));
      return li;
    }));
    $('disclaimer').textContent = report.disclaimer || '';
    show('progress', false);
    show('result', true);
  }

  async function download(path, name) {
    try {
      const blob = await fetchBlob(path);
      const url = URL.createObjectURL(blob);
      const a = el('a');
      a.href = url;
      a.download = name;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 30000);
    } catch (e) {
      setError('Download failed: ' + e.message);
    }
  }

  // delete the study (done or failed): the first click arms the button, the second deletes
  async function deleteStudy(btn) {
    if (!state.job) return;
    if (!btn.dataset.armed) {
      btn.dataset.armed = '1';
      btn.textContent = 'Confirm: delete upload and results';
      return;
    }
    try {
      const res = await api('/v1/jobs/' + state.job.id, { method: 'DELETE' });
      if (res.status !== 204 && res.status !== 404) throw new Error(await detail(res));
      state.job = null;
      remember(null);
      resetResult();
      show('progress', false);
      setError('');
      $('file').value = '';
      const note = el('p', 'The study and all its results were deleted from the server.', 'deleted');
      note.setAttribute('role', 'status');
      $('drop').focus();  // keyboard users land where the next study is chosen, not on the page body
      $('upload-card').append(note);
      setTimeout(() => note.remove(), 6000);
    } catch (e) {
      setError('Delete failed: ' + e.message);
    }
  }
  ['delete', 'delete-failed'].forEach((id) => $(id).addEventListener('click', () => deleteStudy($(id))));

  // ----------------------------------------------------------------------------------------- drag & drop
  const drop = $('drop');
  ['dragenter', 'dragover'].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add('over'); }));
  ['dragleave', 'drop'].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove('over'); }));
  drop.addEventListener('drop', (e) => { if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); });
  drop.addEventListener('keydown', (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); $('file').click(); } });
  $('file').addEventListener('change', (e) => upload(e.target.files[0]));
  window.addEventListener('dragover', (e) => e.preventDefault());
  window.addEventListener('drop', (e) => e.preventDefault());

  window.addEventListener('hashchange', resumeFromAddress);  // an address pasted into this tab
  loadModel();
  resumeFromAddress();
})();
