// Renders /openapi.json as a plain list of operations (no external viewer, nothing fetched from outside).
'use strict';
(async function () {
  const el = (tag, text, cls) => {
    const n = document.createElement(tag);
    if (text !== undefined && text !== null) n.textContent = String(text);
    if (cls) n.className = cls;
    return n;
  };
  const ops = document.getElementById('ops');
  let spec;
  try {
    spec = await (await fetch('/openapi.json')).json();
  } catch (e) {
    ops.append(el('p', 'The OpenAPI document could not be loaded.'));
    return;
  }
  document.getElementById('intro').textContent = (spec.info && spec.info.description) || '';
  Object.entries(spec.paths || {}).forEach(([path, item]) => {
    Object.entries(item).forEach(([method, op]) => {
      const box = el('div', null, 'op');
      const head = el('div', null, 'op-head');
      head.append(el('span', method.toUpperCase(), 'method ' + method), el('span', path, 'op-path'),
        el('span', op.summary || '', 'muted'));
      box.append(head);
      if (op.description) box.append(el('p', op.description));
      const params = (op.parameters || []).map((p) => p.name + ' (' + p.in + (p.required ? ', required' : '') + ')' +
        (p.description ? ': ' + p.description : ''));
      if (op.requestBody) params.push('body: ' + Object.keys(op.requestBody.content || {}).join(', '));
      if (params.length) {
        const ul = el('ul');
        params.forEach((t) => ul.append(el('li', t)));
        box.append(ul);
      }
      const codes = Object.entries(op.responses || {}).map(([c, r]) => c + ' ' + (r.description || '')).join(' · ');
      box.append(el('p', 'Responses: ' + codes, 'muted small'));
      ops.append(box);
    });
  });
})();
